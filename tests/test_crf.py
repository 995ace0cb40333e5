"""Dense CRF over an image's own labels, the 255 rule, and the failure-isolating process pool."""
import os

import numpy as np
import pytest

from wsss.crf import crf_labels, dense_crf, label_unary
from wsss.workers import crf_many, parallel_map

pytest.importorskip("pydensecrf.densecrf")


def two_regions(h=32, w=48):
    """A dark left half and a bright right half, labelled 0 and 1."""
    rng = np.random.default_rng(0)
    image = np.empty((h, w, 3), np.uint8)
    image[:, : w // 2] = 40
    image[:, w // 2:] = 210
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    labels = np.zeros((h, w), np.uint8)
    labels[:, w // 2:] = 1
    return image, labels


def three_regions(h=30, w=60):
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :20] = (200, 30, 30)
    image[:, 20:40] = (30, 200, 30)
    image[:, 40:] = (30, 30, 200)
    truth = np.repeat(np.array([0] * 20 + [1] * 20 + [2] * 20)[None], h, axis=0)
    return image, truth


def test_perfect_labelling_comes_back_the_same():
    image, labels = two_regions()
    for mode in ("agree", "fill"):
        np.testing.assert_array_equal(crf_labels(image, labels, [1], mode=mode), labels)
    prob = np.stack([labels == 0, labels == 1]).astype(np.float32) * 0.9 + 0.05
    np.testing.assert_array_equal(dense_crf(image, prob).argmax(0), labels)


def test_labels_map_back_to_mask_ids():
    image, labels = two_regions()
    labels = np.where(labels == 1, 15, 0).astype(np.uint8)  # class 15 (person), not index 1
    assert set(np.unique(crf_labels(image, labels, [15]))) == {0, 15}


def test_restricted_labels_match_the_full_label_run_when_absent_classes_have_no_probability():
    image, truth = three_regions()
    rng = np.random.default_rng(1)
    full = np.zeros((6,) + truth.shape, np.float32)  # classes 0, 1, 2 present; 3, 4, 5 absent
    for c in range(3):
        full[c] = np.where(truth == c, 0.6, 0.2)
    full[:3] += rng.uniform(0, 0.15, (3,) + truth.shape).astype(np.float32)  # ambiguous, noisy unaries
    full[:3] /= full[:3].sum(0, keepdims=True)
    full[3:] = 1e-9
    full_labels = dense_crf(image, full).argmax(0)
    present_labels = np.array([0, 1, 2])[dense_crf(image, full[:3]).argmax(0)]
    np.testing.assert_array_equal(present_labels, full_labels)
    np.testing.assert_array_equal(full_labels, truth)


def test_ignore_pixels_filled_from_neighbours_in_fill_mode_and_kept_in_agree_mode():
    image, truth = three_regions()
    labels = truth.astype(np.uint8).copy()
    labels[:, 15:25] = 255  # a strip across the 0|1 border is unlabelled
    filled = crf_labels(image, labels, [1, 2], mode="fill")
    np.testing.assert_array_equal(filled, truth)
    agreed = crf_labels(image, labels, [1, 2], mode="agree")
    assert (agreed[:, 15:25] == 255).all()
    np.testing.assert_array_equal(agreed[labels != 255], truth[labels != 255])


def test_agree_mode_ignores_labels_the_crf_overturns():
    image, truth = three_regions()
    labels = truth.astype(np.uint8).copy()
    labels[10:20, 2:6] = 2  # a wrong patch inside the red region
    agreed = crf_labels(image, labels, [1, 2], gt_prob=0.6)
    assert (agreed[10:20, 2:6] == 255).all()
    np.testing.assert_array_equal(agreed[labels == truth], truth[labels == truth])


def test_soft_scores_steer_ignore_pixels():
    image = np.full((20, 20, 3), 120, np.uint8)  # no edges: only the unaries decide
    labels = np.full((20, 20), 255, np.uint8)
    labels[:, :3] = 0
    soft = np.stack([np.full((20, 20), 0.05), np.full((20, 20), 0.95)]).astype(np.float32)
    filled = crf_labels(image, labels, [1], mode="fill", soft=soft, confidence=0.0)
    assert (filled[:, 10:] == 1).all()


def test_unary_rules():
    labels = np.array([[0, 3, 255]], np.uint8)
    prob = label_unary(labels, np.array([0, 3]), gt_prob=0.8)
    np.testing.assert_allclose(prob[:, 0, 0], [0.8, 0.2])
    np.testing.assert_allclose(prob[:, 0, 1], [0.2, 0.8])
    np.testing.assert_allclose(prob[:, 0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"ids \[7\]"):
        label_unary(np.array([[7]], np.uint8), np.array([0, 3]), gt_prob=0.8)


def test_background_only_image():
    image, _ = two_regions()
    labels = np.zeros(image.shape[:2], np.uint8)
    labels[0, 0] = 255
    assert (crf_labels(image, labels, [], mode="fill") == 0).all()
    out = crf_labels(image, labels, [])
    assert out[0, 0] == 255 and (out.ravel()[1:] == 0).all()


def test_bad_input_is_a_clear_error():
    image, labels = two_regions()
    with pytest.raises(ValueError, match="does not match image"):
        crf_labels(image, labels[:-1], [1])
    with pytest.raises(ValueError, match="must be"):
        dense_crf(image.astype(np.float32), np.ones((2,) + labels.shape, np.float32))


def _fragile(x):
    if x == 2:
        raise RuntimeError("bad image")
    if x == 4:
        os._exit(3)  # a crash in native code kills the worker
    return x * 10


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_item_keeps_the_others(workers):
    items = [0, 1, 2, 3] + ([4] if workers > 1 else [])
    got = {item: (result, error) for item, result, error in parallel_map(_fragile, items, workers)}
    assert set(got) == set(items)
    assert isinstance(got[2][1], RuntimeError)
    if workers > 1:
        assert got[4][0] is None and got[4][1] is not None
    assert {i: got[i][0] for i in (0, 1, 3)} == {0: 0, 1: 10, 3: 30}


def test_crf_many_falls_back_to_the_pre_crf_labels_of_a_failing_image():
    image, labels = two_regions()
    noisy = labels.copy()
    noisy[5:8, 2:5] = 1  # a wrong patch the CRF removes
    bad = {"id": "bad", "image": image, "labels": labels[:-1], "keys": [1]}  # wrong size
    jobs = [{"image": image, "labels": noisy, "keys": [1]}, bad, {"image": image, "labels": labels, "keys": [1]}]
    out = crf_many(jobs, workers=2, mode="fill")
    np.testing.assert_array_equal(out[0], labels)
    np.testing.assert_array_equal(out[1], labels[:-1])
    np.testing.assert_array_equal(out[2], labels)


def test_each_net_gets_the_test_time_crf_published_for_it():
    from wsss.nets import net_crf

    def kernels(backbone, head="auto"):
        p = net_crf({"backbone": backbone, "head": head})
        return p["bi_compat"], p["bi_sxy"], p["bi_srgb"], p["gauss_compat"], p["gauss_sxy"], p["iterations"]

    assert kernels("vgg16") == (4, 121, 5, 3, 3, 10)  # DeepLab v1 LargeFOV
    assert kernels("vgg16", "aspp") == (4, 65, 3, 2, 2, 10)  # DeepLab v2 VGG16
    assert kernels("resnet101") == (4, 67, 3, 3, 1, 10)  # DeepLab v2 ResNet-101
    assert kernels("resnet50") == kernels("efficientnet-lite0", "largefov") == kernels("resnet101")
    with pytest.raises(ValueError, match="unknown head"):
        net_crf({"backbone": "vgg16", "head": "fcn"})
