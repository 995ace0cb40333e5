import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.cam import CAMFileError, load_cams, multiscale_cams, multiscale_cams_batch, save_cams, to_input

torch.set_num_threads(2)


class PoolClassifier(torch.nn.Module):
    """A CAM classifier whose "backbone" is 4x4 average pooling: CAM = W . pool(x), by hand."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.classifier = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(weight.view(*weight.shape, 1, 1))

    def features(self, x):
        return F.avg_pool2d(x, 4)

    def cams(self, x):
        return self.classifier(self.features(x))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3), keepdim=True)).flatten(1)


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_single_scale_cam_equals_hand_computation():
    weight = torch.tensor([[1.0, -0.5, 0.25], [-1.0, 2.0, 0.0], [0.3, 0.3, -0.9]])
    model = PoolClassifier(weight)
    image = random_image(32, 48)
    cam = multiscale_cams(model, image, keys=[1, 3], scales=(1.0,), flip=False)

    x = to_input(image[None], torch.device("cpu"))[0].numpy()  # (3, 32, 48) normalised
    pooled = x.reshape(3, 8, 4, 12, 4).mean((2, 4))  # (3, 8, 12)
    raw = np.einsum("kc,chw->khw", weight.numpy(), pooled)[[0, 2]]  # classes 1 and 3
    relu = np.maximum(raw, 0)  # ReLU at the net's resolution, then upsampled (IRN's make_cam)
    expected = F.interpolate(torch.from_numpy(relu)[None], (32, 48), mode="bilinear", align_corners=False)[0].numpy()
    expected /= expected.max(axis=(1, 2), keepdims=True) + 1e-5
    assert cam.shape == (2, 32, 48) and cam.dtype == np.float32
    np.testing.assert_allclose(cam, expected, atol=1e-5)
    assert cam.min() >= 0 and np.allclose(cam.max(axis=(1, 2)), 1, atol=1e-4)


def test_each_view_is_relud_before_the_sum():
    """Two scales, one flip: ReLU on each view's map, then the sum (PSA, IRN), by hand; where one
    view is negative and another positive, a ReLU after the sum would lose the positive evidence."""
    weight = torch.tensor([[1.0, -0.5, 0.25], [-1.0, 2.0, 0.0]])
    model = PoolClassifier(weight)
    image = random_image(32, 48, seed=3)
    cam = multiscale_cams(model, image, keys=[1, 2], scales=(1.0, 0.5), flip=True)

    x = to_input(image[None], torch.device("cpu"))
    raws = []  # each view's class maps at the net's resolution, flip undone
    for size in ((32, 48), (16, 24)):
        xs = x if size == (32, 48) else F.interpolate(x, size, mode="bilinear", align_corners=False)
        raws += [model.cams(xs), model.cams(xs.flip(-1)).flip(-1)]

    def summed(maps):
        return sum(F.interpolate(m, (32, 48), mode="bilinear", align_corners=False)[0] for m in maps).detach().numpy()

    views = np.stack([summed([r]) for r in raws])  # (4, 2, 32, 48)
    assert ((views < 0).any(0) & (views > 0).any(0)).any()  # somewhere one view says no, another yes
    expected = summed([r.clamp(min=0) for r in raws])
    expected /= expected.max(axis=(1, 2), keepdims=True) + 1e-5
    np.testing.assert_allclose(cam, expected, atol=1e-5)
    after_sum = np.maximum(views.sum(0), 0)
    after_sum /= after_sum.max(axis=(1, 2), keepdims=True) + 1e-5
    assert np.abs(cam - after_sum).max() > 0.05  # the two orders differ on this image


def test_flip_is_undone():
    """A mirror-symmetric image gives the same CAM with and without flip (both normalised)."""
    model = PoolClassifier(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    half = random_image(32, 24)
    image = np.concatenate([half, half[:, ::-1]], axis=1)
    with_flip = multiscale_cams(model, image, [1, 2, 3], scales=(1.0,), flip=True)
    without = multiscale_cams(model, image, [1, 2, 3], scales=(1.0,), flip=False)
    np.testing.assert_allclose(with_flip, without, atol=1e-4)  # up to the +1e-5 of the normalisation


def test_multiscale_flip_shapes_non_square_and_labelled_classes_only():
    model = PoolClassifier(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))
    image = random_image(37, 58)
    cam = multiscale_cams(model, image, keys=[2, 5], scales=(0.5, 1.0, 1.5, 2.0), flip=True)
    assert cam.shape == (2, 37, 58) and cam.dtype == np.float32
    assert 0 <= cam.min() and cam.max() <= 1
    assert multiscale_cams(model, image, keys=[], scales=(1.0, 2.0)).shape == (0, 37, 58)
    with pytest.raises(ValueError, match="outside"):
        multiscale_cams(model, image, keys=[6])


def test_batched_images_equal_one_at_a_time():
    model = PoolClassifier(torch.randn(4, 3, generator=torch.Generator().manual_seed(2)))
    images = [random_image(40, 52, seed) for seed in range(3)]
    keys = [[1], [2, 4], [3]]
    batched = multiscale_cams_batch(model, images, keys, scales=(0.5, 1.0, 1.5), flip=True)
    for image, k, cam in zip(images, keys, batched, strict=True):
        np.testing.assert_allclose(cam, multiscale_cams(model, image, k, scales=(0.5, 1.0, 1.5)), atol=1e-5)


def test_save_load_roundtrip_and_wrong_shape_raises(tmp_path):
    # a CAM is a stride-16 feature map upsampled bilinearly to the image
    features = torch.rand((1, 2, 3, 4), generator=torch.Generator().manual_seed(0))
    cam = torch.nn.functional.interpolate(features, size=(30, 42), mode="bilinear", align_corners=False)[0].numpy()
    returned = save_cams(tmp_path, "a", cam.astype(np.float32), [3, 7])
    with np.load(tmp_path / "a.npz") as f:  # a quarter of the size, in steps of 1/255
        assert f["cam"].dtype == np.uint8 and f["cam"].shape == (2, 8, 11) and f["keys"].dtype == np.int64
    loaded, keys = load_cams(tmp_path, "a", expected_shape=(30, 42))
    np.testing.assert_array_equal(loaded, returned)  # what the writer mines is what readers get
    assert np.abs(loaded - cam).mean() < 0.02
    assert ((loaded > 0.5) == (cam > 0.5)).mean() > 0.97  # a region mined from it is (nearly) the same
    assert keys.tolist() == [3, 7]
    with pytest.raises(CAMFileError, match=r"a\.npz.*differs from the image size"):
        load_cams(tmp_path, "a", expected_shape=(42, 30))
    with pytest.raises(CAMFileError, match="not found"):
        load_cams(tmp_path, "missing", expected_shape=(30, 42))
    # a float map at the image's size (the first format, another CAM method's) is read as it is
    np.savez(tmp_path / "f.npz", cam=cam.astype(np.float16), keys=np.array([3, 7], np.int64))
    np.testing.assert_allclose(load_cams(tmp_path, "f", expected_shape=(30, 42))[0], cam, atol=1e-3)
    np.savez(tmp_path / "b.npz", cam=cam.astype(np.float16), keys=np.array([1], np.int64))
    with pytest.raises(CAMFileError, match=r"b\.npz.*does not fit"):
        load_cams(tmp_path, "b", expected_shape=(30, 42))
    (tmp_path / "c.npz").write_bytes(b"garbage")
    with pytest.raises(CAMFileError, match=r"c\.npz.*cannot read"):
        load_cams(tmp_path, "c", expected_shape=(30, 42))
    with pytest.raises(ValueError):
        save_cams(tmp_path, "d", cam, [1])
