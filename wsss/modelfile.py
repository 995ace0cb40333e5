"""A trained segmentation net in one file that works without its run folder or its dataset:
`stage3/model.pt`, written at the end of stage 3, or by `python -m wsss.modelfile --run RUN --out FILE`
from any finished run (any net it trained, `--net`).

A run's checkpoints are rebuilt from its `config.json` and its dataset (for the class names), both
found by paths that only hold on the machine and in the folder it ran in; a model file carries
all of that itself, as plain types only (dicts, lists, strings, numbers, tensors), so that
`torch.load(path, weights_only=True)` reads it and a file from elsewhere cannot run code:

    format, format_version  "wsss-model", 1
    wsss_version            the wsss version that wrote it
    classes                 class names, background first (mask id = index)
    architecture            backbone, head (resolved: largefov or aspp), output_stride, head width
                            (None: ASPP straight from the backbone features), cls_branch (PSL's
                            image classification branch)
    input                   how a photo becomes the net's input: RGB, 0-255 scaled to 0-1, then
                            (x - mean) / std per channel, NCHW
    test_time               scales, flip, gate (PSL: class maps times the branch's probabilities),
                            crf and crf_params (the kernels published for the net), max_side: the
                            settings stage 3 scored the net with (the best scored one)
    source                  the run, stage folder and net it came from, and its val mIoU if scored
    state_dict              the weights (float16 parameters, as stage 3 keeps them)

`load_model(path, device)` builds the net from the file alone (no backbone weights are read or
downloaded) and returns it with the rest of the file (`info`); `python -m wsss.predict --model FILE`
and `python -m wsss.export --model FILE` use it.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from wsss import io
from wsss.layout import MODEL, PRED, PRED_DEFAULT, Stage3Folder
from wsss.shapes import MAX_SIDE

FORMAT, FORMAT_VERSION = "wsss-model", 1


class ModelFileError(ValueError):
    """A file that is not a readable wsss model file; the message names it."""


def model_content(state_dict: dict, *, classes, backbone: str, head: str, output_stride: int,
                  width: int | None, cls_branch: bool, scales=(1.0,), flip: bool = False, gate: bool = True,
                  crf: bool = False, crf_params: dict | None = None, max_side: int = MAX_SIDE,
                  source: dict | None = None) -> dict:
    """The contents of a model file (see the module docstring), from a net's state dict and settings."""
    import wsss
    from wsss.data.transforms import MEAN, STD
    from wsss.models.segnet import head_width, resolve_head

    head = resolve_head(backbone, head)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "wsss_version": wsss.__version__,
        "classes": [str(c) for c in classes],
        "architecture": {"backbone": backbone, "head": head, "output_stride": int(output_stride),
                         "width": head_width(backbone, head) if width is None else int(width),
                         "cls_branch": bool(cls_branch)},
        "input": {"channels": "RGB", "layout": "NCHW", "scale": 1 / 255,
                  "mean": [round(float(m), 6) for m in MEAN], "std": [round(float(s), 6) for s in STD]},
        "test_time": {"scales": [float(s) for s in scales], "flip": bool(flip),
                      "gate": bool(gate and cls_branch), "crf": bool(crf),
                      "crf_params": dict(crf_params or {}), "max_side": int(max_side)},
        "source": dict(source or {}),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }


def save_model(path, content: dict) -> Path:
    """Write a model file atomically (`model_content` gives `content`)."""
    io.save_checkpoint(path, content)
    return Path(path)


