"""Run safety (issue 11): no rerun, flag, race or path loses or corrupts work; bad input is found
up front with a clear error. Each numbered case of the issue has its tests here, on stage 2 over
hand-made stage-1 regions (a second a run) unless the case is about another stage."""
from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_stage2 import make_saliency, make_stage1, stage2_main
from test_stage3 import make_stage2

from wsss import crf, erasing, io, predict, pseudo, segment
from wsss.cam import load_cams
from wsss.data.voc import DatasetError, VOCDataset
from wsss.run import common_parser
from wsss.scoremaps import stored_size
from wsss.stage import StageError, lock, release

pytest.importorskip("pydensecrf.densecrf")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*(no weights given|randomly initialised)")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def s2(tmp_path, tiny_voc_factory):
    """(data, outputs/r/stage2, run(*flags)) with stage-1 regions made by hand."""
    data = tiny_voc_factory("data", n_train=4, n_val=1, unlabelled=1)
    outputs = tmp_path / "outputs"
    make_stage1(data, outputs / "r")
    saliency = make_saliency(data, tmp_path / "saliency")

    def run(*extra, run_name="r"):
        return stage2_main()(["--data", str(data), "--outputs", str(outputs), "--run", run_name, "--workers", "1",
                              "--saliency", str(saliency), "--sample", "2", "--device", "cpu", *extra])

    return data, outputs / "r" / "stage2", run


def stamps(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.suffix != ".log" and p.name != ".lock"}


# ---------------------------------------------------------------- 1. a changed flag never deletes silently

def test_runtime_flags_never_invalidate_a_finished_stage(s2):
    data, stage, run = s2
    run()
    before = stamps(stage)
    run("--sample", "1", "--workers", "2", "--device", "auto")
    assert stamps(stage) == before
    assert "skipping" in (stage / "stage2.log").read_text()


def test_changed_artifact_flag_stops_names_the_difference_and_force_keeps_foreign_files(s2):
    data, stage, run = s2
    run()
    (stage / "my_notes.txt").write_text("a user's file")
    before = stamps(stage)
    with pytest.raises(SystemExit) as e:
        run("--bg-threshold", "0.3")
    message = str(e.value)
    assert "--bg-threshold: 0.1 -> 0.3" in message and "--force" in message and "another --run" in message
    assert stamps(stage) == before  # stopped before touching anything
    run("--bg-threshold", "0.3", "--force")
    assert "--force: removing" in (stage / "stage2.log").read_text()
    assert (stage / "my_notes.txt").read_text() == "a user's file"
    assert io.read_json(stage / "manifest.json")["config"]["bg_threshold"] == 0.3


def test_stage1_overlays_and_device_are_runtime(tmp_path, tiny_voc_factory):
    from test_stage1 import run_stage1

    data = tiny_voc_factory("data", n_train=2, n_val=0)
    stage = run_stage1(data, tmp_path / "out", "--ae-steps", "1")
    before = stamps(stage)
    run_stage1(data, tmp_path / "out", "--ae-steps", "1", "--overlays", "3", "--device", "auto")
    assert stamps(stage) == before


def stage3_runner(tiny_voc, outputs):
    def go(*extra):
        parser = common_parser("test")
        segment.add_args(parser)
        return segment.run(parser.parse_args(
            ["--data", str(tiny_voc), "--run", "r", "--outputs", str(outputs), "--device", "cpu", "--workers", "0",
             "--epochs", "1", "--batch-size", "2", "--crop", "32", "--weights", "none", *extra]))
    return go


def test_stage3_test_time_flags_keep_the_nets_byte_for_byte(tiny_voc, tmp_path):
    outputs = tmp_path / "outputs"
    make_stage2(tiny_voc, outputs / "r")
    go = stage3_runner(tiny_voc, outputs)
    go()
    stage = outputs / "r" / "stage3"
    (stage / "my_notes.txt").write_text("a user's file")
    checkpoint = (stage / "psl" / "checkpoint.pt").read_bytes()
    pred = stamps(stage / "pred-nogate")
    go("--scales", "1.0", "0.5", "--flip", "--gate", "on")
    go("--crf")
    assert (stage / "psl" / "checkpoint.pt").read_bytes() == checkpoint
    assert stamps(stage / "pred-nogate") == pred and (stage / "my_notes.txt").is_file()
    manifest = io.read_json(stage / "manifest.json")
    assert set(manifest["outputs"]["predictions"]) == {"pred-nogate", "pred-s1_0.5-flip", "pred-crf-nogate"}
    assert (stage / "eval-crf-nogate.json").is_file()
    assert len(list((stage / "pred-s1_0.5-flip").glob("*.png"))) == 2
    assert go("--crf") is None  # that prediction done too: skipped


