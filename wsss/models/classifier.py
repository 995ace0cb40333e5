"""Image classifier whose class activation maps (CAM) come for free.

Global average pooling, then a 1x1 conv without bias: both are linear, so pooling then classifying
equals classifying every position (the CAM) then pooling, and `GAP(cams(x)) == forward(x)`. Trained
with `F.multilabel_soft_margin_loss` on the image labels.

On vgg16 the features are those of DeepLab-LargeFOV's fc7: the VGG16 backbone, then VGG16's fully
connected fc6/fc7 as convolutions (`backbones.largefov_fc`: fc6 3x3 at dilation 12, fc7 1x1, 1024
channels each, ReLU and dropout), initialised from VGG16's fc6/fc7 by DeepLab's decimation
(`backbones.decimate_vgg16_fc`) and trained at the backbone's learning rate: AE-PSL (Wei et al.,
CVPR 2017) builds its classification network, like its segmentation network, on DeepLab-LargeFOV's
ImageNet VGG16 (as we read the paper), here with the CAM classifier (Zhou et al., CVPR 2016:
global average pooling, then the class layer) in place of fc8. Other backbones have no neck.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wsss.models.backbones import LARGEFOV_WIDTH, Backbone, build_backbone_fc, largefov_fc


class CAMClassifier(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, neck: nn.Sequential | None = None,
                 neck_pretrained: bool = False):
        """num_classes: object classes only (C-1); background has no image label. neck: layers
        between the backbone and the classifier (vgg16's fc6/fc7), `out_channels` wide."""
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone, self.neck, self.neck_pretrained = backbone, neck, neck_pretrained
        channels = backbone.out_channels if neck is None else neck[0].out_channels
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return features if self.neck is None else self.neck(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) ImageNet-normalised -> logits (N, num_classes)."""
        return self.classifier(self.features(x).mean((2, 3), keepdim=True)).flatten(1)

    def cams(self, x: torch.Tensor) -> torch.Tensor:
        """Raw CAMs (N, num_classes, H/os, W/os): the classifier on every position, before ReLU."""
        return self.classifier(self.features(x))

    def param_groups(self, lr: float) -> list[dict]:
        """Pretrained backbone (and pretrained neck) at lr, the new layers at 10x lr."""
        neck = list(self.neck.parameters()) if self.neck is not None else []
        pretrained = neck if self.neck_pretrained else []
        new = list(self.classifier.parameters()) + ([] if self.neck_pretrained else neck)
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad] + pretrained, "lr": lr},
                {"params": new, "lr": 10 * lr}]


def build_classifier(backbone_name: str = "efficientnet-lite0", num_classes: int = 20, output_stride: int = 16,
                     weights: str | Path | None = "imagenet") -> CAMClassifier:
    backbone, fc = build_backbone_fc(backbone_name, output_stride, weights, LARGEFOV_WIDTH)
    if backbone_name != "vgg16":
        return CAMClassifier(backbone, num_classes)
    neck = nn.Sequential(*largefov_fc(backbone.out_channels, LARGEFOV_WIDTH))
    if fc is not None:
        neck.load_state_dict(fc)
    return CAMClassifier(backbone, num_classes, neck, neck_pretrained=fc is not None)
