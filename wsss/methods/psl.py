"""PSL: prohibitive segmentation learning (Wei et al., "Object Region Mining with Adversarial
Erasing", CVPR 2017, section 3.3), and PSL+.

The net is a segmentation net with an image-classification branch (`build_segnet(...,
cls_branch=True)`). Each batch's loss is

    L = CE(seg, pseudo-mask; 255 ignored)
      + w_online * CE(seg, online mask; padding ignored)   from epoch --psl-online-start on
      + w_cls    * multilabel soft margin(cls, image labels)

The online mask is the prohibitive part: the net's own segmentation, with each object class's
softmax map multiplied by a gate, g_0 = 1 (background is always allowed) and
g_c = sigmoid(cls_c) * label_c, so a class absent from the image's labels gets probability 0 and
can never be the argmax, and a present class weighs in with the classifier's confidence. The mask
is the argmax of the gated maps, computed without gradient (detached): it is a target, like the
pseudo-mask, not a path through which the loss would also train the classification branch (the
argmax has no useful gradient anyway); the branch learns from the classification loss alone. The
online term starts in the second half of training by default, once the net has learnt the
pseudo-masks, so that its own early guesses do not become targets. At test time, when the labels
are unknown, the gate is sigmoid(cls_c) alone (`wsss.predict`, --gate on).

PSL+ (--psl-plus): the trained PSL net predicts the training images (--self-train-scales, flip),
restricted to their labels, refined by a dense CRF (`wsss.crf.dense_crf` over background plus the
image's labels) with the kernels stage 2 used (its config's --crf-* flags, `wsss.crf.crf_params_of`;
the PSA kernels of `CRF_DEFAULTS`, sxy 80 at ~250 px, would pull whole regions of similar colour to
one label); pixels where the CRF changes the net's label or the net is unsure
(--self-train-confidence) are ignored (255). --psl-plus-merge then combines those masks with the
stage-2 pseudo-masks (`merge_targets`): `none` trains on the net's masks alone (the paper's PSL+,
with the ignore region); `fill` gives the unsure pixels the stage-2 label; `grow` does that and also
keeps every stage-2 object pixel the net calls background, so the second round can add object
pixels but never lose those stage 2 found. Why: the unsure pixels are mostly object pixels (borders,
parts the net half sees) and a PSL net already under-segments, so masks of its own predictions hand
the second round fewer object pixels and more objects labelled background than the first had, and
each round shrinks the objects further (docs/results.md, "Stage-3 methods"). A fresh net (ImageNet
backbone, same loss and schedule) is then trained once on those masks instead of the stage-2
pseudo-masks.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from wsss import io
from wsss.crf import check_crf, crf_params_of
from wsss.layout import Stage2Folder, Stage3Folder
from wsss.losses import IGNORE, cross_entropy, multilabel_soft_margin
from wsss.methods.registry import register
from wsss.run import log
from wsss.segtrain import SegmentationTrainSet, with_targets

MERGES = ("none", "fill", "grow")  # --psl-plus-merge, see merge_targets
# grow, by measurement (bench/bench_methods.py; docs/results.md, "Stage-3 methods"): on the embedded
# data the paper's rule (none, 3 seeds) and fill (1 seed) gave PSL+ nets worse than the PSL nets they
# came from, grow better ones (3 seeds): it never labels background what stage 2 found an object; on
# the VOC-like data grow's masks are the best of the three too (its net there is unmeasured). `none`
# remains the literal reproduction.
MERGE_DEFAULT = "grow"


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PSL (--method psl)")
    g.add_argument("--psl-online", choices=["on", "off"], default="on",
                   help="off: the ablation without the online (prohibitive) masks")
    g.add_argument("--psl-online-weight", type=float, default=1.0, help="weight of the online-mask cross-entropy")
    g.add_argument("--psl-online-start", type=int, default=None,
                   help="first epoch (1-based, as in metrics.jsonl) with the online term; "
                        "default: the second half of training, so the net first learns the pseudo-masks")
    g.add_argument("--psl-cls-weight", type=float, default=1.0, help="weight of the classification loss")
    g.add_argument("--psl-plus", action="store_true",
                   help="PSL+: retrain once on the PSL net's CRF-refined predictions of the training images")
    g.add_argument("--psl-plus-merge", choices=list(MERGES), default=MERGE_DEFAULT,
                   help="PSL+ targets: the net's masks alone (none), their unsure pixels from the stage-2 "
                        "pseudo-masks (fill), and also stage 2's object pixels the net calls background (grow)")


def class_gates(cls_logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C) gates: 1 for background, sigmoid(cls) for the objects, times the labels when given."""
    gates = torch.sigmoid(cls_logits.float())
    if labels is not None:
        gates = gates * labels.float()
    return torch.cat([gates.new_ones(gates.shape[0], 1), gates], dim=1)