# ---------------------------------------------------------------- 2. changed data

@pytest.mark.parametrize("edit, what", [
    ("labels", "labels"), ("image", "images"), ("class names", "class names"), ("stage 1", "stage1")])
def test_changed_inputs_stop_a_finished_stage(s2, edit, what):
    data, stage, run = s2
    run()
    ds = VOCDataset(data, "train")
    if edit == "labels":
        labels = np.load(data / "cls_labels.npy", allow_pickle=True).item()
        labels[ds.ids[1]] = 1 - labels[ds.ids[1]]
        np.save(data / "cls_labels.npy", labels)
    elif edit == "image":
        path = ds.image_path(ds.ids[2])
        Image.fromarray(io.read_image(path)[::-1]).save(path, quality=80)
    elif edit == "class names":
        (data / "class_names.txt").write_text("background\ncircle\nsquare\nbar\n")
    else:  # stage 1 redone
        io.write_manifest(stage.parent / "stage1", {"hand-made": True, "again": 1})
    before = stamps(stage)
    with pytest.raises(SystemExit, match=rf"(?s)Inputs changed.*\b{what}\b.*--force"):
        run()
    assert stamps(stage) == before


# ---------------------------------------------------------------- 3. one process per stage folder

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from wsss.stage import lock
    lock(Path(sys.argv[1]), "test")
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_process_on_the_same_stage_is_refused_and_a_killed_one_leaves_no_lock(s2):
    data, stage, run = s2
    stage.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(stage)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"already running here \(pid {holder.pid}\)"):
            run()
        assert not (stage / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run()  # the kernel dropped the dead holder's lock
    assert io.read_json(stage / "manifest.json")["complete"]


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    lock(tmp_path, "x")
    lock(tmp_path, "x")  # a stage run again in the same process (tests, notebooks)
    release(tmp_path)
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


# ---------------------------------------------------------------- 4. paths stay inside

@pytest.mark.parametrize("flags", [("--run", "../x"), ("--run", "a/b"), ("--run", ".."), ("--tag", "../../../../x")])
def test_run_and_tag_must_be_plain_names(tiny_voc, tmp_path, flags, capsys):
    parser = common_parser("test")
    segment.add_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", str(tiny_voc), "--outputs", str(tmp_path / "o"), *flags])
    assert "letters, digits and -_. only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main(["--outputs", str(tmp_path / "o"), *flags])
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad", ["../../somewhere/img", "/etc/passwd", "..", "a/b"])
def test_list_ids_must_be_plain_names(tiny_voc, bad):
    (tiny_voc / "ImageSets/Segmentation/train.txt").write_text(f"tiny_000\n{bad}\n")
    with pytest.raises(DatasetError, match=r"train\.txt: line 2: .* not a plain image id"):
        VOCDataset(tiny_voc, "train")


def test_predict_out_must_stay_inside_the_run(tmp_path, capsys):
    stage = tmp_path / "o" / "r" / "stage3"
    io.write_json(stage / "config.json", {"val_split": "val", "data": str(tmp_path)})
    assert predict.main(["--outputs", str(tmp_path / "o"), "--run", "r", "--out", str(tmp_path / "elsewhere")]) == 1
    assert "outside the run's folder" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


# ---------------------------------------------------------------- 5. a CRF that cannot run is an error

def test_missing_pydensecrf_fails_stage2_unless_no_crf(s2, monkeypatch):
    data, stage, run = s2

    def missing():
        raise ImportError("the dense CRF needs pydensecrf: pip install pydensecrf2")

    monkeypatch.setattr(crf, "_densecrf", missing)
    with pytest.raises(SystemExit, match="pydensecrf.*--no-crf"):
        run()
    assert not (stage / "manifest.json").exists()
    run("--no-crf")
    assert io.read_json(stage / "manifest.json")["config"]["crf"] is False


def test_a_crf_that_crashes_fails_stage2_and_is_never_marked_complete(s2, monkeypatch):
    data, stage, run = s2

    def crash(*args, **kwargs):
        raise RuntimeError("segfault-like failure")

    monkeypatch.setattr(pseudo, "refine", crash)
    with pytest.raises(SystemExit, match="failed on 3 of 4 images.*segfault-like") as e:
        run()
    assert "a rerun does the rest" not in str(e.value)
    assert not (stage / "manifest.json").exists()
    assert not list((stage / "pseudo").glob("*.png"))[1:]  # only the unlabelled image's all-background mask
    monkeypatch.undo()
    run()
    assert io.read_json(stage / "manifest.json")["complete"]


def test_test_time_crf_failure_is_an_error(tiny_voc, tmp_path, monkeypatch):
    from wsss.models.segnet import build_segnet

    torch.manual_seed(0)
    model = build_segnet("efficientnet-lite0", 4, weights=None).eval()
    ds = VOCDataset(tiny_voc, "val")

    def crash(*args, **kwargs):
        raise RuntimeError("CRF broke")

    monkeypatch.setattr(crf, "dense_crf", crash)
    with pytest.raises(StageError, match="dense CRF failed on tiny_004.*CRF broke"):
        predict.predict_split(model, ds, ds.ids, tmp_path / "pred", device="cpu",
                              options=predict.PredictOptions(crf=True))
    assert not list((tmp_path / "pred").glob("*.png"))


# ---------------------------------------------------------------- 6. bad input, up front

def write_list(data: Path, text: bytes) -> None:
    (data / "ImageSets/Segmentation/train.txt").write_bytes(text)


@pytest.mark.parametrize("content, message", [
    (b"tiny_000\ntiny_001\ntiny_000\n", r"line 3: 'tiny_000' is listed twice \(first on line 1\)"),
    (b"\xef\xbb\xbftiny_000\ntiny_001\n", r"byte-order mark"),
    (b"tiny_000\nmy photo\n", r"line 2: 'my photo' is not a plain image id .*no spaces"),
])
def test_bad_lists_are_clear_errors(tiny_voc, content, message):
    write_list(tiny_voc, content)
    with pytest.raises(DatasetError, match=message):
        VOCDataset(tiny_voc, "train")


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0])
def test_labels_outside_0_1_are_an_error_before_any_work(s2, value):
    data, stage, run = s2
    labels = np.load(data / "cls_labels.npy", allow_pickle=True).item()
    first = sorted(labels)[0]
    labels[first] = np.array([value, 0, 0], np.float32)
    np.save(data / "cls_labels.npy", labels)
    with pytest.raises(SystemExit, match=rf"cls_labels\.npy: labels of '{first}' hold \[{value}\]"):
        run()
    assert not stage.exists()


