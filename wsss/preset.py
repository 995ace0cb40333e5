"""Presets: the flags of a published setting, one JSON file per setting in `wsss/presets/` (installed with the package).

A preset file holds one object per stage, keyed by the flag names as typed on the command line
(without the dashes), plus an optional `common` object applied to every stage script:

    {"description": "one line shown by --help",
     "common": {"train-split": "train_aug"},
     "stage1": {"backbone": "vgg16", "output-stride": 8, "cam-scales": "0.5,1.0,1.5,2.0"},
     "stage2": {}, "stage3": {"scales": [0.5, 1.0], "crf": true}, "eval": {}}

`--preset NAME` (a name in `wsss/presets/` or a path to such a file) makes the preset's values the
parser's defaults, so an explicit flag still overrides it; the values go through each flag's own
type and choices, and a key that is not a flag of that stage is an error naming the file. The
stage's config (`wsss.stage`) therefore records the effective values, never the preset's name:
a run made with `--preset voc-vgg16` and one made with the same flags typed out are the same
config, and editing a preset file cannot silently change what a finished run folder means.
`--preset` and `--smoke` are runtime flags (recorded in config.json, not in the config).

`--smoke` shrinks any preset to minutes on a CPU (`SMOKE`): a few images (`--limit`), one epoch of
small crops, random initial weights (no download), one scale, two erasing steps (so erasing itself
runs). It is the test that keeps every preset runnable (tests/test_presets.py), and the GPU check's
workload (bench/gpu_check.py); its figures say nothing about quality.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsss.errors import WsssError

PRESETS = Path(__file__).resolve().parent / "presets"
SECTIONS = ("stage1", "stage2", "stage3", "eval")
STAGES = ("stage1", "stage2", "stage3")  # the sections the `common` object applies to

# Applied over the preset (explicit flags still win). Sizes: a 32-px crop is the least that still
# leaves a 2x2 map at output stride 16; --max-side bounds the CAM forward of a 500-px photo.
SMOKE = {
    "stage1": {"limit": 8, "epochs": 1, "iterations": 0, "batch-size": 2, "crop": 48, "weights": "none",
               "cam-scales": "1.0", "ae-steps": 2, "max-side": 128, "overlays": 2},
    "stage2": {"limit": 8, "sample": 2},
    "stage3": {"limit": 8, "epochs": 1, "batch-size": 2, "crop": 48, "weights": "none", "scales": [1.0],
               "flip": False, "warmup": 1, "collapse-check": False},
    "eval": {},
}


class PresetError(WsssError, ValueError):
    """A preset that cannot be used; the message names the file and the key."""


def names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def path_of(name: str) -> Path:
    """A preset's file: `wsss/presets/NAME.json`, or `name` itself when it is a path to a file."""
    path = Path(name)
    if path.suffix == ".json" or "/" in name:
        if not path.is_file():
            raise PresetError(f"{path}: preset file not found")
        return path
    path = PRESETS / f"{name}.json"
    if not path.is_file():
        raise PresetError(f"unknown preset {name!r}; choose one of {', '.join(names())} (or give a file path)")
    return path


def load(name: str) -> dict:
    """The preset's JSON object, its sections checked."""
    path = path_of(name)
    try:
        preset = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PresetError(f"{path}: cannot read the preset ({e})") from e
    if not isinstance(preset, dict):
        raise PresetError(f"{path}: a preset is a JSON object with sections {', '.join(SECTIONS)}")
    unknown = set(preset) - {*SECTIONS, "common", "description"}
    if unknown:
        raise PresetError(f"{path}: unknown sections {sorted(unknown)} (expected {', '.join(SECTIONS)}, common)")
    for key, section in preset.items():
        if key != "description" and not isinstance(section, dict):
            raise PresetError(f"{path}: section {key!r} must be an object of flag: value")
    return preset


def describe() -> str:
    """One line per preset, for --help."""
    lines = []
    for name in names():
        try:
            lines.append(f"{name}: {load(name).get('description', '')}")
        except PresetError as e:
            lines.append(f"{name}: ({e})")
    return "; ".join(lines)


def flag_values(parser: argparse.ArgumentParser, values: dict, where: str) -> dict:
    """{dest: value} of `values` ({flag name: JSON value}) through the flags' own types and choices."""
    options = {s: a for a in parser._actions for s in a.option_strings}
    out = {}
    for key, value in values.items():
        action = options.get(f"--{key}")
        if action is None:
            raise PresetError(f"{where}: --{key} is not a flag of this script")
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise PresetError(f"{where}: --{key} takes true or false, not {value!r}")
            out[action.dest] = value
            continue
        tokens = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        try:
            out[action.dest] = parser._get_values(action, tokens)
        except argparse.ArgumentError as e:
            raise PresetError(f"{where}: {e}") from e
    return out


def apply(parser: argparse.ArgumentParser, section: str, preset: str | None, smoke: bool) -> None:
    """Make the preset's values (then the smoke overrides) the parser's defaults."""
    values: dict = {}
    if preset:
        data = load(preset)
        where = f"{path_of(preset)} [{section}]"
        if section in STAGES:
            values.update(flag_values(parser, data.get("common", {}), f"{path_of(preset)} [common]"))
        values.update(flag_values(parser, data.get(section, {}), where))
    if smoke:
        values.update(flag_values(parser, SMOKE[section], f"--smoke [{section}]"))
    parser.set_defaults(**values)


def pre_parse(argv) -> argparse.Namespace:
    """--preset and --smoke alone, before the full parse (which needs their defaults applied)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--preset", default=None)
    p.add_argument("--smoke", action="store_true")
    return p.parse_known_args(argv)[0]
