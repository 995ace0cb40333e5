import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from wsss.data.transforms import normalize
from wsss.models.backbones import BACKBONES, build_backbone, imagenet_classifier
from wsss.models.classifier import CAMClassifier, build_classifier
from wsss.models.segnet import build_segnet

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised:UserWarning")

@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_feature_shape(name, output_stride):
    backbone = build_backbone(name, output_stride, weights=None).eval()
    with torch.no_grad():
        square = backbone(torch.randn(2, 3, 64, 64))
        odd = backbone(torch.randn(1, 3, 49, 40))
    assert square.shape == (2, backbone.out_channels, 64 // output_stride, 64 // output_stride)
    assert odd.shape[2:] == (-(-49 // output_stride), -(-40 // output_stride))  # rounded up


def test_random_init_is_warned_and_bad_names_are_errors():
    with pytest.warns(UserWarning, match="randomly initialised"):
        build_backbone("efficientnet-lite0", 16, weights=None)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet18", 16, weights=None)
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("vgg16", 4, weights=None)


def test_cam_is_the_classifier_applied_to_the_feature_map():
    torch.manual_seed(0)
    model = build_classifier("efficientnet-lite0", num_classes=3, output_stride=16, weights=None).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        features = model.backbone(x)
        cams = model.cams(x)
        logits = model(x)
    weight = model.classifier.weight[:, :, 0, 0]  # (classes, channels)
    by_hand = torch.einsum("kc,nchw->nkhw", weight, features)
    assert cams.shape == (2, 3, 4, 3)
    torch.testing.assert_close(cams, by_hand, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cams.mean((2, 3)), logits, rtol=1e-4, atol=1e-4)


def test_classifier_param_groups_cover_every_trainable_parameter_once():
    model = build_classifier("efficientnet-lite0", num_classes=4, weights=None)
    groups = model.param_groups(0.01)
    assert [g["lr"] for g in groups] == [0.01, 0.1]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert groups[1]["params"] == [model.classifier.weight]


@pytest.mark.parametrize("name,head", [("vgg16", "auto"), ("resnet50", "auto"), ("resnet101", "auto"),
                                       ("efficientnet-lite0", "auto"), ("efficientnet-lite0", "largefov"),
                                       ("vgg16", "aspp")])
def test_segnet_shapes_at_output_stride_8(name, head):
    model = build_segnet(name, num_classes=5, head=head, cls_branch=True, weights=None).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 49, 40))
    assert out["seg"].shape == (1, 5, 49, 40) and out["cls"].shape == (1, 4)
    expected = "LargeFOV" if head == "largefov" or (head == "auto" and name == "vgg16") else "ASPP"
    assert type(model.head).__name__ == expected


def test_segnet_trains_every_part_at_its_learning_rate():
    plain = build_segnet("efficientnet-lite0", num_classes=3, output_stride=16, weights=None)
    assert set(plain(torch.randn(1, 3, 32, 32))) == {"seg"}
    model = build_segnet("efficientnet-lite0", num_classes=3, cls_branch=True, output_stride=16, weights=None)
    out = model(torch.randn(2, 3, 32, 32))
    loss = F.cross_entropy(out["seg"], torch.randint(0, 3, (2, 32, 32))) + out["cls"].sum()
    loss.backward()
    backbone, new = model.param_groups(1e-3)
    assert backbone["lr"] == 1e-3 and new["lr"] == 1e-2
    assert all(p.grad is not None for g in (backbone, new) for p in g["params"])
    assert len(backbone["params"]) + len(new["params"]) == len(list(model.parameters()))


def test_local_torchvision_weights_load_and_freeze_batchnorm(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None)
    with torch.no_grad():  # non-default BN statistics, so loading them is visible
        reference.bn1.running_mean.uniform_(-1, 1)
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)

    backbone = build_backbone("resnet50", 16, weights=path)
    torch.testing.assert_close(backbone.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    torch.testing.assert_close(backbone.bn1.running_mean, reference.bn1.running_mean)
    backbone.train()
    assert not backbone.bn1.training and not backbone.bn1.weight.requires_grad
    assert backbone.layer1[0].conv1.weight.requires_grad
    model = CAMClassifier(backbone, 2)
    assert all(p.requires_grad for g in model.param_groups(0.1) for p in g["params"])

    # the same parameters at output stride 32 with the original fc are torchvision's ResNet-50
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(imagenet_classifier("resnet50", path)(x), reference.eval()(x))


def test_bad_weight_files_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("resnet50", 16, weights=tmp_path / "missing.pth")
    wrong = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, wrong)
    with pytest.raises(ValueError, match="vgg.pth does not fit"):
        build_backbone("resnet50", 16, weights=wrong)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth: cannot read"):
        build_backbone("vgg16", 16, weights=corrupt)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="--weights PATH"):
        build_backbone("resnet50", 16, weights="imagenet")


