"""STC: the simple-image rule, the soft targets and the multi-label (soft) cross-entropy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss import io
from wsss.data.voc import VOCDataset
from wsss.losses import cross_entropy, soft_cross_entropy
from wsss.methods.stc import is_simple
from wsss.segtrain import SegmentationTrainSet

torch.set_num_threads(2)
ONE = np.array([0, 1, 0], np.float32)


def blob(h=40, w=50, boxes=((10, 30, 15, 35),), value=230, ground=0):
    sal = np.full((h, w), ground, np.uint8)
    for y0, y1, x0, x1 in boxes:
        sal[y0:y1, x0:x1] = value
    return sal


def test_one_concentrated_object_on_a_clean_ground_is_simple():
    assert is_simple(blob(), ONE)
    assert is_simple(blob().astype(np.float32) / 255, ONE)  # float saliency in [0, 1] reads the same


def test_more_than_one_label_or_none_is_not_simple():
    assert not is_simple(blob(), np.array([0, 1, 1], np.float32))
    assert not is_simple(blob(), np.zeros(3, np.float32))


def test_scattered_saliency_is_not_simple():
    two = blob(boxes=((5, 15, 5, 15), (25, 35, 30, 40)))  # two equal blobs: half the mass each
    assert not is_simple(two, ONE)
    assert is_simple(two, ONE, concentration=0.45, background=0.5)  # the thresholds decide


def test_salient_background_is_not_simple():
    hazy = blob(ground=25)  # 0.1 everywhere outside the object
    assert not is_simple(hazy, ONE, concentration=0.5)
    assert is_simple(hazy, ONE, concentration=0.5, background=0.15)
    assert not is_simple(np.full((20, 20), 230, np.uint8), ONE)  # the object fills the image
    assert not is_simple(np.zeros((20, 20), np.uint8), ONE)  # nothing salient at all


def test_training_items_carry_soft_targets_of_the_one_class(tiny_voc, tmp_path):
    train = VOCDataset(tiny_voc, "train")
    id_ = next(i for i in train.ids if train.labels(i).sum() == 1)
    image = train.image(id_)
    saliency = np.zeros(image.shape[:2], np.uint8)
    saliency[:, : image.shape[1] // 2] = 255  # left half fully salient
    io.write_png(tmp_path / "sal" / f"{id_}.png", saliency)
    items = SegmentationTrainSet(train, [id_], crop=80, target_dir=tmp_path / "sal", soft=True)
    item = items.item(0, np.random.default_rng(0))
    target, valid = item["target"], item["valid"]
    assert target.shape == (train.num_classes, 80, 80) and valid.shape == (80, 80)
    assert not valid.all() and valid.any()  # the crop is larger than the image: padding is not valid
    cls = int(train.label_ids(id_)[0])
    assert np.allclose(target[0] + target[cls], 1) and np.allclose(np.delete(target, [0, cls], axis=0), 0)
    assert set(np.unique(target[cls][valid]).round(3)) == {0.0, 1.0}  # full saliency reads as 1


def test_soft_cross_entropy_equals_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 2, 2))
    target = rng.random(size=(2, 3, 2, 2))
    target /= target.sum(1, keepdims=True)
    valid = np.array([[[1, 1], [0, 1]], [[1, 0], [0, 0]]], bool)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    per_pixel = -(target * log_p).sum(1)
    expected = per_pixel[valid].mean()
    got = soft_cross_entropy(torch.tensor(logits), torch.tensor(target), torch.tensor(valid))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got_all = soft_cross_entropy(torch.tensor(logits), torch.tensor(target))
    assert got_all.item() == pytest.approx(per_pixel.mean(), rel=1e-5)


def test_soft_cross_entropy_with_one_hot_targets_is_cross_entropy():
    logits = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (2, 3, 3), generator=torch.Generator().manual_seed(1))
    onehot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    assert soft_cross_entropy(logits, onehot).item() == pytest.approx(cross_entropy(logits, labels).item(), rel=1e-6)