@torch.no_grad()
def online_masks(seg_logits: torch.Tensor, cls_logits: torch.Tensor, labels: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """(N, H, W) int64 argmax of softmax(seg) * gates; 255 outside `valid` (padding)."""
    probs = seg_logits.float().softmax(1) * class_gates(cls_logits, labels)[:, :, None, None]
    masks = probs.argmax(1)
    if valid is not None:
        masks[~valid.bool()] = IGNORE
    return masks


def online_start(args) -> int:
    """First epoch (1-based) with the online term."""
    if args.psl_online_start is not None:
        return args.psl_online_start
    return args.epochs // 2 + 1


def make_step(args):
    """step_fn for wsss.train.fit with the PSL loss and the flags of `args`."""
    use_online = args.psl_online == "on"
    start = online_start(args)

    def step(model, batch, epoch):
        out = model(batch["image"])
        seg, cls = out["seg"], out["cls"]
        seg_loss = cross_entropy(seg, batch["target"])
        cls_loss = multilabel_soft_margin(cls, batch["label"])
        loss = seg_loss + args.psl_cls_weight * cls_loss
        logs = {"seg_loss": seg_loss.detach(), "cls_loss": cls_loss.detach()}  # read by fit when it logs
        if use_online and epoch + 1 >= start:
            online = online_masks(seg, cls, batch["label"], batch["valid"])
            online_loss = cross_entropy(seg, online)
            loss = loss + args.psl_online_weight * online_loss
            logs["online_loss"] = online_loss.detach()
        return loss, logs

    return step


def stage2_crf(stage2) -> dict:
    """The CRF kernels stage 2 ran with (from its manifest's config)."""
    params = crf_params_of(io.read_manifest(stage2).get("config", {}))
    log.info("PSL+: CRF kernels of stage 2: %s", params)
    return params


def merge_targets(net: np.ndarray, pseudo: np.ndarray, rule: str) -> np.ndarray:
    """PSL+'s target from the net's mask (255 = unsure) and the stage-2 pseudo-mask, by --psl-plus-merge."""
    target = net.copy()
    if rule in ("fill", "grow"):
        unsure = net == IGNORE
        target[unsure] = pseudo[unsure]
    if rule == "grow":
        lost = (net == 0) & (pseudo != 0) & (pseudo != IGNORE)
        target[lost] = pseudo[lost]
    return target


def plus_targets(out: Path, rule: str) -> Path:
    """The folder of the masks PSL+ trains on in stage folder `out`, with --psl-plus-merge `rule`."""
    return out / "psl" / ("train-crf" if rule == "none" else f"train-crf-{rule}")


def merge_folder(masks: Path, pseudo: Path, out: Path, ids, rule: str) -> Path:
    """out/ID.png = merge_targets of masks/ID.png and pseudo/ID.png (resumable: written ones are kept)."""
    for id_ in ids:
        if not (out / f"{id_}.png").is_file():
            io.write_mask(out / f"{id_}.png", merge_targets(io.read_mask(masks / f"{id_}.png"),
                                                            io.read_mask(pseudo / f"{id_}.png"), rule))
    return out


@register("psl", reads="pseudo", folders=("psl", "psl-plus"), args=add_args)
def train(ctx) -> str:
    """Train PSL (and PSL+) in the stage folder; returns the final net's folder."""
    args = ctx.args
    if args.psl_plus:
        check_crf("stage 3", "no --psl-plus")
    gate = args.gate == "on"
    step = make_step(args)
    pseudo = Stage2Folder(ctx.stage2).pseudo
    ids = with_targets(ctx.train.ids, pseudo, "pseudo-mask")
    trainset = SegmentationTrainSet(ctx.train, ids, args.crop, target_dir=pseudo)
    model = ctx.train_net("psl", trainset, step, cls_branch=True, gate=gate, loss_key="seg_loss")
    if not args.psl_plus:
        return "psl"
    masks = plus_targets(ctx.out, "none")  # the net's own masks, merged below by --psl-plus-merge
    ctx.predict_train(model, ids, masks, crf_params=stage2_crf(ctx.stage2),
                      checkpoint=Stage3Folder(ctx.out).checkpoint("psl"), desc="PSL+ masks")
    if args.psl_plus_merge != "none":
        masks = merge_folder(masks, pseudo, plus_targets(ctx.out, args.psl_plus_merge), ids, args.psl_plus_merge)
    trainset = SegmentationTrainSet(ctx.train, ids, args.crop, target_dir=masks)
    ctx.train_net("psl-plus", trainset, step, cls_branch=True, gate=gate, loss_key="seg_loss")
    return "psl-plus"