def test_efficientnet_lite0_imagenet_weights_are_real():
    """The shipped weights with their 1000-way head name two photos right, also once dilated."""
    skimage_data = pytest.importorskip("skimage.data")
    model = imagenet_classifier("efficientnet-lite0")
    photos = {"chelsea": (skimage_data.chelsea(), {281, 282, 285}),  # tabby, tiger cat, Egyptian cat
              "coffee": (skimage_data.coffee(), {967, 968})}  # espresso, cup
    for name, (photo, classes) in photos.items():
        x = torch.from_numpy(normalize(np.asarray(photo)))[None]  # ImageNet mean/std, as every caller
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            top = model(x).argmax(1).item()
            for output_stride in (8, 16):
                dilated = build_backbone("efficientnet-lite0", output_stride).eval()
                assert model.fc(dilated(x).mean((2, 3))).argmax(1).item() == top
        assert top in classes, f"{name}: predicted ImageNet class {top}"


# ---------------------------------------------------------------- DeepLab-LargeFOV's fc6/fc7 from VGG16's

@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """torchvision's VGG16 with random weights (no download), as a state dict file."""
    torch.manual_seed(0)
    reference = torchvision.models.vgg16(weights=None)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(reference.state_dict(), path)
    return path, reference.state_dict()


def test_vgg16_fc_decimation_takes_every_4th_filter_and_every_3rd_tap(vgg16_file):
    from wsss.models.backbones import decimate_vgg16_fc

    _, state = vgg16_file
    assert state["classifier.0.weight"].shape == (4096, 25088) and state["classifier.3.weight"].shape == (4096, 4096)
    fc = decimate_vgg16_fc(state)
    assert fc["0.weight"].shape == (1024, 512, 3, 3) and fc["0.bias"].shape == (1024,)
    assert fc["3.weight"].shape == (1024, 1024, 1, 1) and fc["3.bias"].shape == (1024,)
    fc6, fc7 = state["classifier.0.weight"], state["classifier.3.weight"]
    for out, cin, i, j in [(0, 0, 0, 0), (1, 7, 1, 2), (1023, 511, 2, 2), (517, 300, 2, 0)]:
        # fc6 input index = c * 49 + y * 7 + x (pool5 flattened C, H, W); taps y, x in (0, 3, 6)
        assert fc["0.weight"][out, cin, i, j] == fc6[4 * out, cin * 49 + 3 * i * 7 + 3 * j]
    assert torch.equal(fc["0.bias"], state["classifier.0.bias"][0::4])
    assert torch.equal(fc["3.weight"][:, :, 0, 0], fc7[0::4, 0::4])
    assert torch.equal(fc["3.bias"], state["classifier.3.bias"][0::4])
    assert decimate_vgg16_fc(state, width=256)["3.weight"].shape == (256, 256, 1, 1)
    with pytest.raises(ValueError, match="must divide"):
        decimate_vgg16_fc(state, width=1000)
    with pytest.raises(ValueError, match="x.pth: not VGG16's fc6/fc7.*classifier.3.weight missing"):
        decimate_vgg16_fc({k: v for k, v in state.items() if k != "classifier.3.weight"}, source="x.pth")


def test_vgg16_largefov_segnet_and_classifier_start_from_vgg_fc_layers(vgg16_file):
    from wsss.models.backbones import decimate_vgg16_fc

    path, state = vgg16_file
    fc = decimate_vgg16_fc(state)
    net = build_segnet("vgg16", num_classes=5, weights=path)
    torch.testing.assert_close(net.backbone.features[28].weight, state["features.28.weight"])
    assert net.head[0].dilation == (12, 12) and net.head[0].kernel_size == (3, 3)
    for layer, key in ((net.head[0], "0"), (net.head[3], "3")):
        assert torch.equal(layer.weight, fc[f"{key}.weight"]) and torch.equal(layer.bias, fc[f"{key}.bias"])
    backbone_group, new_group = net.param_groups(1e-3)  # fc6/fc7 at the backbone's rate, as DeepLab
    assert any(p is net.head[0].weight for p in backbone_group["params"])
    assert [p for p in new_group["params"]] == list(net.head[6].parameters())

    cls = build_classifier("vgg16", num_classes=3, output_stride=8, weights=path).eval()
    assert torch.equal(cls.neck[0].weight, fc["0.weight"]) and torch.equal(cls.neck[3].bias, fc["3.bias"])
    groups = cls.param_groups(0.01)
    assert groups[1]["params"] == [cls.classifier.weight]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(
        id(p) for p in cls.parameters() if p.requires_grad)
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        cams, logits = cls.cams(x), cls(x)
    assert cams.shape == (1, 3, 5, 6)
    torch.testing.assert_close(cams.mean((2, 3)), logits, rtol=1e-4, atol=1e-4)


def test_random_vgg16_fc_layers_train_as_new_layers():
    net = build_segnet("vgg16", num_classes=3, output_stride=16, weights=None)
    assert net.head.pretrained_parameters() == []
    assert len(net.param_groups(0.1)[1]["params"]) == len(list(net.head.parameters()))
    cls = build_classifier("vgg16", num_classes=2, weights=None)
    assert len(cls.param_groups(0.1)[1]["params"]) == 1 + len(list(cls.neck.parameters()))