def test_missing_image_is_an_error_before_any_work(s2):
    data, stage, run = s2
    (data / "JPEGImages" / "tiny_001.jpg").unlink()
    with pytest.raises(SystemExit, match=r"tiny_001\.jpg: image not found \(listed in .*train\.txt\)"):
        run()
    assert not stage.exists()


def test_stage2_out_of_range_ground_truth_names_the_file(s2):
    data, stage, run = s2
    path = data / "SegmentationClassAug" / "tiny_001.png"
    mask = io.read_mask(path).copy()
    mask[0, 0] = 9
    io.write_mask(path, mask)
    with pytest.raises(SystemExit, match=r"tiny_001\.png: .*9"):
        run()
    assert not (stage / "manifest.json").exists()


def disk_full_for(monkeypatch, name: str) -> None:
    """Make every write of a file whose path holds `name` fail as on a full disk (at its fsync)."""
    real = os.fsync

    def full(fd):
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)


def test_full_disk_is_one_clear_line(s2, monkeypatch):
    data, stage, run = s2
    disk_full_for(monkeypatch, "pseudo")
    with pytest.raises(SystemExit, match=r"^error: .*cannot write \S*pseudo/tiny_\d+\.png: No space left on device"):
        run()
    assert not (stage / "manifest.json").exists()


