"""The fully supervised upper bound (`--method gt`, or `--masks gt`): the same net and schedule,
plain cross-entropy, on the training split's ground-truth masks."""
from __future__ import annotations

from wsss.methods.registry import register
from wsss.segtrain import SegmentationTrainSet, ce_step


@register("gt", reads="masks", folders=("gt",))
def train(ctx) -> str:
    ctx.train_net("gt", SegmentationTrainSet(ctx.train, ctx.train.ids, ctx.args.crop), ce_step)
    return "gt"
