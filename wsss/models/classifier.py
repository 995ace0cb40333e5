"""Image classifier whose class activation maps (CAM) come for free.

Global average pooling, then a 1x1 conv without bias: both are linear, so pooling then classifying
equals classifying every position (the CAM) then pooling, and `GAP(cams(x)) == forward(x)`. Trained
with `F.multilabel_soft_margin_loss` on the image labels.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wsss.models.backbones import Backbone, build_backbone


class CAMClassifier(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int):
        """num_classes: object classes only (C-1); background has no image label."""
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) ImageNet-normalised -> logits (N, num_classes)."""
        features = self.backbone(x).mean((2, 3), keepdim=True)
        return self.classifier(features).flatten(1)

    def cams(self, x: torch.Tensor) -> torch.Tensor:
        """Raw CAMs (N, num_classes, H/os, W/os): the classifier on every position, before ReLU."""
        return self.classifier(self.backbone(x))

    def param_groups(self, lr: float) -> list[dict]:
        """Pretrained backbone at lr, the new head at 10x lr."""
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr},
                {"params": list(self.classifier.parameters()), "lr": 10 * lr}]


def build_classifier(backbone_name: str = "efficientnet-lite0", num_classes: int = 20, output_stride: int = 16,
                     weights: str | Path | None = "imagenet") -> CAMClassifier:
    return CAMClassifier(build_backbone(backbone_name, output_stride, weights), num_classes)