def test_stage1_on_a_full_disk_names_the_checkpoint_and_the_cause(tmp_path, tiny_voc_factory, monkeypatch):
    from test_stage1 import run_stage1

    data = tiny_voc_factory("data", n_train=2, n_val=0)
    disk_full_for(monkeypatch, "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"^error: cannot write \S*step1/checkpoint\.pt: No space left on device$"):
        run_stage1(data, tmp_path / "out", "--ae-steps", "1")
    assert not (tmp_path / "out" / "r" / "stage1" / "manifest.json").exists()


def test_checkpoint_on_a_full_disk_says_no_space(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device.*c\.pt") as e:
        io.save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(3)})
    assert e.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", [("--epochs", "0"), ("--batch-size", "0"), ("--crop", "0"), ("--scales", "0"),
                                  ("--scales", "1", "-0.5")])
def test_stage3_ranges_are_checked_by_argparse(tiny_voc, flag, capsys):
    parser = common_parser("test")
    segment.add_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", str(tiny_voc), *flag])
    assert "expected a positive" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [("--epochs", "0"), ("--batch-size", "0"), ("--crop", "0"), ("--cam-scales", "0"),
                                  ("--max-side", "0")])
def test_stage1_ranges_are_checked_by_argparse(flag):
    parser = erasing.add_args(common_parser("test"))
    with pytest.raises(SystemExit):
        parser.parse_args(list(flag))


def test_large_images_are_downscaled_for_cams_and_their_cams_upscaled(tiny_voc, tmp_path):
    from wsss.models.classifier import build_classifier

    torch.manual_seed(0)
    model = build_classifier("efficientnet-lite0", 3, weights=None).eval()
    ds = VOCDataset(tiny_voc, "train")
    ids = ds.ids[:1]
    job = erasing.CamJob(ds, frozenset(ids), tmp_path / "step1", (), (1.0,), False, 0.7, max_side=24)
    erasing.write_cams(model, job, ids, torch.device("cpu"))
    h, w = ds.image(ids[0]).shape[:2]
    with np.load(tmp_path / "step1" / "cam" / f"{ids[0]}.npz") as f:  # stored for the full-size image
        assert f["cam"].shape[1:] == stored_size((h, w))
    cam, _ = load_cams(tmp_path / "step1" / "cam", ids[0], expected_shape=(h, w))
    assert cam.shape[1:] == (h, w)
    assert erasing.fit_side(np.zeros((300, 4000, 3), np.uint8), 1000).shape == (75, 1000, 3)


# ---------------------------------------------------------------- 7. file modes

def test_artifacts_follow_the_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    io.write_mask(tmp_path / "m.png", np.zeros((2, 2), np.uint8))
    io.save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(1)})
    for name in ("m.png", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("where, flags", [
    ("stage2/pseudo", ("--split", "train")), ("stage2", ()), ("stage1/regions", ()), (".", ()),
    ("stage3", ()), ("stage3/psl", ()), ("stage3/pred", ("--flip",)), ("stage3-b/pred", ()),
    ("stage3/pred/sub", ()), ("..", ())])
def test_predict_out_never_points_into_a_stage_folder(tmp_path, capsys, where, flags):
    run = tmp_path / "o" / "r"
    io.write_json(run / "stage3" / "config.json", {"val_split": "val", "data": str(tmp_path)})
    for folder in ("stage1/regions", "stage2/pseudo", "stage3/psl", "stage3/pred", "stage3-b/pred"):
        io.write_mask(run / folder / "x.png", np.zeros((2, 2), np.uint8))
    before = stamps(tmp_path / "o")
    assert predict.main(["--outputs", str(tmp_path / "o"), "--run", "r", "--out", str(run / where), *flags]) == 1
    err = capsys.readouterr().err
    assert "stage folder" in err or "outside the run's folder" in err, err
    assert stamps(tmp_path / "o") == before


@pytest.mark.parametrize("where, flags", [(None, ()), ("stage3/pred-flip-nogate", ("--flip",)), ("mine", ())])
def test_predict_out_in_its_own_folder_is_accepted(tmp_path, capsys, where, flags):
    run = tmp_path / "o" / "r"
    io.write_json(run / "stage3" / "config.json", {"val_split": "val", "data": str(tmp_path)})
    out = () if where is None else ("--out", str(run / where))
    assert predict.main(["--outputs", str(tmp_path / "o"), "--run", "r", *out, *flags]) == 1
    assert "no final net recorded" in capsys.readouterr().err  # past the checks on --out


# ---------------------------------------------------------------- --force removes what the stage wrote, only

def users_files(stage: Path, names) -> dict:
    """Write a user's file at each relative name (a name ending in '/' is a folder holding one)."""
    files = {}
    for name in names:
        path = stage / name / "notes.txt" if name.endswith("/") else stage / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"a user's {name}")
        files[path] = path.read_text()
    return files


