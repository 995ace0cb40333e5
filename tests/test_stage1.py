"""Stage 1 end to end on a tiny dataset with a randomly initialised efficientnet-lite0 (seconds on CPU)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss import erasing, io
from wsss.cam import load_cams
from wsss.data.voc import VOCDataset
from wsss.models.classifier import build_classifier
from wsss.scoremaps import stored_size
from wsss.train import TrainConfig, fit, read_metrics

torch.set_num_threads(2)
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*randomly initialised:UserWarning")]
SCRIPT = Path(__file__).resolve().parents[1] / "stages" / "stage1.py"


def stage1_main():
    spec = importlib.util.spec_from_file_location("stage1_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_stage1(data, outputs, *extra, run="r"):
    stage1_main()(["--data", str(data), "--outputs", str(outputs), "--run", run, "--device", "cpu",
                   "--workers", "0", "--weights", "none", "--crop", "32", "--batch-size", "2", "--epochs", "1",
                   "--iterations", "0", "--cam-scales", "1.0,1.5", "--ae-steps", "2", "--ae-stop-loss", "100",
                   "--overlays", "1", *extra])
    return Path(outputs) / run / "stage1"


def read_regions(stage: Path, id_: str) -> dict:
    with np.load(stage / "regions" / f"{id_}.npz") as f:
        return {k: f[k] for k in f.files}


def test_end_to_end_artifacts_skip_force_and_same_seed_same_regions(tmp_path, tiny_voc_factory):
    data = tiny_voc_factory("data", n_train=2, n_val=1)
    ids = (data / "ImageSets/Segmentation/train.txt").read_text().split()
    stage = run_stage1(data, tmp_path / "out")

    manifest = io.read_json(stage / "manifest.json")
    assert manifest["complete"] and manifest["outputs"]["steps_done"] == 2
    assert set(manifest["outputs"]["final_loss"]) == {"step1", "step2"}
    assert set(manifest["outputs"]["coverage"]) == {"step1", "step2"}
    labels = np.load(data / "cls_labels.npy", allow_pickle=True).item()
    for id_ in ids:
        h, w = io.read_image(data / "JPEGImages" / f"{id_}.jpg").shape[:2]
        keys = np.flatnonzero(labels[id_]) + 1
        regions = read_regions(stage, id_)
        assert regions["keys"].tolist() == keys.tolist()
        assert regions["masks"].dtype == bool and regions["masks"].shape == (len(keys), h, w)
        assert regions["score"].dtype == np.uint8 and regions["score"].shape == (len(keys), *stored_size((h, w)))
        union_png = io.read_mask(stage / "regions" / f"{id_}.png")
        assert set(np.unique(union_png)) <= {0, *keys.tolist()}
        for k in (1, 2):
            step = stage / f"step{k}"
            assert (step / "checkpoint.pt").is_file() and (step / "done.json").is_file()
            assert len(read_metrics(step)) == 1
            cam, cam_keys = load_cams(step / "cam", id_, expected_shape=(h, w))
            assert cam_keys.tolist() == keys.tolist()
            step_png = io.read_mask(step / "regions" / f"{id_}.png")
            assert step_png.shape == (h, w)
            # the union never shrinks: it holds every step's mined pixels, class by class
            assert (regions["masks"] >= (cam > manifest["config"]["ae_threshold"])).all()
            assert ((union_png != 0) >= (step_png != 0)).all()
    assert len(list((stage / "overlay").glob("*.png"))) == 1

    # unchanged config: skipped; --force: redone, and the same seed gives the same regions
    finished = manifest["finished"]
    run_stage1(data, tmp_path / "out")
    assert "skipping" in (stage / "stage1.log").read_text()
    assert io.read_json(stage / "manifest.json")["finished"] == finished
    before = {i: read_regions(stage, i) for i in ids}
    run_stage1(data, tmp_path / "out", "--force")
    assert io.read_json(stage / "manifest.json")["finished"] != finished
    for id_ in ids:
        after = read_regions(stage, id_)
        for key in ("keys", "masks", "score"):
            assert np.array_equal(before[id_][key], after[key])

    # CAMs mined in 2 single-thread worker processes: the same up to the rounding of another thread count
    run_stage1(data, tmp_path / "out", "--force", "--workers", "2")
    for id_ in ids:
        after = read_regions(stage, id_)
        assert np.array_equal(before[id_]["keys"], after["keys"])
        np.testing.assert_allclose(before[id_]["score"].astype(np.float32), after["score"].astype(np.float32),
                                   atol=2e-3)
        assert (before[id_]["masks"] == after["masks"]).mean() > 0.995


def test_kill_during_a_step_resumes_at_that_step(tmp_path, monkeypatch, tiny_voc_factory):
    data = tiny_voc_factory("data", n_train=2, n_val=0)
    real = erasing.compute_step_cams

    def killed_in_step2(model, dataset, ids, labelled, step_dir, *args):
        if step_dir.name == "step2":
            real(model, dataset, ids[:1], labelled, step_dir, *args)  # one image's files written, then killed
            raise KeyboardInterrupt
        return real(model, dataset, ids, labelled, step_dir, *args)

    monkeypatch.setattr(erasing, "compute_step_cams", killed_in_step2)
    with pytest.raises(KeyboardInterrupt):
        run_stage1(data, tmp_path / "out")
    stage = tmp_path / "out" / "r" / "stage1"
    assert (stage / "step1" / "done.json").is_file() and not (stage / "step2" / "done.json").exists()
    assert not (stage / "manifest.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in [stage / "step1" / "checkpoint.pt", stage / "step2" / "checkpoint.pt",
                                                  *(stage / "step2" / "cam").glob("*.npz")]}
    assert len(stamps) == 3

    monkeypatch.setattr(erasing, "compute_step_cams", real)
    run_stage1(data, tmp_path / "out")
    assert io.read_json(stage / "manifest.json")["outputs"]["steps_done"] == 2
    # step 1 not redone, step 2's training not redone, its CAM file already written kept
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert len(list((stage / "step2" / "cam").glob("*.npz"))) == 2


def test_fit_resumes_after_an_interrupted_epoch(tiny_voc, tmp_path):
    voc = VOCDataset(tiny_voc, "train")
    ds = erasing.ErasedImages(voc, voc.ids, [], crop=32)
    seen = []

    def step(model, batch, epoch):
        seen.append(epoch)
        if epoch == 1 and crash:
            raise KeyboardInterrupt  # killed during the second epoch
        return erasing.classification_step(model, batch, epoch)

    def train(epochs):
        torch.manual_seed(0)
        model = build_classifier("efficientnet-lite0", 3, weights=None)
        config = TrainConfig(epochs=epochs, batch_size=2, lr=0.01, device="cpu", seed=0)
        return fit(model, ds, step, tmp_path, config, param_groups=model.param_groups)

    crash = True
    with pytest.raises(KeyboardInterrupt):
        train(2)
    first = read_metrics(tmp_path)
    assert [r["epoch"] for r in first] == [1] and io.load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    crash, seen[:] = False, []
    train(2)
    assert set(seen) == {1}  # the finished epoch is not trained again
    metrics = read_metrics(tmp_path)
    assert [r["epoch"] for r in metrics] == [1, 2] and metrics[0] == first[0]


def test_stop_rule_discards_a_step_whose_loss_stays_high(tmp_path, tiny_voc_factory):
    data = tiny_voc_factory("data", n_train=2, n_val=0)
    stage = run_stage1(data, tmp_path / "out", "--ae-stop-loss", "0")
    outputs = io.read_json(stage / "manifest.json")["outputs"]
    assert outputs["steps_run"] == 2 and outputs["steps_done"] == 1 and outputs["stopped_early"]
    assert not (stage / "step2" / "cam").exists() and (stage / "regions").is_dir()


def test_unlabelled_images_are_skipped_and_bad_files_are_errors(tmp_path, tiny_voc_factory):
    data = tiny_voc_factory("data", n_train=3, n_val=0, unlabelled=1)
    stage = run_stage1(data, tmp_path / "out", "--ae-steps", "1")
    assert "1 of 3 images have no labels" in (stage / "stage1.log").read_text()
    empty = read_regions(stage, "tiny_000")
    assert empty["keys"].size == 0 and empty["masks"].shape[0] == 0
    assert io.read_mask(stage / "regions" / "tiny_000.png").max() == 0

    # a CAM file of the wrong size is detected, not used
    np.savez(stage / "step1" / "cam" / "tiny_001.npz", cam=np.zeros((1, 5, 5), np.float16),
             keys=np.array([2], np.int64))
    (stage / "manifest.json").unlink()
    with pytest.raises(SystemExit, match=r"^error: .*tiny_001\.npz.*differs from the image size"):  # one line
        run_stage1(data, tmp_path / "out", "--ae-steps", "1")

    # a corrupt image is an error naming it
    (data / "JPEGImages" / "tiny_002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit, match=r"tiny_002\.jpg: cannot decode image.*wsss.data.voc check"):
        run_stage1(data, tmp_path / "out", "--force")


def artifacts(stage: Path) -> dict:
    """Every artifact of a stage folder by relative path: bytes, metrics lines without their timings;
    the files that record when and where it ran (manifest, logs, flags, the journal of writes) left out."""
    out = {}
    for p in sorted(stage.rglob("*")):
        if not p.is_file() or p.suffix == ".log" or p.name in ("manifest.json", "config.json", "stage.json", ".lock",
                                                                io.JOURNAL):
            continue
        if p.name == "metrics.jsonl":
            out[str(p.relative_to(stage))] = [{k: v for k, v in r.items() if k != "seconds"}
                                              for r in read_metrics(p.parent, iterations=True)]
        else:
            out[str(p.relative_to(stage))] = p.read_bytes()
    return out


@pytest.mark.parametrize("step", ["step1", "step2"])
def test_kill_between_an_epochs_checkpoint_and_its_metrics_line_resumes_byte_for_byte(
        tmp_path, monkeypatch, tiny_voc_factory, step):
    from test_train import Interrupted, kill_between_the_writes_of

    data = tiny_voc_factory("data", n_train=2, n_val=0)
    reference = run_stage1(data, tmp_path / "ref", "--epochs", "2", "--ae-stop-loss", "1.5")
    killed_in = []
    real_fit = erasing.fit

    def fit_killed_in_step(model, dataset, step_fn, out_dir, config, **kwargs):
        with monkeypatch.context() as m:
            if Path(out_dir).name == step:
                killed_in.append(step)
                kill_between_the_writes_of(m, 2)  # the final epoch's two writes
            return real_fit(model, dataset, step_fn, out_dir, config, **kwargs)

    monkeypatch.setattr(erasing, "fit", fit_killed_in_step)
    with pytest.raises(Interrupted):
        run_stage1(data, tmp_path / "run", "--epochs", "2", "--ae-stop-loss", "1.5")
    monkeypatch.setattr(erasing, "fit", real_fit)
    assert killed_in == [step]
    stage = run_stage1(data, tmp_path / "run", "--epochs", "2", "--ae-stop-loss", "1.5")
    assert artifacts(stage) == artifacts(reference)
    done = io.read_json(stage / step / "done.json")
    assert done["final_loss"] == read_metrics(reference / step)[-1]["loss"]


def test_offline_imagenet_weights_are_one_clear_line_and_the_retry_is_not_blocked(tmp_path, tiny_voc_factory,
                                                                                   monkeypatch):
    import urllib.error

    def offline(url, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    data = tiny_voc_factory("data", n_train=4, n_val=0)
    with pytest.raises(SystemExit) as failed:
        stage1_main()(["--data", str(data), "--outputs", str(tmp_path / "o"), "--run", "r", "--device", "cpu",
                       "--backbone", "resnet50", "--weights", "imagenet", "--epochs", "1", "--ae-steps", "1"])
    message = str(failed.value)
    assert message.startswith("error: could not download the ImageNet weights of resnet50")
    assert str(Path(torch.hub.get_dir()) / "checkpoints" / "resnet50-") in message and "--weights PATH" in message
    stage = run_stage1(data, tmp_path / "o", "--ae-steps", "1")  # the retry with other flags needs no --force
    assert (stage / "manifest.json").is_file()


def test_random_walk_seeds_are_written_resumed_and_read_by_stage2(tmp_path, tiny_voc_factory):
    from tests.test_stage2 import stage2_main
    from wsss.scoremaps import read_seeds

    data = tiny_voc_factory("data", n_train=3, n_val=1)
    dataset = VOCDataset(data, "train")
    stage = run_stage1(data, tmp_path / "out", "--ae-steps", "1", "--rw", "--rw-epochs", "1")
    outputs = io.read_json(stage / "manifest.json")["outputs"]
    assert set(outputs["rw"]) >= {"final_loss", "final_bg", "final_fg", "final_neg", "coverage"}
    assert (stage / "rw" / "done.json").is_file() and (stage / "rw" / "checkpoint.pt").is_file()
    for id_ in dataset.ids:
        h, w = io.read_image(data / "JPEGImages" / f"{id_}.jpg").shape[:2]
        keys, masks, score = read_seeds(stage / "rw" / "seeds" / f"{id_}.npz", dataset.label_ids(id_), (h, w))
        assert keys.tolist() == [int(k) for k in dataset.label_ids(id_)] and masks.shape == score.shape
        for m in score:  # each class divided by its peak (an untrained net's CAM may be all zero)
            assert m.max() == pytest.approx(1.0, abs=1 / 255) or m.max() == 0
        assert set(np.unique(io.read_mask(stage / "rw" / "seeds" / f"{id_}.png"))) <= {0, *keys.tolist()}

    # a seed file lost (a kill mid-walk) is walked again, the others kept, same bytes
    first = dataset.ids[0]
    before = {p.name: p.read_bytes() for p in (stage / "rw" / "seeds").iterdir()}
    (stage / "rw" / "seeds" / f"{first}.png").unlink()
    (stage / "rw" / "done.json").unlink()
    (stage / "manifest.json").unlink()
    run_stage1(data, tmp_path / "out", "--ae-steps", "1", "--rw", "--rw-epochs", "1")
    assert {p.name: p.read_bytes() for p in (stage / "rw" / "seeds").iterdir()} == before

    # the walk again with other settings, scored (bench.bench_rw): the union's row and one per setting
    from bench import bench_rw
    result = bench_rw.measure(bench_rw.build_parser().parse_args(
        ["--run", "r", "--outputs", str(tmp_path / "out"), "--steps", "2,8", "--thresholds", "0.3,0.6"]))
    assert [r["seeds"] for r in result["rows"]] == ["union CAM", "walk beta 10, 2 steps", "walk beta 10, 8 steps"]
    assert all(set(r["miou_by_threshold"]) == {"0.3", "0.6"} for r in result["rows"])

    # stage 2 takes the walked seeds: with the seeds rule and no CRF its masks are theirs
    stage2_main()(["--data", str(data), "--outputs", str(tmp_path / "out"), "--run", "r", "--device", "cpu",
                   "--workers", "0", "--fusion", "seeds", "--no-crf", "--overlays", "0"])
    for id_ in dataset.ids:
        if dataset.labels(id_).any():
            assert np.array_equal(io.read_mask(tmp_path / "out" / "r" / "stage2" / "pseudo" / f"{id_}.png"),
                                  io.read_mask(stage / "rw" / "seeds" / f"{id_}.png"))
