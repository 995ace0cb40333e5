"""Stage 3 end to end on a tiny dataset with hand-made stage-2 artifacts (seconds on CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from wsss import io, predict, segment
from wsss.data.voc import VOCDataset
from wsss.methods import stc
from wsss.run import common_parser
from wsss.stage import StageError
from wsss.train import read_metrics

torch.set_num_threads(2)
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:efficientnet-lite0. no weights given")]


def make_stage2(root, run_dir):
    """stage2/pseudo (the ground truth with the object borders ignored), stage2/saliency (bright
    objects on a dark ground) and a manifest, as stage 2 would write them."""
    ds = VOCDataset(root, "train")
    stage2 = run_dir / "stage2"
    for id_ in ds.ids:
        mask = ds.mask(id_)
        io.write_mask(stage2 / "pseudo" / f"{id_}.png", mask)
        io.write_png(stage2 / "saliency" / f"{id_}.png", np.where(mask > 0, 230, 0).astype(np.uint8))
    io.write_manifest(stage2, {"hand-made": True, "crf_bi_sxy": 50.0, "crf_bi_srgb": 5.0})  # its CRF kernels
    return stage2


@pytest.fixture
def run(tiny_voc, tmp_path):
    """(function to run stage 3 with extra flags, outputs folder) on tiny_voc with stage 2 made."""
    outputs = tmp_path / "outputs"
    make_stage2(tiny_voc, outputs / "r")

    def go(*extra):
        parser = common_parser("test")
        segment.add_args(parser)
        args = parser.parse_args(["--data", str(tiny_voc), "--run", "r", "--outputs", str(outputs),
                                  "--device", "cpu", "--workers", "0", "--epochs", "2", "--batch-size", "2",
                                  "--crop", "32", "--weights", "none", *extra])
        return segment.run(args)

    return go, outputs / "r"


def check_predictions(folder, dataset):
    for id_ in dataset.ids:
        img = Image.open(folder / f"{id_}.png")
        assert img.mode == "P"
        assert img.size == Image.open(dataset.image_path(id_)).size
        assert np.asarray(img).max() < dataset.num_classes


def metrics_by_net(stage):
    lines = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    nets: dict[str, list[int]] = {}
    for r in lines:
        nets.setdefault(r["net"], []).append(r["epoch"])
        assert "val_miou" in r
    return nets


def test_psl_and_psl_plus_end_to_end(run, tiny_voc):
    go, run_dir = run
    result = go("--psl-plus")
    stage = run_dir / "stage3"
    assert 0 <= result["miou"] <= 100
    assert io.read_json(stage / "eval-nogate.json")["miou"] == result["miou"]
    manifest = io.read_json(stage / "manifest.json")
    assert manifest["complete"] and manifest["outputs"]["final_net"] == "psl-plus"
    assert metrics_by_net(stage) == {"psl": [1, 2], "psl-plus": [1, 2]}
    val, train = VOCDataset(tiny_voc, "val"), VOCDataset(tiny_voc, "train")
    check_predictions(stage / "pred-nogate", val)
    for id_ in train.ids:  # PSL+ targets: only the image's own classes (and background, and ignore)
        mask = io.read_mask(stage / "psl" / "train-crf" / f"{id_}.png")
        assert set(np.unique(mask)) <= {0, 255, *train.label_ids(id_).tolist()}
    for id_ in train.ids:  # the default --psl-plus-merge grow: stage 2's objects stay, the net's fill the rest
        net = io.read_mask(stage / "psl" / "train-crf" / f"{id_}.png")
        pseudo = io.read_mask(run_dir / "stage2" / "pseudo" / f"{id_}.png")
        grown = io.read_mask(stage / "psl" / "train-crf-grow" / f"{id_}.png")
        kept = (pseudo != 0) & (pseudo != 255) & ((net == 0) | (net == 255))
        assert (grown[kept] == pseudo[kept]).all()
        assert (grown[(net != 0) & (net != 255)] == net[(net != 0) & (net != 255)]).all()
    targets = io.read_json(stage / "psl" / "train-crf" / "settings.json")
    assert targets["crf"]["bi_sxy"] == 50.0 and targets["crf"]["bi_srgb"] == 5.0  # stage 2's kernels
    assert targets["scales"] == [0.75, 1.0, 1.25] and targets["flip"] and targets["ignore_below"] == 0.6
    assert go("--psl-plus") is None  # complete: skipped

    # python -m wsss.predict on the finished run, other settings: another folder, named by them
    before = {p.name: p.stat().st_mtime_ns for p in (stage / "pred-nogate").glob("*.png")}
    assert predict.main(["--run", "r", "--outputs", str(run_dir.parent), "--device", "cpu", "--workers", "0",
                         "--scales", "0.75", "1", "--flip", "--crf"]) == 0
    check_predictions(stage / "pred-s0.75_1-flip-crf-nogate", val)
    assert {p.name: p.stat().st_mtime_ns for p in (stage / "pred-nogate").glob("*.png")} == before
    assert io.read_json(stage / "pred-s0.75_1-flip-crf-nogate" / "settings.json")["flip"] is True


def test_stc_end_to_end_and_gt_upper_bound(run, tiny_voc):
    go, run_dir = run
    go("--method", "stc", "--tag", "stc", "--epochs", "1")
    stage = run_dir / "stage3-stc"
    train, val = VOCDataset(tiny_voc, "train"), VOCDataset(tiny_voc, "val")
    simple = (stage / "stc" / "simple.txt").read_text().split()
    assert simple == [i for i in train.ids if train.labels(i).sum() == 1]
    assert sorted(p.stem for p in (stage / "stc" / "i" / "pred").glob("*.png")) == sorted(simple)
    assert sorted(p.stem for p in (stage / "stc" / "e" / "pred").glob("*.png")) == sorted(train.ids)
    for id_ in train.ids:
        mask = io.read_mask(stage / "stc" / "e" / "pred" / f"{id_}.png")
        assert set(np.unique(mask)) <= {0, 255, *train.label_ids(id_).tolist()}
    # the same SGD budget for every net (--epochs 1 over the 4 training images, batch 2: 2 steps),
    # so I and E, on the 3 simple images alone (1 step an epoch), get 2 epochs and P 1
    assert len(simple) == 3
    assert metrics_by_net(stage) == {"stc/i": [1, 2], "stc/e": [1, 2], "stc/p": [1]}
    assert {net: read_metrics(stage / net)[-1]["steps"] for net in ("stc/i", "stc/e", "stc/p")} == \
        {"stc/i": 2, "stc/e": 2, "stc/p": 2}
    check_predictions(stage / "pred-nogate", val)
    assert not (run_dir / "stage3").exists()  # a tagged variant leaves the default folder alone
    # every step can be scored: python -m wsss.predict --net names a net the stage trained
    argv = ["--run", "r", "--outputs", str(run_dir.parent), "--tag", "stc", "--device", "cpu", "--workers", "0"]
    assert predict.main(argv + ["--net", "stc/i"]) == 0
    check_predictions(stage / "pred-stc-i-nogate", val)
    made_by = io.read_json(stage / "pred-stc-i-nogate" / "settings.json")["checkpoint"]
    assert made_by == io.fingerprint(stage / "stc" / "i" / "checkpoint.pt") != \
        io.read_json(stage / "pred-nogate" / "settings.json")["checkpoint"]
    assert predict.main(argv + ["--net", "stc/x"]) == 1
    assert not (stage / "pred-stc-x-nogate").exists()
    # the table of issue 13: each step's targets over the images it trains on, and its val mIoU
    from bench import bench_methods

    result = bench_methods.measure(bench_methods.build_parser().parse_args(
        ["--run", "r", "--outputs", str(run_dir.parent), "--stc", "stc", "--workers", "1"]))
    rows = {r["folder"]: r["runs"][0] for r in result["rows"]}
    assert {net: r["targets"]["images"] for net, r in rows.items()} == \
        {"stc/i": len(simple), "stc/e": len(simple), "stc/p": len(train.ids)}
    check_predictions(stage / "pred-stc-e-nogate", val)
    assert rows["stc/p"]["val_miou"] == io.read_json(stage / "eval-nogate.json")["miou"]

    go("--masks", "gt", "--tag", "gt", "--epochs", "1")
    assert metrics_by_net(run_dir / "stage3-gt") == {"gt": [1]}
    assert "miou" in io.read_json(run_dir / "stage3-gt" / "eval-nogate.json")


def test_resume_after_a_kill_redoes_only_what_was_unfinished(run, monkeypatch):
    go, run_dir = run
    real_step = stc.ce_step

    def killed_in_second_epoch_of_e(model, batch, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_step(model, batch, epoch)

    monkeypatch.setattr(stc, "ce_step", killed_in_second_epoch_of_e)
    with pytest.raises(KeyboardInterrupt):
        go("--method", "stc", "--stc-steps", "2", "--stc-iters", "2")
    monkeypatch.setattr(stc, "ce_step", real_step)
    stage = run_dir / "stage3"
    done = {p: p.stat().st_mtime_ns for p in [stage / "stc" / "i" / "checkpoint.pt",
                                              *(stage / "stc" / "i" / "pred").glob("*.png")]}
    e_epoch1 = (stage / "stc" / "e" / "metrics.jsonl").read_text()
    assert [r["epoch"] for r in read_metrics(stage / "stc" / "e")] == [1]

    go("--method", "stc", "--stc-steps", "2", "--stc-iters", "2")
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # I-DCNN and its predictions kept
    e_text = (stage / "stc" / "e" / "metrics.jsonl").read_text()
    assert e_text.startswith(e_epoch1)  # E resumed at epoch 2
    assert [r["epoch"] for r in read_metrics(stage / "stc" / "e")] == [1, 2]
    assert io.read_json(stage / "manifest.json")["outputs"]["final_net"] == "stc/e"


def test_changed_config_stops_and_force_removes_only_what_the_stage_wrote(run):
    go, run_dir = run
    go("--epochs", "1", "--lr", "0.005")
    stage = run_dir / "stage3"
    (stage / "psl" / "mine.txt").write_text("a user's file in a folder stage 3 writes")
    (stage / "notes.txt").write_text("a user's file")
    checkpoint = (stage / "psl" / "checkpoint.pt").read_bytes()
    with pytest.raises(StageError, match=r"(?s)--lr: 0\.005 -> 0\.02.*--force.*another --run"):
        go("--epochs", "1", "--lr", "0.02")
    assert (stage / "psl" / "checkpoint.pt").read_bytes() == checkpoint  # nothing touched
    go("--epochs", "1", "--lr", "0.02", "--force")
    # what stage 3 wrote is redone; a file it did not write stays, whatever folder it lies in
    assert (stage / "psl" / "mine.txt").is_file() and (stage / "notes.txt").read_text() == "a user's file"
    assert (stage / "psl" / "checkpoint.pt").read_bytes() != checkpoint
    assert io.read_json(stage / "manifest.json")["config"]["lr"] == 0.02


def test_a_run_records_its_methods_flags_and_accepts_a_flag_added_since_at_its_default(run):
    """Changing another method's flag (--stc-*) leaves a finished PSL run valid; an older run's
    record without a flag added since (here --psl-plus-merge) is the same settings at the flag's
    default, and another value still refuses it."""
    go, run_dir = run
    go("--epochs", "1")
    stage = run_dir / "stage3"
    config = io.read_json(stage / "stage.json")["config"]
    assert "psl_online" in config and "method" in config and not any(k.startswith("stc_") for k in config)
    assert go("--epochs", "1", "--stc-steps", "1", "--stc-iters", "5") is None  # skipped: complete
    stamp = io.read_json(stage / "stage.json")  # as an older version wrote it: every method's flags,
    stamp["config"] = {**{k: v for k, v in stamp["config"].items() if k != "psl_plus_merge"},  # not this one
                       "stc_steps": 2, "stc_iters": 7}
    io.write_json(stage / "stage.json", stamp)
    checkpoint = (stage / "psl" / "checkpoint.pt").read_bytes()
    assert go("--epochs", "1", "--stc-steps", "3") is None
    with pytest.raises(StageError, match=r"(?s)--psl-plus-merge: \(unset\) -> fill.*--force"):
        go("--epochs", "1", "--psl-plus-merge", "fill")
    with pytest.raises(StageError, match=r"--lr: 0\.0025 -> 0\.02"):
        go("--epochs", "1", "--lr", "0.02")
    assert (stage / "psl" / "checkpoint.pt").read_bytes() == checkpoint  # nothing touched


def test_predict_split_restricts_skips_and_redoes(tiny_voc, tmp_path):
    from wsss.models.segnet import build_segnet

    torch.manual_seed(0)
    model = build_segnet("efficientnet-lite0", 4, cls_branch=True, weights=None).eval()
    train = VOCDataset(tiny_voc, "train")
    out = tmp_path / "pred"
    predict.predict_split(model, train, train.ids, out, device="cpu",
                          options=predict.PredictOptions(restrict=True, gate=True))
    check_predictions(out, train)
    for id_ in train.ids:
        assert set(np.unique(io.read_mask(out / f"{id_}.png"))) <= {0, *train.label_ids(id_).tolist()}
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    predict.predict_split(model, train, train.ids, out, device="cpu",
                          options=predict.PredictOptions(restrict=True, gate=True))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == first  # same settings: skipped
    predict.predict_split(model, train, train.ids, out, device="cpu",
                          options=predict.PredictOptions(restrict=True, gate=True, flip=True))
    assert all((out / n).stat().st_mtime_ns != t for n, t in first.items())  # other settings: redone
    plain = build_segnet("efficientnet-lite0", 4, weights=None).eval()
    with pytest.raises(ValueError, match="classification branch"):
        predict.predict_split(plain, train, train.ids[:1], tmp_path / "p2", device="cpu",
                              options=predict.PredictOptions(gate=True))


def test_images_without_a_pseudo_mask_are_skipped(run, tiny_voc):
    go, run_dir = run
    first = VOCDataset(tiny_voc, "train").ids[0]
    (run_dir / "stage2" / "pseudo" / f"{first}.png").unlink()
    go("--epochs", "1")
    log = (run_dir / "stage3" / "stage3.log").read_text()
    assert f"1 of 4 training images have no pseudo-mask and are skipped ({first})" in log
    assert "psl: training on 3 images" in log


def test_a_registered_method_runs(run, tiny_voc):
    """A third party's method: one registration in wsss.methods.METHODS, no other change; --method
    offers it and stage 3 runs it, predicts with its final net and scores it."""
    from wsss.methods import METHODS, register
    from wsss.segtrain import SegmentationTrainSet, ce_step

    def one_epoch_on_gt(ctx):
        trainset = SegmentationTrainSet(ctx.train, ctx.train.ids, ctx.args.crop)
        ctx.train_net("mine/net", trainset, ce_step, epochs=ctx.args.mine_epochs)
        return "mine/net"

    def add_args(p):
        p.add_argument("--mine-epochs", type=int, default=1)

    register("mine", reads="masks", folders=("mine",), args=add_args)(one_epoch_on_gt)
    try:
        go, run_dir = run
        result = go("--method", "mine", "--tag", "mine")
        stage = run_dir / "stage3-mine"
        assert metrics_by_net(stage) == {"mine/net": [1]}  # its own budget, not --epochs 2
        assert io.read_json(stage / "manifest.json")["outputs"]["final_net"] == "mine/net"
        assert io.read_json(stage / "eval-nogate.json")["miou"] == result["miou"]
        check_predictions(stage / "pred-nogate", VOCDataset(tiny_voc, "val"))
        with pytest.raises(SystemExit):  # without the entry, --method mine is not a choice
            del METHODS["mine"]
            go("--method", "mine")
    finally:
        METHODS.pop("mine", None)


def test_self_training_targets_ignore_unsure_pixels_and_crf_changes(tiny_voc, tmp_path):
    """predict_split with PredictOptions(ignore_below=t): 255 where the net's largest probability over the image's
    classes is below t, and with the CRF where the CRF changed the net's label; elsewhere the net's label."""
    from wsss.models.segnet import build_segnet

    torch.manual_seed(0)
    model = build_segnet("efficientnet-lite0", 4, weights=None).eval()
    train = VOCDataset(tiny_voc, "train")

    def masks(name, **kw):
        predict.predict_split(model, train, train.ids, tmp_path / name, device="cpu",
                              options=predict.PredictOptions(restrict=True, **kw))
        return {i: io.read_mask(tmp_path / name / f"{i}.png") for i in train.ids}

    plain, sure, none = masks("plain"), masks("t0", ignore_below=0.0), masks("t1", ignore_below=1.01)
    some = masks("t-mid", ignore_below=0.5)
    for i in train.ids:
        np.testing.assert_array_equal(sure[i], plain[i])  # no pixel is below 0
        assert (none[i] == 255).all()  # every pixel is below 1.01
        kept = some[i] != 255
        np.testing.assert_array_equal(some[i][kept], plain[i][kept])
    pytest.importorskip("pydensecrf.densecrf")
    crf, agree = masks("crf", crf=True), masks("crf-t0", crf=True, ignore_below=0.0)
    for i in train.ids:
        np.testing.assert_array_equal(agree[i], np.where(crf[i] != plain[i], 255, plain[i]))


def test_predict_refuses_a_dataset_whose_classes_changed_since_stage3(run, tiny_voc, capsys):
    """The run's dataset with its class order reversed: every class would be named wrongly."""
    go, run_dir = run
    go("--epochs", "1")
    argv = ["--run", "r", "--outputs", str(run_dir.parent), "--device", "cpu", "--workers", "0", "--flip"]
    names = (tiny_voc / "class_names.txt").read_text().split()
    (tiny_voc / "class_names.txt").write_text("\n".join([names[0], *reversed(names[1:])]) + "\n")
    assert predict.main(argv) == 1
    assert "class names differ" in capsys.readouterr().err
    assert not (run_dir / "stage3" / "pred-flip-nogate").exists()