def test_force_keeps_a_users_files_among_stage2s_folders(s2):
    data, stage, run = s2
    run()
    mine = users_files(stage, ["pseudo/README.txt", "fused/", "overlay.txt", "saliency-old/"])
    written = sorted(p.name for p in (stage / "pseudo").glob("*.png"))
    run("--bg-threshold", "0.3", "--force")
    assert all(p.read_text() == text for p, text in mine.items())
    assert sorted(p.name for p in (stage / "pseudo").glob("*.png")) == written
    assert io.read_json(stage / "manifest.json")["config"]["bg_threshold"] == 0.3


def test_force_keeps_a_users_files_among_stage1s_folders(tmp_path, tiny_voc_factory):
    from test_stage1 import run_stage1

    data = tiny_voc_factory("data", n_train=2, n_val=0)
    stage = run_stage1(data, tmp_path / "out", "--ae-steps", "1")
    mine = users_files(stage, ["step_notes.txt", "stepwise_experiments/", "regions/README.txt", "step1/mine.txt"])
    run_stage1(data, tmp_path / "out", "--ae-steps", "1", "--force", "--ae-threshold", "0.5")
    assert all(p.read_text() == text for p, text in mine.items())
    assert io.read_json(stage / "manifest.json")["config"]["ae_threshold"] == 0.5
    assert len(list((stage / "regions").glob("*.npz"))) == 2


def test_force_keeps_a_users_prediction_folder_in_stage3(tiny_voc, tmp_path):
    outputs = tmp_path / "outputs"
    make_stage2(tiny_voc, outputs / "r")
    go = stage3_runner(tiny_voc, outputs)
    go()
    stage = outputs / "r" / "stage3"
    mine = users_files(stage, ["pred-by-hand/", "eval-mine.json", "psl/notes.txt"])
    go("--force", "--lr", "0.005")
    assert all(p.read_text() == text for p, text in mine.items())
    assert len(list((stage / "pred-nogate").glob("*.png"))) == 2


# ---------------------------------------------------------------- stale results

@pytest.mark.parametrize("source", ["masks", "annotations"])
def test_labels_read_from_masks_or_annotations_are_inputs_of_stage1(tmp_path, tiny_voc_factory, source):
    from test_stage1 import run_stage1

    data = tiny_voc_factory("data", n_train=2, n_val=0)
    (data / "cls_labels.npy").unlink()
    first = VOCDataset(data, "train").ids[0]
    if source == "annotations":
        import shutil

        shutil.rmtree(data / "SegmentationClassAug")
        (data / "Annotations").mkdir()
        for id_ in VOCDataset(data, "train").ids:
            (data / "Annotations" / f"{id_}.xml").write_text(
                "<annotation><object><name>disc</name></object></annotation>")
    stage = run_stage1(data, tmp_path / "out", "--ae-steps", "1")
    before = stamps(stage)
    if source == "masks":  # a class painted into the mask: another image label
        path = data / "SegmentationClassAug" / f"{first}.png"
        mask = io.read_mask(path).copy()
        mask[:4, :4] = 3 if 3 not in mask else 2
        io.write_mask(path, mask)
    else:
        (data / "Annotations" / f"{first}.xml").write_text(
            "<annotation><object><name>disc</name></object><object><name>bar</name></object></annotation>")
    with pytest.raises(SystemExit,
                       match=rf"(?s)Inputs changed.*{'label masks' if source == 'masks' else 'annotations'}"):
        run_stage1(data, tmp_path / "out", "--ae-steps", "1")
    assert stamps(stage) == before


