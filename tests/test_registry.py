"""The typed registries: stage-3 methods (wsss.methods) and backbones (wsss.models.backbones)."""
from __future__ import annotations

import pytest
import torch

from wsss.methods import METHODS, Method, register
from wsss.models import backbones
from wsss.models.backbones import (
    BACKBONES,
    BackboneEntry,
    build_backbone,
    imagenet_classifier,
    register_backbone,
)


def test_the_packaged_methods_are_typed_entries():
    assert sorted(METHODS) == ["gt", "psl", "stc"]
    assert all(isinstance(m, Method) and m.name == name for name, m in METHODS.items())
    assert METHODS["psl"].reads == "pseudo" and METHODS["psl"].folders == ("psl", "psl-plus")
    assert METHODS["gt"].reads == "masks" and METHODS["gt"].args is None
    assert METHODS["stc"].args is not None


def test_register_adds_a_method_and_returns_the_function():
    def train(ctx):
        return "x"

    try:
        assert register("x", reads="pseudo", folders=["x"])(train) is train
        assert METHODS["x"] == Method("x", train, "pseudo", ("x",))
        METHODS["y"] = {"train": train, "reads": "masks", "folders": ("y",)}  # the older dict form
        assert METHODS["y"] == Method("y", train, "masks", ("y",))
        METHODS.update({"z": {"train": train, "reads": "masks", "folders": ("z",)}})
        assert isinstance(METHODS["z"], Method)
    finally:
        for name in "xyz":
            METHODS.pop(name, None)


@pytest.mark.parametrize("entry, error", [
    ({"train": lambda ctx: "x", "reads": "pseudo-masks", "folders": ("x",)}, "reads must be one of pseudo, masks"),
    ({"train": lambda ctx: "x", "reads": "pseudo", "folders": "x"}, "folders is a tuple"),
    ({"train": lambda ctx: "x", "reads": "pseudo", "folders": ("x",), "arg": None}, "unknown keys arg"),
    ({"train": "x", "reads": "pseudo", "folders": ("x",)}, "train must be a function"),
])
def test_a_wrong_entry_is_refused_where_it_is_registered(entry, error):
    with pytest.raises((TypeError, ValueError), match=error):
        METHODS["bad"] = entry
    assert "bad" not in METHODS


def test_the_backbone_table_keeps_its_names_and_order():
    assert list(BACKBONES) == ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "vgg16",
                               "resnet50", "resnet101"]
    assert all(isinstance(e, BackboneEntry) and e.name == name for name, e in BACKBONES.items())
    assert [n for n, e in BACKBONES.items() if e.largefov_fc] == ["vgg16"]
    assert BACKBONES["resnet50"].classifier == "fc." and BACKBONES["efficientnet-lite1"].classifier == "_fc."


def test_a_registered_backbone_is_built_by_name(monkeypatch):
    class Tiny(backbones.Backbone):
        def __init__(self, output_stride):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=output_stride, padding=1)
            self.out_channels = 4

        def forward(self, x):
            return self.conv(x)

    monkeypatch.setattr(backbones, "BACKBONES", dict(BACKBONES))  # the test leaves the table as it found it
    register_backbone("tiny", imagenet=lambda: Tiny(32).state_dict())(Tiny)
    net = build_backbone("tiny", 8, weights="imagenet")
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 4, 4) and net.frozen_bn
    with pytest.raises(ValueError, match="unknown backbone 'nope'; choose one of efficientnet-lite0, .*, tiny"):
        build_backbone("nope", 8, weights=None)


def test_a_backbone_without_a_classifier_says_why():
    with pytest.raises(ValueError, match="^the DeepLab VGG16 backbone drops VGG's FC layers and changes its "
                                         "pooling; it has no ImageNet classifier$"):
        imagenet_classifier("vgg16")
