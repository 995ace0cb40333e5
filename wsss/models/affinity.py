"""AffinityNet's head on a trained CAM classifier (Ahn & Kwak, CVPR 2018; wsss.affinity says how its
output is used).

The classifier's backbone is frozen: it already separates the classes, and the head needs only learn
which nearby pixels belong together, from the few thousand confident pairs per image the CAMs give.
PSA's head: the features at stride 4, at stride 8 and the last ones, each through a 1x1 conv (64, 128,
256 channels) and ELU, brought to the stride-8 grid and concatenated, then a 1x1 conv to 448 and ELU.
Which backbone modules give the stride-4 and stride-8 features is found by one probe forward (the last
module whose output has that stride), so every backbone of wsss.models.backbones works unchanged.
The affinity of two cells is exp(-mean |f_i - f_j|) over the 448 channels (PSA's form).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from wsss.affinity import RADIUS, pair_offsets, shifted

GRID_STRIDE = 8
TAP_STRIDES = (4, 8)
WIDTHS = (64, 128, 256)
OUT_WIDTH = 448
PROBE_SIZE = 64


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(4, cout), nn.ELU(inplace=True))


def find_taps(features: nn.Module, modules: nn.Module) -> dict[int, tuple[str, int]]:
    """{stride: (module name, channels)} for TAP_STRIDES: the last module of `modules` (in the order
    they run) whose 4-D output has that stride, found by a forward of a PROBE_SIZE image through
    `features`. Only modules that run once count: efficientnet's blocks call one activation module
    twice, before and after their strided convolution, and a hook there would keep the second."""
    seen: list[tuple[str, int, int]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.append((name, *out.shape[1:3]))
                                     if torch.is_tensor(out) and out.dim() == 4 else None)
             for name, m in modules.named_modules() if name]
    try:
        with torch.no_grad():
            features(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE))
    finally:
        for h in hooks:
            h.remove()
    calls = Counter(name for name, _, _ in seen)
    taps = {}
    for name, channels, size in seen:
        stride = PROBE_SIZE // size
        if stride in TAP_STRIDES and calls[name] == 1:  # a module run twice (a shared activation) is no tap
            taps[stride] = (name, channels)
    missing = [s for s in TAP_STRIDES if s not in taps]
    if missing:
        raise ValueError(f"the backbone has no module with output stride {missing}")
    return taps


class AffinityNet(nn.Module):
    """Per-cell features on the stride-8 grid of a frozen CAM classifier (wsss.models.classifier)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        was_training = classifier.training
        classifier.eval()
        self.taps = find_taps(classifier.features, classifier.backbone)
        classifier.train(was_training)
        with torch.no_grad():
            last = classifier.features(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE)).shape[1]
        self.classifier = classifier.requires_grad_(False)
        channels = [self.taps[s][1] for s in TAP_STRIDES] + [last]
        self.reduce = nn.ModuleList(_conv(c, w) for c, w in zip(channels, WIDTHS, strict=True))
        self.fuse = _conv(sum(WIDTHS), OUT_WIDTH)

    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.eval()  # frozen: BatchNorm and dropout as at inference
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) ImageNet-normalised -> (N, 448, ceil(H/8), ceil(W/8))."""
        grabbed: dict[str, torch.Tensor] = {}
        modules = dict(self.classifier.backbone.named_modules())
        hooks = [modules[name].register_forward_hook(lambda _m, _i, out, name=name: grabbed.__setitem__(name, out))
                 for name, _ in self.taps.values()]
        try:
            with torch.no_grad():
                last = self.classifier.features(x)
        finally:
            for h in hooks:
                h.remove()
        size = (-(-x.shape[2] // GRID_STRIDE), -(-x.shape[3] // GRID_STRIDE))
        maps = [grabbed[self.taps[s][0]] for s in TAP_STRIDES] + [last]
        parts = [F.interpolate(conv(m.detach().float()), size=size, mode="bilinear", align_corners=False)
                 for conv, m in zip(self.reduce, maps, strict=True)]
        return self.fuse(torch.cat(parts, dim=1))


def pair_affinity(features: torch.Tensor, radius: int = RADIUS) -> torch.Tensor:
    """(N, P) affinities exp(-mean |f_i - f_j|) of every pair of `wsss.affinity.pair_labels`' order."""
    out = []
    for dy, dx in pair_offsets(radius):
        a, b = shifted(features, dy, dx)
        out.append(torch.exp(-(a - b).abs().mean(dim=1)).flatten(1))
    return torch.cat(out, dim=1)


def affinity_loss(affinity: torch.Tensor, bg: torch.Tensor, fg: torch.Tensor, neg: torch.Tensor,
                  eps: float = 1e-5) -> tuple[torch.Tensor, dict]:
    """PSA's loss: -log a averaged over background pairs (weight 1/4) and over foreground pairs (1/4),
    -log(1 - a) over pairs of different labels (1/2); each set averaged on its own, so the many
    background pairs do not drown the others."""
    terms = {}
    for name, pairs, value in (("bg", bg, affinity), ("fg", fg, affinity), ("neg", neg, 1 - affinity)):
        pairs = pairs.float()
        terms[name] = (-torch.log(value + eps) * pairs).sum() / (pairs.sum() + eps)
    loss = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2
    return loss, {k: v.detach() for k, v in terms.items()}
