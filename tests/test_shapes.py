"""Few shapes on the GPU: padding to a size divisor, buckets, and crops that keep the padding out of results."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.cam import SCALES, multiscale_cams_batch
from wsss.models.segnet import valid_mean
from wsss.predict import predict_probs_batch
from wsss.shapes import SIZE_DIVISOR, batches, bucket, fitted_size, padded_size, scaled_size, shard_batches

torch.set_num_threads(2)
VOC_SIZES = Path(__file__).resolve().parent.parent / "bench" / "data" / "voc12_sizes.csv"


def voc_sizes(split: str) -> list[tuple[tuple[int, int], int]]:
    """((h, w), count) of every image size of a VOC 2012 split (the table in bench/data)."""
    with open(VOC_SIZES, newline="") as f:
        return [((int(r["height"]), int(r["width"])), int(r[split])) for r in csv.DictReader(f) if int(r[split])]


def test_padded_size_and_bucket():
    assert padded_size((375, 500), 64) == (384, 512)
    assert padded_size((384, 512), 64) == (384, 512)
    assert padded_size((37, 50), 1) == (37, 50)
    assert bucket((375, 500), (0.5, 1.0), 64) == ((192, 256), (384, 512))
    assert bucket((333, 500), (0.5, 1.0), 64) == bucket((375, 500), (0.5, 1.0), 64)
    assert fitted_size((600, 2000), 1000) == (300, 1000) and fitted_size((60, 80), 1000) == (60, 80)
    with pytest.raises(ValueError):
        padded_size((10, 10), 0)
    scales = (0.5, 0.75, 1.0, 1.5, 2.0)
    assert bucket((375, 501), scales, 1) == tuple(scaled_size((375, 501), s) for s in scales)  # a CPU pads nothing


def test_batches_group_by_key_in_order_and_ranks_split_contiguously():
    items = ["a1", "b1", "a2", "a3", "b2", "c1", "a4"]
    assert batches(items, lambda s: s[0], 3) == [["a1", "a2", "a3"], ["a4"], ["b1", "b2"], ["c1"]]
    planned = batches(range(20), lambda i: i // 7, 2)
    shares = [shard_batches(planned, r, 3) for r in range(3)]
    assert [b for share in shares for b in share] == planned  # every batch once, in order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_voc_train_aug_sizes_make_few_gpu_shapes():
    """One pass over VOC's train_aug sizes at the CAM scales: under 40 input shapes per scale on the
    GPU, against hundreds of sizes unpadded (the table keeps the test independent of the dataset)."""
    sizes = voc_sizes("train_aug")
    assert sum(n for _, n in sizes) == 10582 and len(sizes) > 700
    divisor = SIZE_DIVISOR["cuda"]
    for i, scale in enumerate(SCALES):
        shapes = {bucket(size, SCALES, divisor)[i] for size, _ in sizes}
        assert len(shapes) < 40, (scale, len(shapes))
    buckets = {bucket(size, SCALES, divisor) for size, _ in sizes}
    assert len(buckets) < 50  # an image's views bucket together: about the count of one scale


class PoolCAM(torch.nn.Module):
    """A classifier whose features are 4x4 average pooling: no receptive field beyond its stride, so
    padding may change a map only where bilinear upsampling reaches the padded features."""

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[1.0, -0.5, -0.5], [-0.5, 1.0, -0.5]]).view(2, 3, 1, 1))

    def cams(self, x):
        return self.classifier(F.avg_pool2d(x, 4))

    def forward(self, x, valid=None):
        seg = self.cams(x)
        return {"seg": torch.cat([seg.new_zeros(seg[:, :1].shape), seg], 1),
                "cls": valid_mean(seg, x.shape[2:], valid)}


def blob_image(h, w, seed=0):
    """Grey with a red and a green square well inside: each class's map peaks in the interior."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 118, np.uint8) + rng.integers(0, 6, (h, w, 3), dtype=np.uint8)
    image[h // 4:h // 2, w // 4:w // 2] = (230, 40, 40)
    image[h // 2:3 * h // 4, w // 2:3 * w // 4] = (40, 230, 40)
    return image


@pytest.mark.parametrize("flip", [False, True])
def test_padded_cams_equal_unpadded(flip):
    """A net without context beyond its stride, sizes its stride divides at each scale: the padded
    CAMs are the unpadded ones exactly (the crop keeps the view's own grid), mirror included."""
    model, image = PoolCAM(), blob_image(48, 72)
    plain = multiscale_cams_batch(model, [image], [[1, 2]], scales=(1.0, 0.5), flip=flip, divisor=1)[0]
    padded = multiscale_cams_batch(model, [image], [[1, 2]], scales=(1.0, 0.5), flip=flip, divisor=64)[0]
    assert padded.shape == plain.shape == (2, 48, 72)
    np.testing.assert_allclose(padded, plain, atol=1e-6)


def test_a_bucket_batch_gives_each_image_its_own_result():
    """Images of different sizes in one bucket: each one's CAMs and probabilities in the batch are
    those it gets alone (the crop is per image, never the batch's)."""
    model = PoolCAM()
    images = [blob_image(48, 72, 0), blob_image(40, 80, 1), blob_image(56, 96, 2)]
    scales = (1.0, 0.5)
    assert len({bucket(im.shape[:2], scales, 64) for im in images}) == 1
    together = multiscale_cams_batch(model, images, [[1, 2], [2], [1]], scales=scales, flip=True, divisor=64)
    for image, keys, cam in zip(images, [[1, 2], [2], [1]], together, strict=True):
        alone = multiscale_cams_batch(model, [image], [keys], scales=scales, flip=True, divisor=64)[0]
        assert cam.shape == (len(keys), *image.shape[:2])
        np.testing.assert_allclose(cam, alone, atol=1e-5)
    probs = predict_probs_batch(model, images, "cpu", scales, flip=True, gate=True, divisor=64)
    for image, p in zip(images, probs, strict=True):
        alone = predict_probs_batch(model, [image], "cpu", scales, flip=True, gate=True, divisor=64)[0]
        assert p.shape == (3, *image.shape[:2])
        torch.testing.assert_close(p, alone, atol=1e-5, rtol=1e-5)


def test_padded_predictions_equal_unpadded():
    model, image = PoolCAM(), blob_image(48, 72)
    plain = predict_probs_batch(model, [image], "cpu", (1.0, 0.5), flip=True, gate=True, divisor=1)[0]
    padded = predict_probs_batch(model, [image], "cpu", (1.0, 0.5), flip=True, gate=True, divisor=64)[0]
    torch.testing.assert_close(padded, plain, atol=1e-6, rtol=1e-5)


def test_images_of_two_buckets_are_refused_together():
    model = PoolCAM()
    with pytest.raises(ValueError, match="different shapes"):
        multiscale_cams_batch(model, [blob_image(48, 72), blob_image(48, 140)], [[1], [1]], divisor=64)


def test_ranks_share_the_images_once_each(tiny_voc_factory, monkeypatch):
    """Under torchrun every image is predicted by exactly one rank (on a GPU, by bucket: few shapes each)."""
    from wsss.data.voc import VOCDataset
    from wsss.predict import rank_share

    dataset = VOCDataset(tiny_voc_factory(n_train=7), "train")
    shares = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        shares.append(rank_share(dataset, dataset.ids, (1.0,), "cpu"))
    assert sorted(i for share in shares for i in share) == sorted(dataset.ids)
    assert all(shares)


def test_a_photo_larger_than_max_side_is_predicted_at_that_size(tiny_voc_factory, monkeypatch, tmp_path):
    """Memory stays bounded: the net sees the photo at MAX_SIDE, the mask comes out at full size."""
    from wsss import io, predict
    from wsss.data.voc import VOCDataset

    dataset = VOCDataset(tiny_voc_factory(n_train=2), "train")
    seen = []
    real = predict.predict_probs_batch

    def spy(model, images, *args, **kwargs):
        seen.extend(im.shape[:2] for im in images)
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(predict, "MAX_SIDE", 32)
    monkeypatch.setattr(predict, "predict_probs_batch", spy)
    for crf in (False, True):
        out = tmp_path / f"pred-{crf}"
        predict.predict_split(PoolCAM(), dataset, dataset.ids, out, device="cpu",
                              options=predict.PredictOptions(restrict=True, crf=crf))
        for id_ in dataset.ids:
            assert io.read_mask(out / f"{id_}.png").shape == dataset.image(id_).shape[:2]
    assert seen and all(max(s) == 32 for s in seen)


def test_the_classifiers_val_map_sees_photos_at_most_max_side(tiny_voc_factory, monkeypatch):
    from wsss import erasing
    from wsss.data.voc import VOCDataset

    dataset = VOCDataset(tiny_voc_factory(n_train=3), "train")
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return torch.zeros(len(x), dataset.num_classes - 1)

    monkeypatch.setattr(erasing, "MAX_SIDE", 32)
    erasing.classification_map(Spy(), dataset, dataset.ids, "cpu")
    assert seen and all(max(s) == 32 for s in seen)
