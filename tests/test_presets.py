"""Presets (wsss/presets/*.json, wsss.preset): every preset parses for every stage, explicit flags win,
and every preset runs end to end in smoke size (so a preset cannot rot)."""
from __future__ import annotations

import json

import pytest

from stages import stage1, stage2, stage3
from wsss import erasing, preset, pseudo, segment
from wsss import eval as wsss_eval
from wsss.config import artifact_config
from wsss.run import common_parser

PARSERS = {
    "stage1": lambda: erasing.add_args(common_parser("test", "stage1")),
    "stage2": lambda: pseudo.add_args(common_parser("test", "stage2")),
    "stage3": lambda: _stage3_parser(),
    "eval": wsss_eval.build_parser,
}


def _stage3_parser():
    p = common_parser("test", "stage3")
    segment.add_args(p)
    return p


def test_the_published_settings_are_there():
    assert {"demo", "voc-vgg16", "voc-r101"} <= set(preset.names())


@pytest.mark.parametrize("name", preset.names())
@pytest.mark.parametrize("section", list(PARSERS))
def test_every_preset_parses_for_every_stage(name, section):
    argv = ["--preset", name] + (["--run", "r"] if section == "eval" else [])
    args = PARSERS[section]().parse_args(argv)
    data = preset.load(name)
    values = {**(data.get("common", {}) if section != "eval" else {}), **data.get(section, {})}
    for key, value in values.items():
        got = getattr(args, key.replace("-", "_"))
        assert got == value or [str(v) for v in got] == [str(v) for v in value] or (
            ",".join(map(str, got)) == value), (key, got, value)


def test_explicit_flags_override_the_preset_and_the_config_holds_the_effective_values():
    args = PARSERS["stage1"]().parse_args(["--preset", "voc-vgg16", "--epochs", "2"])
    assert (args.backbone, args.output_stride, args.epochs, args.ae_init) == ("vgg16", 8, 2, "imagenet")
    config = artifact_config(args)
    assert config["backbone"] == "vgg16" and config["epochs"] == 2 and config["train_split"] == "train_aug"
    assert "preset" not in config and "smoke" not in config  # runtime: the values are what count
    smoke = PARSERS["stage3"]().parse_args(["--preset", "voc-r101", "--smoke", "--crop", "40"])
    assert (smoke.backbone, smoke.epochs, smoke.limit, smoke.scales, smoke.crop) == ("resnet101", 1, 8, [1.0], 40)
    assert smoke.crf  # the preset's test-time CRF survives the smoke overrides


def test_a_bad_preset_is_an_error_naming_the_file_and_the_flag(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stage1": {"epoch": 3}}))
    with pytest.raises(SystemExit):
        PARSERS["stage1"]().parse_args(["--preset", str(bad)])
    err = capsys.readouterr().err
    assert str(bad) in err and "--epoch " in err + " "
    bad.write_text(json.dumps({"stage3": {"output-stride": 4}}))
    with pytest.raises(SystemExit):
        PARSERS["stage3"]().parse_args(["--preset", str(bad)])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        PARSERS["stage2"]().parse_args(["--preset", "no-such-preset"])
    assert "demo" in capsys.readouterr().err  # the error lists the presets


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*no weights given")
@pytest.mark.parametrize("name", preset.names())
def test_every_preset_runs_end_to_end_in_smoke_size(name, tiny_voc, tmp_path):
    outputs = tmp_path / "outputs"
    common = ["--preset", name, "--smoke", "--data", str(tiny_voc), "--run", "r", "--outputs", str(outputs),
              "--device", "cpu", "--workers", "0", "--train-split", "train"]
    stage1.main(common)
    stage2.main(common)
    stage3.main(common)
    for stage in ("stage1", "stage2"):
        assert wsss_eval.main(["--run", "r", "--outputs", str(outputs), "--stage", stage]) == 0
    assert wsss_eval.main(["--run", "r", "--outputs", str(outputs), "--stage", "stage3", "--preset", name]) == 0
    stage3_config = preset.load(name).get("stage3", {})
    for stage in ("stage1", "stage2", "stage3"):
        manifest = json.loads((outputs / "r" / stage / "manifest.json").read_text())
        assert manifest["complete"] and manifest["config"]["limit"] == 8
        assert manifest["environment"]["device"] == "cpu" and manifest["environment"]["amp"] == "off"
    config = json.loads((outputs / "r" / "stage3" / "manifest.json").read_text())["config"]
    assert config["epochs"] == 1 and config["backbone"] == stage3_config.get("backbone", "efficientnet-lite0")
    pred = "pred-crf-nogate" if stage3_config.get("crf") else "pred-nogate"
    assert len(list((outputs / "r" / "stage3" / pred).glob("*.png"))) == 2
