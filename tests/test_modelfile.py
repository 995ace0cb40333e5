"""stage3/model.pt: a trained net that works without its run folder or dataset (wsss.modelfile,
python -m wsss.predict --model, python -m wsss.export --run / --model)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from wsss import export, io, modelfile, nets, predict
from wsss.modelfile import ModelFileError, load_model, read_model

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")


@pytest.fixture
def trained(tiny_voc, tmp_path):
    """(outputs folder, stage-3 folder) of a one-epoch PSL stage 3 on tiny_voc, run with relative paths
    from tmp_path as a user would."""
    from test_stage3 import make_stage2  # pytest puts tests/ on sys.path

    from wsss import segment
    from wsss.run import common_parser

    make_stage2(tiny_voc, tmp_path / "outputs" / "r")
    parser = common_parser("test")
    segment.add_args(parser)
    with pytest.MonkeyPatch.context() as m:
        m.chdir(tmp_path)
        segment.run(parser.parse_args([
            "--data", "tiny_voc", "--run", "r", "--outputs", "outputs", "--device", "cpu", "--workers", "0",
            "--epochs", "1", "--batch-size", "2", "--crop", "32", "--weights", "none"]))
    return tmp_path / "outputs", tmp_path / "outputs" / "r" / "stage3"


@pytest.mark.slow
def test_model_file_predicts_like_the_run_from_anywhere(trained, tmp_path, monkeypatch):
    from test_predict_folder import make_folder

    outputs, stage = trained
    content = torch.load(stage / "model.pt", weights_only=True)  # plain types only
    assert io.read_json(stage / io.MANIFEST)["outputs"]["model"] == "model.pt"
    assert content["format"] == "wsss-model"
    assert content["classes"] == ["background", "disc", "square", "bar"]
    assert content["architecture"] == {"backbone": "efficientnet-lite0", "head": "aspp", "output_stride": 16,
                                       "width": 256, "cls_branch": True}
    assert content["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert content["test_time"]["scales"] == [1.0] and content["test_time"]["gate"] is False
    assert content["test_time"]["crf_params"]["bi_sxy"] == 67.0 and content["source"]["net"] == "psl"

    # the same net as --run loads, weight for weight
    model, info = load_model(stage / "model.pt")
    config = io.read_json(stage / "config.json")
    monkeypatch.chdir(tmp_path)  # the run's dataset path is relative to where it ran
    run_model = nets.load_net(stage, config, "cpu")[0]
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x).values(), run_model(x).values(), strict=True))

    photos = make_folder(tmp_path / "photos")
    base = ["--device", "cpu", "--images", str(photos)]
    assert predict.main(["--run", "r", "--outputs", "outputs", *base, "--out", str(tmp_path / "by-run")]) \
        == 0
    away = tmp_path / "elsewhere"
    away.mkdir()
    shutil.copy(stage / "model.pt", away / "net.pt")
    shutil.rmtree(tmp_path / "tiny_voc")  # no dataset, and the run is out of sight of the cwd
    monkeypatch.chdir(away)
    assert predict.main(["--model", "net.pt", *base, "--out", "masks-here", "--overlay"]) == 0
    by_run = sorted((tmp_path / "by-run" / "masks").rglob("*.png"))
    assert len(by_run) == 4
    for path in by_run:
        mine = away / "masks-here" / "masks" / path.relative_to(tmp_path / "by-run" / "masks")
        assert np.array_equal(io.read_mask(path), io.read_mask(mine)), path
    index = io.read_json(away / "masks-here" / "masks.json")
    assert index["classes"] == content["classes"] and all(e["overlay"] for e in index["images"].values())
    # test-time flags override the model file's
    assert predict.main(["--model", "net.pt", *base, "--out", "flipped", "--flip"]) == 0
    assert io.read_json(away / "flipped" / "settings.json")["flip"] is True

    # a model file from the run, and exports from the run and from the file
    monkeypatch.chdir(tmp_path)
    # the dataset is gone: the class names come from stage3/model.pt
    assert modelfile.main(["--run", "r", "--out", str(away / "again.pt")]) == 0
    again = read_model(away / "again.pt")
    assert {k: v for k, v in again.items() if k != "state_dict"} == {k: v for k, v in content.items()
                                                                     if k != "state_dict"}
    assert all(torch.equal(again["state_dict"][k], v) for k, v in content["state_dict"].items())
    assert export.main(["--run", "r", "--out", str(away / "net.ts")]) == 0
    extra = {export.META: ""}
    scripted = torch.jit.load(str(away / "net.ts"), _extra_files=extra)
    assert json.loads(extra[export.META])["classes"] == content["classes"]
    with torch.no_grad():
        seg, cls = scripted(x)
        want = model(x)
    assert torch.allclose(seg, want["seg"], atol=1e-5) and torch.allclose(cls, want["cls"], atol=1e-5)


@pytest.mark.slow
def test_a_stage_resumed_after_its_nets_were_trained_writes_it(trained, tmp_path, monkeypatch):
    from wsss import segment
    from wsss.run import common_parser

    outputs, stage = trained
    (stage / "model.pt").unlink()  # a run finished before model files: rerun with other test-time flags
    parser = common_parser("test")
    segment.add_args(parser)
    monkeypatch.chdir(tmp_path)
    argv = ["--data", "tiny_voc", "--run", "r", "--outputs", "outputs", "--device", "cpu", "--workers", "0",
            "--epochs", "1", "--batch-size", "2", "--crop", "32", "--weights", "none"]
    before = (stage / "psl" / "checkpoint.pt").read_bytes()
    segment.run(parser.parse_args([*argv, "--flip"]))
    assert (stage / "psl" / "checkpoint.pt").read_bytes() == before  # the net was not retrained
    manifest = io.read_json(stage / io.MANIFEST)["outputs"]
    assert manifest["model"] == "model.pt" and set(manifest["predictions"]) == {"pred-nogate", "pred-flip-nogate"}
    top = max(p["val_miou"] for p in manifest["predictions"].values())  # an untrained net may tie
    best_flips = {p["flip"] for p in manifest["predictions"].values() if p["val_miou"] == top}
    assert read_model(stage / "model.pt")["test_time"]["flip"] in best_flips
    # not inside a stage folder (but stage3/model.pt itself)
    assert modelfile.main(["--run", "r", "--out", str(stage / "psl" / "model.pt")]) == 1


def test_files_that_are_not_model_files_are_refused_by_name(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    io.save_checkpoint(checkpoint, {"model": {"w": torch.zeros(2)}, "epoch": 1})
    with pytest.raises(ModelFileError, match=r"checkpoint\.pt: not a wsss model file \(it holds a stage-3 "):
        load_model(checkpoint)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match=r"junk\.pt.*not a wsss model file"):
        load_model(junk)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: model file not found"):
        load_model(tmp_path / "missing.pt")
    assert predict.main(["--model", str(junk), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 1


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path):
    from wsss.models.segnet import build_segnet

    net = build_segnet("efficientnet-lite0", 4, output_stride=16, weights=None)
    content = modelfile.model_content(net.state_dict(), classes=["bg", "a", "b"],
                                      backbone="efficientnet-lite0", head="auto", output_stride=16,
                                      width=None, cls_branch=False)
    modelfile.save_model(tmp_path / "m.pt", content)
    with pytest.raises(ModelFileError, match=r"m\.pt: its weights do not fit its architecture"):
        load_model(tmp_path / "m.pt")
    content["architecture"]["backbone"] = "no-such-net"
    modelfile.save_model(tmp_path / "m.pt", content)
    with pytest.raises(ModelFileError, match=r"m\.pt: its architecture cannot be built .*no-such-net"):
        load_model(tmp_path / "m.pt")
