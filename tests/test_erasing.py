import numpy as np
import pytest
import torch

from wsss import io
from wsss.cam import load_cams, save_cams
from wsss.data.transforms import MEAN, normalize
from wsss.data.voc import VOCDataset
from wsss.erasing import (
    ErasedImages,
    average_precision,
    constant_predictor_loss,
    erased_image,
    erased_region,
    stop_loss_of,
    write_union,
)
from wsss.fusion import regions_label_map
from wsss.mining import MEAN_PIXEL, erase, mine
from wsss.scoremaps import restore_scores

torch.set_num_threads(2)


def test_erase_sets_exactly_the_mask_to_the_mean_pixel():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = rng.random((20, 30)) > 0.7
    out = erase(image, mask)
    assert np.array_equal(out[mask], np.broadcast_to(MEAN_PIXEL, (mask.sum(), 3)))
    assert np.array_equal(out[~mask], image[~mask])
    assert not np.shares_memory(out, image)
    assert np.abs(normalize(out)[:, mask]).max() < 0.01  # the mean pixel is zero after normalisation
    assert np.array_equal(MEAN_PIXEL, np.round(MEAN * 255))
    with pytest.raises(ValueError):
        erase(image, mask[:10])


def test_erased_image_erases_the_union_of_earlier_steps_and_nothing_else(tiny_voc, tmp_path):
    ds = VOCDataset(tiny_voc, "train")
    id_ = ds.ids[0]
    image = ds.image(id_)
    h, w = image.shape[:2]
    first, second = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    first[5:15, 10:20] = 1
    second[10:25, 15:40] = 2
    io.write_mask(tmp_path / "s1" / f"{id_}.png", first)
    io.write_mask(tmp_path / "s2" / f"{id_}.png", second)

    one = erased_image(ds, id_, [tmp_path / "s1"])
    both = erased_image(ds, id_, [tmp_path / "s1", tmp_path / "s2"])
    assert np.array_equal(one[first != 0], np.broadcast_to(MEAN_PIXEL, ((first != 0).sum(), 3)))
    assert np.array_equal(one[first == 0], image[first == 0])
    union = (first != 0) | (second != 0)
    assert np.array_equal(both[union], np.broadcast_to(MEAN_PIXEL, (union.sum(), 3)))
    assert np.array_equal(both[~union], image[~union])
    # the erased area only grows as steps are added
    assert (erased_region(id_, [tmp_path / "s1"], (h, w)) <= erased_region(id_, [tmp_path / "s1", tmp_path / "s2"],
                                                                            (h, w))).all()
    assert np.array_equal(erased_image(ds, id_, []), image)


def test_erased_images_items_follow_the_fit_contract(tiny_voc):
    ds = VOCDataset(tiny_voc, "train")
    train = ErasedImages(ds, ds.ids, [], crop=32)
    a = train.item(1, np.random.default_rng(5))
    b = train.item(1, np.random.default_rng(5))
    assert a["image"].shape == (3, 32, 32) and a["image"].dtype == np.float32
    assert np.array_equal(a["image"], b["image"])  # all randomness from rng
    assert np.array_equal(a["label"], ds.labels(ds.ids[1]))


def test_mine_and_label_map_resolve_overlaps_by_the_higher_cam():
    cam = np.zeros((2, 4, 4), np.float32)
    cam[0, :, :2] = 0.9
    cam[0, :, 2] = 0.6
    cam[1, :, 2:] = 0.8
    masks, region = mine(cam, np.array([3, 5]), 0.5)
    assert masks[0, :, :3].all() and not masks[0, :, 3].any()
    assert region[0].tolist() == [3, 3, 5, 5]
    assert regions_label_map(np.zeros((0, 4, 4), bool), np.zeros(0, np.int64), np.zeros((0, 4, 4))).max() == 0
    assert mine(cam, np.array([3, 5]), 0.95)[1].max() == 0


def test_average_precision_and_constant_predictor_loss():
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])) == 1.0
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([0, 1, 1])) == pytest.approx((1 / 2 + 2 / 3) / 2)
    labels = np.array([[1, 0], [0, 0], [1, 1], [0, 0]], np.float32)
    p = labels.mean(0)
    logits = torch.tensor(np.log(p / (1 - p))).repeat(4, 1)
    expected = torch.nn.functional.multilabel_soft_margin_loss(logits, torch.from_numpy(labels)).item()
    assert constant_predictor_loss(labels) == pytest.approx(expected, rel=1e-5)


def test_auto_stop_loss_is_halfway_between_step1_and_the_constant_predictor():
    assert stop_loss_of("auto", 0.2, 0.6) == pytest.approx(0.4)
    assert stop_loss_of(0.35, 0.2, 0.6) == 0.35


def test_union_regions_use_the_seed_threshold_and_the_max_over_steps(tiny_voc, tmp_path):
    ds = VOCDataset(tiny_voc, "train")
    id_ = next(i for i in ds.ids if len(ds.label_ids(i)))
    keys = ds.label_ids(id_)
    w, h = ds.image_size(id_)
    ramp = np.broadcast_to(np.linspace(0, 1, w, dtype=np.float32), (len(keys), h, w))
    save_cams(tmp_path / "step1" / "cam", id_, ramp, keys)  # rises left to right
    save_cams(tmp_path / "step2" / "cam", id_, ramp[..., ::-1], keys)  # falls left to right
    write_union(ds, [id_], tmp_path, [1, 2], threshold=0.6)
    with np.load(tmp_path / "regions" / f"{id_}.npz") as f:
        masks, score = f["masks"], restore_scores(f["score"], (h, w), id_)
    step1, _ = load_cams(tmp_path / "step1" / "cam", id_, (h, w))
    step2, _ = load_cams(tmp_path / "step2" / "cam", id_, (h, w))
    np.testing.assert_array_equal(masks, (np.maximum(step1, step2) > 0.6))
    assert masks[:, :, 0].all() and masks[:, :, -1].all() and not masks[:, :, w // 2].any()
    np.testing.assert_allclose(score, np.maximum(step1, step2), atol=0.05)  # stored again: the kink blurs