def test_force_on_stage2_is_refused_while_stage3_runs_on_it(s2):
    data, stage, run = s2
    run()
    stage3 = stage.parent / "stage3"
    stage3.mkdir()
    before = stamps(stage)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(stage3)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"stage3: .*running .*\(pid {holder.pid}\).*--force"):
            run("--bg-threshold", "0.3", "--force")
        assert stamps(stage) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run("--bg-threshold", "0.3", "--force")
    assert io.read_json(stage / "manifest.json")["config"]["bg_threshold"] == 0.3
    lock(stage3, "stage 3")  # stage 2 let go of the downstream lock when it finished
    release(stage3)


# ---------------------------------------------------------------- smaller things

def test_temp_files_of_a_killed_write_are_cleaned_on_the_next_run(s2):
    data, stage, run = s2
    run()
    leftovers = [stage / "pseudo" / ".tiny_001.png.k2j_9x0a.tmp", stage / ".manifest.json.abcdefgh.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    mine = [stage / "notes.tmp", stage / "pseudo" / ".my.draft.tmp", stage.parent / ".x.png.abcdefgh.tmp"]
    for path in mine:
        path.write_text("a user's file")
    run()  # complete: skipped, and tidied
    assert not any(p.exists() for p in leftovers)
    assert all(p.read_text() == "a user's file" for p in mine)


@pytest.mark.parametrize("spelling", ["./data", "data/", "{abs}", "./data/../data"])
def test_another_spelling_of_the_same_data_folder_is_no_change(s2, monkeypatch, spelling):
    data, stage, run = s2
    monkeypatch.chdir(data.parent)
    run("--data", "data")
    before = stamps(stage)
    run("--data", spelling.format(abs=data))
    assert stamps(stage) == before
    assert (stage / "stage2.log").read_text().count("skipping") == 1


def test_a_stamp_of_an_older_version_stays_valid(s2, monkeypatch):
    from wsss.stage import STAMP, dataset_inputs, fingerprints

    data, stage, run = s2
    monkeypatch.chdir(data.parent)
    run("--sample", "0", "--data", "data")  # a relative path: its stat fingerprints differ between versions
    (stage / "manifest.json").unlink()  # unfinished: it must resume, not stop with "changed inputs"
    stamp = io.read_json(stage / STAMP)
    ds = VOCDataset("data", "train")
    assert fingerprints(dataset_inputs(ds, masks=True), legacy=True)["images"] != stamp["inputs"]["images"]
    old = fingerprints(dataset_inputs(ds, masks=True), legacy=True)
    stamp["inputs"] = {k: old.get(k, v) for k, v in stamp["inputs"].items()}
    stamp.pop("version", None)
    io.write_json(stage / STAMP, stamp)
    run("--sample", "0", "--data", "data")
    assert io.read_json(stage / "manifest.json")["complete"]


def test_a_list_file_saved_with_crlf_is_no_change(s2):
    data, stage, run = s2
    run()
    before = stamps(stage)
    path = data / "ImageSets/Segmentation/train.txt"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    run()
    assert stamps(stage) == before


def test_a_val_image_without_ground_truth_is_a_warning_naming_it(tiny_voc, tmp_path):
    outputs = tmp_path / "outputs"
    make_stage2(tiny_voc, outputs / "r")
    missing = VOCDataset(tiny_voc, "val").ids[1]
    (tiny_voc / "SegmentationClassAug" / f"{missing}.png").unlink()
    stage3_runner(tiny_voc, outputs)()
    log = (outputs / "r" / "stage3" / "stage3.log").read_text()
    assert any("WARNING" in line and missing in line and "not scored" in line for line in log.splitlines()), log


def test_force_on_a_folder_of_an_older_version_after_a_resume_leaves_nothing_of_it(s2):
    data, stage, run = s2
    run()
    (stage / io.JOURNAL).unlink()  # as a version before journals left it, killed before its manifest
    (stage / "manifest.json").unlink()
    old = sorted(p.relative_to(stage) for p in (stage / "pseudo").glob("*.png"))
    run()  # resumed by this version
    for rel in old:
        (stage / rel).write_bytes(b"not a mask of the new config")
    run("--bg-threshold", "0.3", "--force")
    assert all(io.read_mask(stage / rel) is not None for rel in old)  # redone, none of the old ones kept
