"""Segmentation nets: a dilated backbone, a DeepLab head, logits upsampled to the input size.

Heads:
- `largefov` (DeepLab v1 LargeFOV, the AE-PSL / STC setting on VGG16): fc6 = 3x3 conv, dilation 12,
  `width` channels; fc7 = 1x1 conv, `width`; ReLU and dropout 0.5 after each; fc8 = 1x1 conv to C.
  On vgg16 with weights, fc6/fc7 start from VGG16's fc6/fc7, decimated as DeepLab did
  (`backbones.decimate_vgg16_fc`), and train at the backbone's learning rate as in DeepLab's
  LargeFOV (lr_mult 1 for fc6/fc7, 10 for fc8); elsewhere they start random and train at 10x.
- `aspp` (DeepLab v2 ASPP-L, its ResNet form): four parallel 3x3 convs to C with dilation
  6/12/18/24, summed. With `width`, a 1x1 conv + ReLU first reduces the features to `width` channels.

`width` defaults (`head_width`): the papers' on VGG16 and the ResNets (LargeFOV 1024; ASPP straight
from the 2048 ResNet features); 256 on EfficientNet-Lite, the CPU default, whose 1280 features at
output stride 8 would otherwise make the head cost as much as the backbone (a 1280 -> 1024 dilated
3x3 conv alone is ~12 MMAC per output pixel, the ASPP branches ~1 MMAC).

The PSL variant adds an image classification branch: global average pooling of the backbone
features and a linear layer to the C-1 object classes.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.backbones import LARGEFOV_WIDTH, Backbone, build_backbone, build_backbone_fc, largefov_fc

HEADS = ("largefov", "aspp")
ASPP_RATES = (6, 12, 18, 24)


def _init_classifier(conv: nn.Conv2d) -> None:
    """DeepLab's init of the last layer: small gaussian weights, zero bias."""
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)


class LargeFOV(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int, width: int = LARGEFOV_WIDTH, dropout: float = 0.5,
                 fc: dict[str, torch.Tensor] | None = None):
        """fc: fc6/fc7 weights (`decimate_vgg16_fc`) to start from; None: random."""
        fc8 = nn.Conv2d(width, num_classes, 1)
        _init_classifier(fc8)
        super().__init__(*largefov_fc(in_channels, width, dropout), fc8)
        if fc is not None:
            nn.Sequential(*list(self)[:6]).load_state_dict(fc)
        self.pretrained_fc = fc is not None

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return [p for layer in list(self)[:6] for p in layer.parameters()] if self.pretrained_fc else []


class ASPP(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int | None = None,
                 rates: tuple[int, ...] = ASPP_RATES):
        super().__init__()
        self.reduce = None
        if width is not None:
            self.reduce = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.ReLU(inplace=True))
            in_channels = width
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        for branch in self.branches:
            _init_classifier(branch)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce is not None:
            x = self.reduce(x)
        return sum(branch(x) for branch in self.branches)


def valid_mean(features: torch.Tensor, size, valid=None) -> torch.Tensor:
    """Global average of `features` (N, K, h, w) of inputs of `size` (H, W), each over the part that
    covers its `valid` (h, w) input pixels (all of it when `valid` is None)."""
    if valid is None:
        return features.mean((2, 3))
    h, w = features.shape[-2:]
    return torch.stack([features[i, :, :math.ceil(vh * h / size[0]), :math.ceil(vw * w / size[1])].mean((1, 2))
                        for i, (vh, vw) in enumerate(valid)])


class SegNet(nn.Module):
    def __init__(self, backbone: Backbone, head: nn.Module, num_classes: int, cls_branch: bool = False):
        """num_classes: C, background included; the classification branch predicts the C-1 objects."""
        super().__init__()
        self.backbone, self.head = backbone, head
        self.cls = nn.Linear(backbone.out_channels, num_classes - 1) if cls_branch else None

    def forward(self, x: torch.Tensor, valid=None) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) -> {"seg": (N, C, H, W) logits, "cls": (N, C-1) logits (PSL branch only)}.

        `valid`: for inputs padded at the bottom and right (`wsss.shapes`), each one's (h, w) before
        padding: the classification branch then averages the features over the image alone."""
        features = self.backbone(x)
        seg = F.interpolate(self.head(features), size=x.shape[2:], mode="bilinear", align_corners=False)
        out = {"seg": seg}
        if self.cls is not None:
            out["cls"] = self.cls(valid_mean(features, x.shape[2:], valid))
        return out

    def param_groups(self, lr: float) -> list[dict]:
        """Pretrained backbone (and head layers) at lr, the new head layers (and classification
        branch) at 10x lr."""
        pretrained = self.head.pretrained_parameters()
        new = [p for p in self.head.parameters() if all(p is not q for q in pretrained)]
        new += list(self.cls.parameters()) if self.cls is not None else []
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad] + pretrained, "lr": lr},
                {"params": new, "lr": 10 * lr}]


def resolve_head(backbone_name: str, head: str = "auto") -> str:
    """The head a net gets: "auto" is LargeFOV on vgg16 (DeepLab v1), ASPP otherwise (DeepLab v2)."""
    if head == "auto":
        head = "largefov" if backbone_name == "vgg16" else "aspp"
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose auto or one of {', '.join(HEADS)}")
    return head


def head_width(backbone_name: str, head: str) -> int | None:
    """Default head width (module docstring says why)."""
    if backbone_name.startswith("efficientnet"):
        return 256
    return LARGEFOV_WIDTH if head == "largefov" else None


def build_segnet(backbone_name: str = "efficientnet-lite0", num_classes: int = 21, head: str = "auto",
                 output_stride: int = 8, cls_branch: bool = False, weights: str | Path | None = "imagenet",
                 width: int | None = None) -> SegNet:
    """head: `resolve_head`. width None: `head_width`'s default."""
    if num_classes < 2:
        raise ValueError(f"num_classes counts background and at least one object class, got {num_classes}")
    head = resolve_head(backbone_name, head)
    width = head_width(backbone_name, head) if width is None else width
    if width is not None and width < 1:
        raise ValueError(f"head width must be a positive number of channels, got {width}")
    if head == "largefov":
        backbone, fc = build_backbone_fc(backbone_name, output_stride, weights, width)
        module: nn.Module = LargeFOV(backbone.out_channels, num_classes, width, fc=fc)
    else:
        backbone = build_backbone(backbone_name, output_stride, weights)
        module = ASPP(backbone.out_channels, num_classes, width)
    return SegNet(backbone, module, num_classes, cls_branch)