def read_model(path) -> dict:
    """A model file's contents, checked to be one; `ModelFileError` names a file that is not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        content = io.load_checkpoint(path)
    except io.UnsafeFileError as e:
        raise ModelFileError(f"{e}; not a wsss model file") from e
    except (OSError, RuntimeError) as e:
        raise ModelFileError(f"{path}: not a wsss model file ({e})") from e
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        checkpoint = isinstance(content, dict) and "model" in content
        what = "a stage-3 checkpoint" if checkpoint else "something else"
        raise ModelFileError(f"{path}: not a wsss model file (it holds {what}); write one with "
                             f"python -m wsss.modelfile --run RUN --out FILE")
    if content.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{path}: model file format {content['format_version']} is newer than this "
                             f"wsss reads ({FORMAT_VERSION}); upgrade wsss")
    keys = ("classes", "architecture", "input", "test_time", "state_dict")
    missing = [k for k in keys if k not in content]
    if missing:
        raise ModelFileError(f"{path}: not a complete wsss model file (missing {', '.join(missing)})")
    return content


def build(content: dict, device="cpu", source: str = "the model file"):
    """(net on `device` in eval mode, info: the content without the weights) of a model file's content."""
    from wsss.models.segnet import build_segnet
    from wsss.train import torch_device

    arch = content["architecture"]
    try:
        with warnings.catch_warnings():  # "randomly initialised backbone": the weights are loaded next
            warnings.simplefilter("ignore", UserWarning)
            net = build_segnet(arch["backbone"], len(content["classes"]), head=arch["head"],
                               output_stride=arch["output_stride"], cls_branch=arch["cls_branch"],
                               weights=None, width=arch["width"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{source}: its architecture cannot be built ({type(e).__name__}: {e})") from e
    try:
        net.load_state_dict(content["state_dict"])
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ModelFileError(f"{source}: its weights do not fit its architecture ({first})") from e
    info = {k: v for k, v in content.items() if k != "state_dict"}
    return net.to(torch_device(device)).eval(), info


def load_model(path, device="cpu"):
    """(net on `device` in eval mode, info) of a model file: `info` is everything in the file but the
    weights (classes, architecture, input, test_time, source, versions)."""
    return build(read_model(path), device, str(path))


# ---------------------------------------------------------------- from a stage-3 run

def best_prediction(predictions: dict) -> dict:
    """The test-time settings ({scales, flip, crf, gate}) of a stage's recorded prediction folders
    (manifest outputs.predictions) to ship with its net: the best scored, else `pred` (the
    defaults), else the first recorded; the defaults when none is recorded."""
    if not predictions:
        return {"scales": [1.0], "flip": False, "crf": False, "gate": "on"}
    scored = [p for p in predictions.values() if p.get("val_miou") is not None]
    if scored:
        return max(scored, key=lambda p: p["val_miou"])
    return predictions.get(PRED_DEFAULT) or predictions.get(PRED) or next(iter(predictions.values()))


def from_run(stage: Path, config: dict, classes, net: str | None = None) -> dict:
    """Model file content of a finished stage 3's final net (or `net`, one of `wsss.nets.trained_nets`),
    with the test-time settings of its best scored prediction folder (`best_prediction`)."""
    from wsss import nets

    stage = Path(stage)
    final, trained = nets.trained_nets(stage)
    if net is not None and net not in trained:
        raise ValueError(f"--net {net}: not a net of {stage} (it trained {', '.join(trained)})")
    prediction = best_prediction(io.read_manifest(stage)["outputs"].get("predictions", {}))
    if net is not None and net != final:  # scored at these settings is the final net only
        prediction = {k: v for k, v in prediction.items() if k != "val_miou"}
    return from_checkpoint(stage, config, classes, net or final, prediction)


def from_checkpoint(stage: Path, config: dict, classes, net: str, prediction: dict) -> dict:
    """Model file content of the net in the folder `net` of a stage 3 with `config`, with the
    test-time settings `prediction` ({scales, flip, crf, gate, val_miou}: a manifest's prediction)."""
    from wsss.models.segnet import resolve_head
    from wsss.nets import net_crf

    checkpoint = Stage3Folder(Path(stage)).checkpoint(net)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no trained net (has stage 3 finished?)")
    state = io.load_checkpoint(checkpoint)["model"]
    has_cls = any(k.startswith("cls.") for k in state)
    source = {"run": Path(stage).parent.name, "stage": Path(stage).name, "net": net,
              "val_miou": prediction.get("val_miou")}
    return model_content(
        state, classes=classes, backbone=config["backbone"],
        head=resolve_head(config["backbone"], config["head"]), output_stride=config["output_stride"],
        width=None, cls_branch=has_cls, scales=prediction["scales"], flip=prediction["flip"],
        gate=has_cls and prediction.get("gate", "on") == "on", crf=prediction["crf"],
        crf_params=net_crf(config), source=source)


def run_classes(config: dict, stage: Path) -> list[str]:
    """The class names of a run's net: from its dataset's class_names.txt, else stage 3's model file."""
    from wsss.data.voc import class_names

    data = Path(config["data"])
    if data.is_dir():
        return list(class_names(data))
    if (stage / MODEL).is_file():
        return read_model(stage / MODEL)["classes"]
    raise FileNotFoundError(f"{data}: the run's dataset is not there (its class_names.txt names the "
                            f"classes); run this from the folder the run was made in")


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    from wsss.run import safe_name

    p = argparse.ArgumentParser(
        prog="python -m wsss.modelfile", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a model file (the net, its classes, architecture, input normalisation and "
                    "test-time settings in one file) from a finished stage-3 run; python -m wsss.predict "
                    "--model and python -m wsss.export --model read it from anywhere.")
    p.add_argument("--run", required=True, type=safe_name, help="run name: reads OUTPUTS/RUN/stage3")
    p.add_argument("--outputs", default="outputs", help="folder holding all runs")
    p.add_argument("--tag", default=None, type=safe_name,
                   help="stage-3 variant: reads OUTPUTS/RUN/stage3-TAG")
    p.add_argument("--net", default=None,
                   help="another net the stage trained, by folder (the manifest's outputs.nets; default: "
                        "the final net)")
    p.add_argument("--out", type=Path, required=True, help="the model file to write")
    return p


def main(argv=None) -> int:
    from wsss import nets
    from wsss.run import run_dir
    from wsss.stage import StageError, error_line, stage_folders

    args = build_parser().parse_args(argv)
    try:
        stage, config = nets.stage_config(args)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        out = args.out.resolve()
        inside = [f for f in stage_folders(run_dir(args)) if out.is_relative_to(f.resolve())]
        if inside and out != (stage / MODEL).resolve():
            raise StageError(f"--out {args.out}: inside a stage folder of the run, whose artifacts it could "
                             f"replace; write it elsewhere (or to {stage / MODEL})")
        content = from_run(stage, config, run_classes(config, stage), args.net)
        save_model(args.out, content)
    except (StageError, OSError, ValueError) as e:
        print(f"error: {error_line(e) or e}", file=sys.stderr)
        return 1
    print(describe(content, args.out))
    return 0


def describe(content: dict, path) -> str:
    """One line about a model file for the user."""
    arch, tt = content["architecture"], content["test_time"]
    source = content.get("source") or {}
    settings = f"scales {' '.join(f'{s:g}' for s in tt['scales'])}" + (", flip" if tt["flip"] else "") \
        + (", crf" if tt["crf"] else "") + (", gate" if tt["gate"] else "")
    return (f"wrote {path}: {source.get('net', 'net')} of {source.get('run', '?')}, {arch['backbone']} + "
            f"{arch['head']} (output stride {arch['output_stride']}"
            f"{', PSL branch' if arch['cls_branch'] else ''}), "
            f"{len(content['classes'])} classes, test time {settings}")


if __name__ == "__main__":
    sys.exit(main())
