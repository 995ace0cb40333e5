"""Stage 2 end to end on a tiny dataset with hand-made stage-1 regions and saliency maps (seconds)."""
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from wsss import io
from wsss.data.voc import VOCDataset
from wsss.fusion import FUSION_DEFAULT, FUSION_RULES

pytest.importorskip("pydensecrf.densecrf")
pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "stages" / "stage2.py"


def stage2_main():
    spec = importlib.util.spec_from_file_location("stage2_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def make_stage1(data: Path, run_dir: Path) -> Path:
    """stage1/regions/ID.npz as stage 1 writes them: per labelled class the object shrunk by 2 px
    (the mined region), a score peaking inside it, plus a manifest. Unlabelled images get none."""
    ds = VOCDataset(data, "train")
    stage1 = run_dir / "stage1"
    for id_ in ds.ids:
        gt = ds.mask(id_)
        keys = ds.label_ids(id_)
        if not len(keys):
            continue
        masks = np.stack([ndi.binary_erosion(gt == k, iterations=2) for k in keys])
        score = np.stack([ndi.gaussian_filter((gt == k).astype(np.float32), 2) for k in keys])
        io.write_npz(stage1 / "regions" / f"{id_}.npz", keys=keys.astype(np.int64), masks=masks,
                     score=(score / score.max(axis=(1, 2), keepdims=True)).astype(np.float16))
    io.write_manifest(stage1, {"hand-made": True})
    return stage1


def make_saliency(data: Path, folder: Path) -> Path:
    """Grey maps at half size (bright objects, dark ground), as precomputed maps come."""
    ds = VOCDataset(data, "train")
    for id_ in ds.ids:
        fg = ds.mask(id_) > 0
        io.write_png(folder / f"{id_}.png", np.where(fg, 230, 5).astype(np.uint8)[::2, ::2])
    return folder


@pytest.fixture
def setup(tmp_path, tiny_voc_factory):
    data = tiny_voc_factory("data", n_train=4, n_val=1, unlabelled=1)
    outputs = tmp_path / "outputs"
    make_stage1(data, outputs / "r")
    saliency = make_saliency(data, tmp_path / "saliency")

    def run(*extra):
        return stage2_main()(["--data", str(data), "--outputs", str(outputs), "--run", "r", "--workers", "1",
                              "--saliency", str(saliency), "--sample", "2", *extra])

    return data, outputs / "r" / "stage2", run


def test_end_to_end_outputs_skip_force_and_resume(setup):
    data, stage, run = setup
    ds = VOCDataset(data, "train")
    run()
    manifest = io.read_json(stage / "manifest.json")
    assert manifest["complete"]
    out = manifest["outputs"]
    assert out["images"] == 4 and out["unlabelled_all_background"] == 1 and out["skipped_no_regions"] == 0
    assert 0 < out["fused"]["ignored_fraction"] < 1 and out["pseudo"]["miou_labelled"] > 50
    for id_ in ds.ids:
        keys = set(ds.label_ids(id_).tolist())
        for name in ("fused", "pseudo"):
            path = stage / name / f"{id_}.png"
            assert Image.open(path).mode == "P"
            values = set(np.unique(io.read_mask(path)).tolist())
            assert values <= {0, 255} | keys, (path, values)
            if not keys:
                assert values == {0}
        if keys:
            assert (stage / "saliency" / f"{id_}.png").is_file()
            assert io.read_mask(stage / "saliency" / f"{id_}.png").shape == ds.mask(id_).shape
            assert (stage / "overlay" / f"{id_}.png").is_file()
    assert (stage / "contact_sheet.png").is_file()

    labelled = [i for i in ds.ids if len(ds.label_ids(i))]
    first = {i: (stage / "pseudo" / f"{i}.png").stat().st_mtime_ns for i in labelled}
    assert stage2_module_run_is_skipped(run, stage)

    # an interrupted run (no manifest, one image missing) redoes only what is missing
    (stage / "manifest.json").unlink()
    (stage / "pseudo" / f"{labelled[0]}.png").unlink()
    (stage / "overlay" / f"{labelled[1]}.png").unlink()  # a kill between the pseudo-mask and its overlay
    run()
    assert (stage / "overlay" / f"{labelled[1]}.png").is_file()
    again = {i: (stage / "pseudo" / f"{i}.png").stat().st_mtime_ns for i in labelled}
    assert again[labelled[0]] != first[labelled[0]]
    assert all(again[i] == first[i] for i in labelled[1:])

    run("--force")
    forced = {i: (stage / "pseudo" / f"{i}.png").stat().st_mtime_ns for i in labelled}
    assert all(forced[i] != again[i] for i in labelled)


def stage2_module_run_is_skipped(run, stage: Path) -> bool:
    before = (stage / "manifest.json").stat().st_mtime_ns
    run()
    return (stage / "manifest.json").stat().st_mtime_ns == before


def test_same_seed_same_masks_and_a_new_config_is_redone_only_with_force(setup):
    data, stage, run = setup
    run()
    ids = VOCDataset(data, "train").ids
    first = {i: io.read_mask(stage / "pseudo" / f"{i}.png") for i in ids}
    with pytest.raises(SystemExit, match=r"(?s)--crf: True -> False.*--force"):
        run("--no-crf")
    for i in ids:  # stopped before touching anything
        np.testing.assert_array_equal(io.read_mask(stage / "pseudo" / f"{i}.png"), first[i])
    run("--no-crf", "--force")
    assert io.read_json(stage / "manifest.json")["config"]["crf"] is False
    for i in ids:  # without the CRF the pseudo-mask is the fused mask, rewritten for the new config
        np.testing.assert_array_equal(io.read_mask(stage / "pseudo" / f"{i}.png"),
                                      io.read_mask(stage / "fused" / f"{i}.png"))
    run("--force")
    for i in ids:
        np.testing.assert_array_equal(io.read_mask(stage / "pseudo" / f"{i}.png"), first[i])


def test_crf_pool_and_builtin_saliency(setup, tmp_path):
    data, stage, run = setup
    stage2_main()(["--data", str(data), "--outputs", str(tmp_path / "outputs"), "--run", "r",
                   "--workers", "2", "--sample", "1"])
    manifest = io.read_json(stage / "manifest.json")
    assert manifest["config"]["saliency"] == "builtin-max"  # the default
    assert (stage / "pseudo").is_dir() and len(list((stage / "pseudo").glob("*.png"))) == 4


def test_missing_stage1_is_a_clear_error(tmp_path, tiny_voc):
    with pytest.raises(SystemExit, match="stage 1 is not complete"):
        stage2_main()(["--data", str(tiny_voc), "--outputs", str(tmp_path / "o"), "--run", "r"])


def test_regions_of_a_class_the_image_lacks_is_a_clear_error(setup):
    data, stage, run = setup
    ds = VOCDataset(data, "train")
    id_ = next(i for i in ds.ids if len(ds.label_ids(i)) == 1)
    path = stage.parent / "stage1" / "regions" / f"{id_}.npz"
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["keys"] = np.array([ds.label_ids(id_)[0] % 3 + 1])  # another class
    io.write_npz(path, **arrays)
    with pytest.raises(SystemExit, match="failed on 1 of 4 images"):
        run()


def test_fusion_rule_is_an_option_named_in_the_manifest(setup):
    data, stage, run = setup
    with pytest.raises(SystemExit, match="--fg-threshold 0.05 is below --bg-threshold 0.1"):
        run("--fusion", "saliency-first", "--fg-threshold", "0.05")
    assert not (stage / "pseudo").exists()  # stopped before any work
    run("--no-crf", "--fusion", "mined-first")
    mined = io.read_json(stage / "manifest.json")["outputs"]
    assert mined["fusion"] == "mined-first" and mined["crf"] is False
    with pytest.raises(SystemExit, match=f"--fusion: mined-first -> {FUSION_DEFAULT}"):
        run("--no-crf")  # the default rule
    run("--no-crf", "--force", "--fusion", "saliency-first")
    salient = io.read_json(stage / "manifest.json")["outputs"]
    assert salient["fusion"] == "saliency-first"
    # the hand-made saliency covers whole objects while the mined regions are the objects shrunk by 2 px:
    # saliency-first labels the objects' rims that mined-first leaves ignored
    assert salient["fused"]["ignored_fraction"] < mined["fused"]["ignored_fraction"]
    assert salient["fused"]["miou_labelled"] > 50
    ds = VOCDataset(data, "train")
    for id_ in ds.ids:
        values = set(np.unique(io.read_mask(stage / "pseudo" / f"{id_}.png")).tolist())
        assert values <= {0, 255} | set(ds.label_ids(id_).tolist())


def test_bench_fusion_scores_every_rule_and_reproduces_the_runs_own(setup, tmp_path, capsys):
    from bench.bench_fusion import main as bench

    data, stage, run = setup
    outputs = stage.parent.parent
    assert bench(["--outputs", str(outputs)]) == 0  # no --run and no demo run: skipped, nothing written
    assert "skipped" in capsys.readouterr().err
    run("--fusion", "mined-first")  # with the CRF
    manifest = io.read_json(stage / "manifest.json")["outputs"]
    out = tmp_path / "fusion.json"
    assert bench(["--run", "r", "--outputs", str(outputs), "--workers", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = io.read_json(out)
    rows = {(r["rule"], r["crf"]): r for r in result["rows"]}
    assert set(rows) == {(rule, crf) for rule in FUSION_RULES for crf in (False, True)}
    assert result["images"] == 4 and result["conflict"] == "score" and result["bg_threshold"] == 0.1
    # the run's own rule, before and after its CRF, scores what stage 2 measured
    assert rows["mined-first", False]["miou_labelled"] == manifest["fused"]["miou_labelled"]
    assert rows["mined-first", True]["miou_labelled"] == manifest["pseudo"]["miou_labelled"]
    assert rows["saliency-first", False]["ignored_percent"] < rows["mined-first", False]["ignored_percent"]
    for r in result["rows"]:
        assert 0 < r["miou"] <= 100 and 0 <= r["ignored_percent"] < 100
    assert "saliency-first" in printed and "mIoU (ignore = bg)" in printed
    with pytest.raises(SystemExit, match="stage2/config.json: not found"):
        bench(["--run", "nothing", "--outputs", str(outputs)])


def test_seeds_from_any_folder_in_the_regions_format(setup, tmp_path):
    """--seeds DIR: another seed source feeds stage 2 with no stage 1; the folder is checked up
    front (a bad file is named before any work) and its files are an input of the stage."""
    import shutil

    data, stage, run = setup
    seeds = tmp_path / "my-seeds"
    shutil.copytree(stage.parent / "stage1" / "regions", seeds)
    shutil.rmtree(stage.parent / "stage1")  # the seeds are all stage 2 needs
    ds = VOCDataset(data, "train")
    id_ = next(i for i in ds.ids if len(ds.label_ids(i)) == 1)
    good = (seeds / f"{id_}.npz").read_bytes()
    with np.load(seeds / f"{id_}.npz") as f:
        arrays = {k: f[k] for k in f.files}
    io.write_npz(seeds / f"{id_}.npz", **{**arrays, "score": arrays["score"][:, ::2]})  # not the image's size
    with pytest.raises(SystemExit, match=rf"{id_}\.npz: map size .* differs from the image size"):
        run("--seeds", str(seeds))
    assert not (stage / "pseudo").exists()  # nothing done
    (seeds / f"{id_}.npz").write_bytes(good)
    run("--seeds", str(seeds))
    manifest = io.read_json(stage / "manifest.json")
    assert manifest["complete"] and manifest["outputs"]["skipped_no_regions"] == 0
    assert manifest["outputs"]["pseudo"]["miou_labelled"] > 50
    io.write_npz(seeds / f"{id_}.npz", **{**arrays, "masks": np.zeros_like(arrays["masks"])})  # new seeds
    with pytest.raises(SystemExit, match=r"(?s)seeds.*--force"):
        run("--seeds", str(seeds))
    with pytest.raises(SystemExit, match="not a folder"):
        run("--seeds", str(tmp_path / "nowhere"))


def test_a_dataset_other_than_stage1s_is_refused_before_any_work(tmp_path, tiny_voc_factory):
    """The same photos with the class order reversed: stage 2 stops naming what differs, writes nothing."""
    from wsss.stage import dataset_inputs, fingerprints

    data = tiny_voc_factory("data", n_train=4, n_val=1)
    outputs = tmp_path / "outputs"
    stage1 = make_stage1(data, outputs / "r")
    io.write_manifest(stage1, {"data": str(data), "train_split": "train"},
                      fingerprints=fingerprints(dataset_inputs(VOCDataset(data, "train"))))
    other = tmp_path / "other"
    shutil.copytree(data, other)
    names = (other / "class_names.txt").read_text().split()
    (other / "class_names.txt").write_text("\n".join([names[0], *reversed(names[1:])]) + "\n")
    argv = ["--outputs", str(outputs), "--run", "r", "--workers", "1", "--no-crf"]
    with pytest.raises(SystemExit, match=r"not the one .*stage1 read .*class names differ"):
        stage2_main()(["--data", str(other), *argv])
    assert not (outputs / "r" / "stage2").exists()
    stage2_main()(["--data", str(data), *argv])  # stage 1's own dataset goes on
    assert (outputs / "r" / "stage2" / "manifest.json").is_file()


def test_a_photo_larger_than_max_side_is_fused_at_that_size_and_written_at_its_own(setup, monkeypatch):
    """Memory stays bounded on a huge photo: fusion, CRF and built-in saliency work at MAX_SIDE."""
    from wsss import pseudo, saliency_maps

    data, stage, run = setup
    seen = []
    real = pseudo.pseudo_mask

    def spy(image, *args, **kwargs):
        seen.append(image.shape[:2])
        return real(image, *args, **kwargs)

    monkeypatch.setattr(pseudo, "MAX_SIDE", 32)
    monkeypatch.setattr(saliency_maps, "MAX_SIDE", 32)
    monkeypatch.setattr(pseudo, "pseudo_mask", spy)
    stage2_main()(["--data", str(data), "--outputs", str(stage.parent.parent), "--run", "r", "--workers", "1"])
    ds = VOCDataset(data, "train")
    assert seen and all(max(shape) == 32 for shape in seen)
    for id_ in ds.ids:
        shape = ds.image(id_).shape[:2]
        assert io.read_mask(stage / "pseudo" / f"{id_}.png").shape == shape
        assert io.read_mask(stage / "fused" / f"{id_}.png").shape == shape
    assert all(np.asarray(io.read_image(p)).shape[:2] == ds.image(p.stem).shape[:2]
               for p in (stage / "saliency").glob("*.png"))
