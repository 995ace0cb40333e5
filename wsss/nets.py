"""Stage 3's nets on disk: where a stage-3 run lives, building its net, loading its final net.

The final net is the one whose folder stage 3's manifest names (`outputs.final_net`, written by
the method that trained it); whether it has PSL's classification branch is read from its
checkpoint, so that loading a net needs no knowledge of the method that made it. The other nets a
method trained (STC's I- and E-DCNN, the PSL net before PSL+) load the same way by folder name, for
scoring each step.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from wsss import io
from wsss.data.voc import VOCDataset
from wsss.layout import CONFIG, Stage3Folder, stage3_name
from wsss.run import run_dir
from wsss.train import torch_device


def stage_name(args) -> str:
    return stage3_name(args.tag)


def stage_path(args) -> Path:
    return run_dir(args) / stage_name(args)


def net_crf(config: dict) -> dict:
    """The test-time CRF kernels published for a stage-3 run's net (`wsss.crf.net_crf_params`)."""
    from wsss.crf import net_crf_params
    from wsss.models.segnet import resolve_head

    return net_crf_params(config["backbone"], resolve_head(config["backbone"], config["head"]))


def stage_config(args) -> tuple[Path, dict]:
    """The stage-3 folder `args` name and its config.json; a stage 3 never started is an error."""
    from wsss.stage import StageError

    stage = stage_path(args)
    try:
        return stage, io.read_json(stage / CONFIG)
    except FileNotFoundError:
        raise StageError(f"{stage / CONFIG} not found (run stage 3 first)") from None


def open_dataset(root, split: str, mask_dir=None, limit: int = 0) -> VOCDataset:
    return VOCDataset(root, split, mask_dir=mask_dir, limit=limit)


def build_net(config: dict, num_classes: int, cls_branch: bool, pretrained: bool = True):
    """The run's segmentation net; `pretrained=False` skips loading backbone weights (a checkpoint follows)."""
    from wsss.models.segnet import build_segnet

    weights = config["weights"] if pretrained and config["weights"] != "none" else None
    return build_segnet(config["backbone"], num_classes, head=config["head"],
                        output_stride=config["output_stride"], cls_branch=cls_branch, weights=weights)


def trained_nets(stage: Path) -> tuple[str, list[str]]:
    """(the final net's folder, every net's folder) of a finished stage 3, from its manifest."""
    try:
        outputs = io.read_manifest(stage)["outputs"]
        return outputs["final_net"], list(outputs.get("nets", {})) or [outputs["final_net"]]
    except (FileNotFoundError, KeyError) as e:
        raise FileNotFoundError(f"{Path(stage) / io.MANIFEST}: no final net recorded (has stage 3 finished?)") from e


def load_net(stage: Path, config: dict, device: str, net: str | None = None):
    """(model on device in eval mode, its checkpoint path, has classification branch) of a finished
    stage 3: its final net, or another net it trained (`net`, one of `trained_nets`: STC's `stc/i`,
    PSL+'s `psl`), so that every step of a method can be scored."""
    stage = Path(stage)
    name, nets = trained_nets(stage)
    if net is not None and net not in nets:
        raise ValueError(f"--net {net}: not a net of {stage} (it trained {', '.join(nets)})")
    name = net or name
    checkpoint = Stage3Folder(stage).checkpoint(name)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no trained net (has stage 3 finished?)")
    state = io.load_checkpoint(checkpoint)
    has_cls = any(k.startswith("cls.") for k in state["model"])
    with warnings.catch_warnings():  # "randomly initialised backbone": the checkpoint is loaded next
        warnings.simplefilter("ignore", UserWarning)
        model = build_net(config, open_dataset(config["data"], config["val_split"]).num_classes, has_cls,
                          pretrained=False)
    model.load_state_dict(state["model"])
    return model.to(torch_device(device)).eval(), checkpoint, has_cls
