"""Segmentation and classification losses of stage 3 (logits are cast to float32 first, so they
are safe under bf16 autocast).

* `cross_entropy`: per-pixel softmax cross-entropy on hard masks, 255 ignored, averaged over the
  labelled pixels. A batch without any labelled pixel gives 0 (with a graph), not NaN, because a
  crop can fall entirely on ignore pixels of a pseudo-mask.
* `soft_cross_entropy`: the multi-label cross-entropy of STC (Wei et al., TPAMI 2017, eq. for the
  Initial-DCNN). Each pixel (i, j) carries a target distribution t_ij over the C classes (for a
  simple image of class c: t^c = saliency, t^0 = 1 - saliency, 0 elsewhere) and the net's softmax
  p_ij; the loss is  -1/|V| sum_{(i,j) in V} sum_c t^c_ij log p^c_ij  over the valid pixels V.
  With one-hot targets it is exactly `cross_entropy`.
* `multilabel_soft_margin`: the image-classification loss of the PSL branch (and of the stage-1
  classifier): mean over classes of the binary cross-entropy of sigmoid(logit) against the
  multi-hot label, averaged over the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss.labels import IGNORE


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """logits (N, C, H, W), target (N, H, W) int64 class ids or `ignore_index`."""
    target = target.long()
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum()
    return total / count.clamp(min=1)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """logits (N, C, H, W), target (N, C, H, W) per-pixel class probabilities, valid (N, H, W) bool."""
    if target.shape != logits.shape:
        raise ValueError(f"soft_cross_entropy: target shape {tuple(target.shape)} != logits {tuple(logits.shape)}")
    per_pixel = -(target.float() * F.log_softmax(logits.float(), dim=1)).sum(1)
    if valid is None:
        return per_pixel.mean()
    valid = valid.bool()
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


def multilabel_soft_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (N, K) of the K object classes, labels (N, K) multi-hot."""
    return F.multilabel_soft_margin_loss(logits.float(), labels.float())
