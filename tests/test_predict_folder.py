"""`python -m wsss.predict --images`: masks, overlays and masks.json for any folder of photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wsss import io, predict
from wsss.data.voc import DatasetError
from wsss.predict import PredictOptions, predict_folder, predict_image
from wsss.viz import resize

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore:efficientnet-lite0. no weights given")
NAMES = ("background", "disc", "square", "bar")
# relative path -> (H, W); the last one is larger than max_side below
PHOTOS = {"a.jpg": (40, 56), "sub/b.png": (36, 48), "sub/deeper/c d.webp": (44, 40), "big.JPEG": (120, 200)}


@pytest.fixture(scope="module")
def model():
    from wsss.models.segnet import build_segnet

    torch.manual_seed(0)
    return build_segnet("efficientnet-lite0", len(NAMES), cls_branch=True, weights=None).eval()


def make_folder(folder, photos=PHOTOS):
    rng = np.random.default_rng(0)
    for rel, (h, w) in photos.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = np.full((h, w, 3), 110, np.uint8)
        image[h // 4: h // 2, w // 4: w // 2] = (220, 40, 40)
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        fmt = {".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower(), "JPEG")
        Image.fromarray(image).save(path, format=fmt)
    return folder


def test_masks_overlays_and_index_for_a_nested_folder(model, tmp_path):
    images, out = make_folder(tmp_path / "photos"), tmp_path / "out"
    result = predict_folder(model, images, out, NAMES, device="cpu", options=PredictOptions(gate=True),
                            overlay=True, max_side=64)
    assert sorted(result["images"]) == sorted(PHOTOS)
    for rel, (h, w) in PHOTOS.items():
        mask_rel = rel.rsplit(".", 1)[0] + ".png"
        mask = Image.open(out / "masks" / mask_rel)
        assert mask.mode == "P" and mask.size == (w, h)  # full size, even for the one predicted at 64 px
        entry = result["images"][rel]
        assert entry["mask"] == f"masks/{mask_rel}" and entry["size"] == [w, h]
        ids, counts = np.unique(np.asarray(mask), return_counts=True)
        assert entry["classes"] == {NAMES[i]: round(n / (h * w), 4) for i, n in zip(ids, counts, strict=True)}
        over = io.read_image(out / entry["overlay"])
        scale = min(1, 64 / max(h, w))
        assert over.shape[1] == round(w * scale) and over.shape[0] > round(h * scale)  # legend strip below
    assert io.read_json(out / "masks.json") == result


def test_large_photos_are_predicted_at_max_side_and_returned_at_full_size(model):
    rng = np.random.default_rng(1)
    image = resize(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8), (150, 250))
    small = resize(image, (60, 100))
    full = predict_image(model, image, "cpu", gate=True, max_side=100)
    at_small = predict_image(model, small, "cpu", gate=True, max_side=100)
    assert full.shape == (150, 250)
    assert np.mean(resize(at_small, (150, 250), nearest=True) == full) > 0.9
    whole = predict.label_map(predict.predict_probs(model, image, "cpu", gate=True))
    assert np.array_equal(predict_image(model, image, "cpu", gate=True, max_side=250), whole)  # not resized


def test_rerun_resumes_and_other_settings_never_delete(model, tmp_path):
    images, out = make_folder(tmp_path / "photos"), tmp_path / "out"
    predict_folder(model, images, out, NAMES, device="cpu", max_side=64)
    (out / "masks" / "a.png").unlink()  # as if killed before it was written
    before = {p: p.stat().st_mtime_ns for p in (out / "masks").rglob("*.png")}
    predict_folder(model, images, out, NAMES, device="cpu", max_side=64)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items()) and (out / "masks" / "a.png").is_file()
    with pytest.raises(DatasetError, match="not empty and holds no predictions with these settings"):
        predict_folder(model, images, out, NAMES, device="cpu", max_side=64, options=PredictOptions(flip=True))
    assert {p for p in (out / "masks").rglob("*.png")} >= set(before)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(DatasetError, match="not empty"):
        predict_folder(model, images, mine, NAMES, device="cpu")
    assert (mine / "notes.txt").read_text() == "precious"


def test_bad_folders_are_refused_before_any_work(model, tmp_path):
    images = make_folder(tmp_path / "photos", {"a.jpg": (20, 20), "a.png": (20, 20)})
    with pytest.raises(DatasetError, match=r"a\.(jpg|png) and .*a\.(jpg|png): both would write"):
        predict_folder(model, images, tmp_path / "out", NAMES, device="cpu")
    (images / "a.png").unlink()
    with pytest.raises(DatasetError, match="overlap"):
        predict_folder(model, images, images / "masks", NAMES, device="cpu")
    (images / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"b\.jpg: cannot read image"):
        predict_folder(model, images, tmp_path / "out", NAMES, device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_on_a_trained_run(tiny_voc, tmp_path, capsys):
    """python -m wsss.predict --images on the final net of a (one-epoch) stage-3 run, no labels needed."""
    from test_stage3 import make_stage2  # pytest puts tests/ on sys.path

    from wsss import segment
    from wsss.run import common_parser

    outputs = tmp_path / "outputs"
    make_stage2(tiny_voc, outputs / "r")
    parser = common_parser("test")
    segment.add_args(parser)
    segment.run(parser.parse_args(["--data", str(tiny_voc), "--run", "r", "--outputs", str(outputs), "--device",
                                   "cpu", "--workers", "0", "--epochs", "1", "--batch-size", "2", "--crop", "32",
                                   "--weights", "none"]))
    images, out = make_folder(tmp_path / "photos"), tmp_path / "pred"
    argv = ["--run", "r", "--outputs", str(outputs), "--device", "cpu", "--images", str(images), "--out", str(out)]
    assert predict.main(argv + ["--overlay", "--crf", "--max-side", "64"]) == 0
    assert "wrote 4 masks" in capsys.readouterr().out
    index = io.read_json(out / "masks.json")
    assert index["classes"] == list(NAMES) and len(index["images"]) == 4
    assert (out / "overlays" / "sub" / "deeper" / "c d.png").is_file()
    assert io.read_json(out / "settings.json")["crf"] is not None
    assert predict.main(argv) == 1  # other settings into the same folder: refused
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main(argv[:-2])  # --images without --out


def test_a_crf_that_fails_is_an_error_naming_the_photo(model, tmp_path, monkeypatch):
    from wsss import crf
    from wsss.stage import StageError

    def crash(*args, **kwargs):
        raise RuntimeError("CRF broke")

    monkeypatch.setattr(crf, "dense_crf", crash)
    images, out = make_folder(tmp_path / "photos"), tmp_path / "out"
    with pytest.raises(StageError, match=r"photos/.*: the dense CRF failed \(RuntimeError: CRF broke\)"):
        predict_folder(model, images, out, NAMES, device="cpu", options=PredictOptions(crf=True), max_side=64)
    assert not list((out / "masks").rglob("*.png"))  # never the net's argmax passed off as a refined mask


@pytest.mark.parametrize("where", ["data", "data/masks", "outputs/r/stage3", "outputs/r/stage3/photos", "photos/m"])
def test_cli_out_stays_apart_from_the_dataset_the_photos_and_the_stage(tmp_path, where, capsys):
    data, stage = tmp_path / "data", tmp_path / "outputs" / "r" / "stage3"
    data.mkdir()
    io.write_json(stage / "config.json", {"val_split": "val", "data": str(data)})
    images = make_folder(tmp_path / "photos", {"a.jpg": (20, 20)})
    assert predict.main(["--outputs", str(tmp_path / "outputs"), "--run", "r", "--device", "cpu",
                         "--images", str(images), "--out", str(tmp_path / where)]) == 1
    assert "overlap; write the masks to a separate folder" in capsys.readouterr().err
    assert not (tmp_path / where / "masks").exists() and not (tmp_path / where / "settings.json").exists()


def test_cli_holds_the_stage_lock(tmp_path, capsys):
    """A stage 3 or wsss.predict already at work on the run: --images waits its turn, writes nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    stage = tmp_path / "outputs" / "r" / "stage3"
    io.write_json(stage / "config.json", {"val_split": "val", "data": str(tmp_path / "data")})
    images, out = make_folder(tmp_path / "photos", {"a.jpg": (20, 20)}), tmp_path / "out"
    hold = "import sys, time; from pathlib import Path; from wsss.stage import lock; " \
           "lock(Path(sys.argv[1]), 'test'); print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(stage)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert predict.main(["--outputs", str(tmp_path / "outputs"), "--run", "r", "--device", "cpu",
                             "--images", str(images), "--out", str(out)]) == 1
        assert f"already running here (pid {holder.pid})" in capsys.readouterr().err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("where", ["outputs/r/stage2/pseudo", "outputs/r/stage1", "outputs/r", "outputs"])
