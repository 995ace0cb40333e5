"""STC: simple to complex (Wei et al., "STC: A Simple to Complex Framework for Weakly-supervised
Semantic Segmentation", TPAMI 2017): three trainings of the same segmentation net.

1. I-DCNN (`stc/i`) on the *simple* training images with their saliency maps as soft targets: a
   pixel's target distribution puts the saliency s on the image's one class and 1 - s on
   background, 0 elsewhere (`wsss.fusion.stc_soft_target`); multi-label cross-entropy
   (`wsss.losses.soft_cross_entropy`).
2. E-DCNN (`stc/e`) on the same images, hard targets = the I-DCNN's predictions restricted to the
   image's labels (absent classes can never win the argmax); cross-entropy.
3. P-DCNN (`stc/p`) on all training images, hard targets = the E-DCNN's predictions restricted to
   the labels; cross-entropy. Its val predictions are the stage's product.

Each net's predictions of the training images that the next net trains on are kept in
`stc/i/pred`, `stc/e/pred` (palette PNGs): self-training targets (`Stage3.predict_train`: at
--self-train-scales with flip, 255 where the net is unsure, --self-train-confidence, so an unsure
pixel is not handed on as a confident label); --stc-steps 1|2 stops early.

Budget: every net restarts from the ImageNet backbone and gets the same number of SGD iterations
(--stc-iters; default --epochs over the whole training split, the P-DCNN's budget), not the same
number of epochs: with epochs, I and E (a few simple images) would get a fraction of P's steps. The
iterations are rounded up to whole epochs of each net's images (checkpoints and resume are per
epoch), so the nets' step counts differ by less than one epoch of the simple images.

Simple images (`is_simple`): the paper downloads about 40,000 simple images (one class, clean
background) from Flickr by class keywords, beside the PASCAL training set; this needs no download
and picks them from the training split itself. What that costs: I and E see only the training
split's single-label images that pass the rule below (a few hundred on VOC, against 40,000), so
they learn less than the paper's, and E is trained on I's predictions of the very images I was
trained on (in the paper too, but over a set large enough that I does not fit it); a simple image
is also one P trains on again. An image is simple when
  * it has exactly one label,
  * its saliency is concentrated (one object): at least `concentration` (default 0.9) of the total
    saliency mass lies inside the largest 8-connected component of salient pixels (saliency >
    `threshold`, default 0.5), not in scattered blobs,
  * its background is clean: the mean saliency of the pixels outside that component is at most
    `background` (default 0.05); an object filling the whole image leaves no background.
The background test guards against saliency maps that light up clutter (the built-in maps are
clean around a concentrated object, so it removes none of those); the border pixels' saliency,
another clean-background test, says nothing with the built-in saliency, which is zero along the
border by construction. How many images pass, and how many of them are truly simple on the
embedded dataset: docs/results.md, "STC's simple images".
"""
from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import ndimage

from wsss import io
from wsss.layout import CHECKPOINT, PRED, Stage2Folder, item
from wsss.losses import soft_cross_entropy
from wsss.methods.registry import register
from wsss.run import is_main_process, log, positive_int
from wsss.segtrain import SegmentationTrainSet, ce_step, with_targets
from wsss.stage import StageError


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("STC (--method stc)")
    g.add_argument("--stc-steps", type=int, default=3, choices=[1, 2, 3],
                   help="train I-DCNN (1), then E-DCNN (2), then P-DCNN (3)")
    g.add_argument("--stc-saliency-threshold", type=float, default=0.5,
                   help="saliency above this is salient (for the simple-image rule)")
    g.add_argument("--stc-concentration", type=float, default=0.9,
                   help="simple image: least fraction of the saliency mass inside the largest salient component")
    g.add_argument("--stc-background", type=float, default=0.05,
                   help="simple image: largest mean saliency outside that component (clean background)")
    g.add_argument("--stc-iters", type=positive_int, default=None,
                   help="SGD iterations of each net, rounded up to whole epochs (default: --epochs over the "
                        "whole training split)")


def is_simple(saliency: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5,
              concentration: float = 0.9, background: float = 0.05) -> bool:
    """The simple-image rule of the module docstring; saliency uint8 0..255 or float in [0, 1]."""
    if int(np.count_nonzero(np.asarray(labels) > 0)) != 1:
        return False
    sal = np.asarray(saliency, dtype=np.float32)
    if np.asarray(saliency).dtype == np.uint8:
        sal = sal / 255.0
    components, n = ndimage.label(sal > threshold, structure=np.ones((3, 3), dtype=bool))
    total = sal.sum()
    if n == 0 or total <= 0:
        return False
    masses = ndimage.sum_labels(sal, components, index=np.arange(1, n + 1))
    if masses.max() / total < concentration:
        return False
    outside = components != np.argmax(masses) + 1
    return bool(outside.any() and sal[outside].mean() <= background)


def simple_ids(ctx) -> list[str]:
    """The simple training images (stc/simple.txt, computed once from stage 2's saliency maps)."""
    args = ctx.args
    path = ctx.out / "stc" / "simple.txt"
    if path.is_file():
        return path.read_text().split()
    saliency = Stage2Folder(ctx.stage2).saliency
    ids = [i for i in with_targets(ctx.train.ids, saliency, "saliency map")
           if is_simple(io.read_mask(item(saliency, i)), ctx.train.labels(i),
                        threshold=args.stc_saliency_threshold, concentration=args.stc_concentration,
                        background=args.stc_background)]
    if len(ids) < args.batch_size:
        raise StageError(f"only {len(ids)} of {len(ctx.train.ids)} training images are simple; "
                         "relax --stc-concentration / --stc-background")
    if is_main_process():
        io.write_bytes(path, ("\n".join(ids) + "\n").encode())
    return ids


def soft_step(model, batch, epoch):
    """I-DCNN: multi-label cross-entropy on the saliency soft targets, padding left out."""
    return soft_cross_entropy(model(batch["image"])["seg"], batch["target"], batch["valid"]), {}


def epochs_for(iters: int, images: int, batch_size: int) -> int:
    """Whole epochs of `images` that give at least `iters` SGD iterations (fit drops the last partial batch)."""
    return max(1, math.ceil(iters / max(1, images // batch_size)))


@register("stc", reads="pseudo", folders=("stc",), args=add_args)
def train(ctx) -> str:
    """Train I-, E- and P-DCNN (a prefix with --stc-steps); returns the final net's folder."""
    args, out = ctx.args, ctx.out / "stc"
    simple = simple_ids(ctx)
    log.info("STC: %d of %d training images are simple", len(simple), len(ctx.train.ids))
    iters = args.stc_iters or args.epochs * (len(ctx.train.ids) // args.batch_size)
    trainset = SegmentationTrainSet(ctx.train, simple, args.crop, target_dir=Stage2Folder(ctx.stage2).saliency,
                                    soft=True)
    model = ctx.train_net("stc/i", trainset, soft_step, epochs=epochs_for(iters, len(simple), args.batch_size))
    final = "stc/i"
    for name, previous, ids in [("e", "i", simple), ("p", "e", ctx.train.ids)][: args.stc_steps - 1]:
        # the previous net's restricted predictions of the images this net trains on
        targets = ctx.predict_train(model, ids, out / previous / PRED, checkpoint=out / previous / CHECKPOINT,
                                    desc=f"stc/{previous} predict")
        trainset = SegmentationTrainSet(ctx.train, ids, args.crop, target_dir=targets)
        final = f"stc/{name}"
        model = ctx.train_net(final, trainset, ce_step, epochs=epochs_for(iters, len(ids), args.batch_size))
    return final