def test_cli_out_stays_apart_from_every_stage_of_the_run(tmp_path, where, capsys):
    data, run = tmp_path / "data", tmp_path / "outputs" / "r"
    data.mkdir()
    io.write_json(run / "stage3" / "config.json", {"val_split": "val", "data": str(data)})
    io.write_mask(run / "stage2" / "pseudo" / "x.png", np.zeros((2, 2), np.uint8))
    (run / "stage1").mkdir()
    images = make_folder(tmp_path / "photos", {"a.jpg": (20, 20)})
    assert predict.main(["--outputs", str(tmp_path / "outputs"), "--run", "r", "--device", "cpu",
                         "--images", str(images), "--out", str(tmp_path / where)]) == 1
    assert "overlap; write the masks to a separate folder" in capsys.readouterr().err
    assert not (tmp_path / where / "masks").exists() and not (tmp_path / where / "settings.json").exists()


def test_masks_of_changed_or_foreign_photos_are_redone(model, tmp_path):
    images, out = make_folder(tmp_path / "photos"), tmp_path / "out"
    predict_folder(model, images, out, NAMES, device="cpu", max_side=64, overlay=True)
    kept = {p: p.stat().st_mtime_ns for p in (out / "masks").rglob("*.png") if p.name != "a.png"}
    photo = np.zeros((30, 24, 3), np.uint8)
    photo[:, :12] = (220, 40, 40)
    Image.fromarray(photo).save(images / "a.jpg")  # the photo changed: another size, another mask
    result = predict_folder(model, images, out, NAMES, device="cpu", max_side=64, overlay=True)
    assert io.read_mask(out / "masks" / "a.png").shape == (30, 24) and result["images"]["a.jpg"]["size"] == [24, 30]
    assert io.read_image(out / "overlays" / "a.png").shape[1] == 24
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # the others were kept

    other = tmp_path / "other"  # another folder of photos with the same names
    rng = np.random.default_rng(5)
    for rel, (h, w) in PHOTOS.items():
        path = other / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h + 4, w, 3), dtype=np.uint8)).save(path, format=Image.open(
            images / rel).format)
    predict_folder(model, other, out, NAMES, device="cpu", max_side=64)
    fresh = predict_folder(model, other, tmp_path / "fresh", NAMES, device="cpu", max_side=64)
    for rel in PHOTOS:
        mask_rel = rel.rsplit(".", 1)[0] + ".png"
        mask = io.read_mask(out / "masks" / mask_rel)
        assert np.array_equal(mask, io.read_mask(tmp_path / "fresh" / "masks" / mask_rel)), rel
    assert io.read_json(out / "masks.json")["images"] == fresh["images"]
