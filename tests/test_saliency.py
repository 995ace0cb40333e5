import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data.voc import DatasetError, VOCDataset
from wsss.io import read_image, read_mask, write_png
from wsss.saliency import compute_saliency
from wsss.saliency_maps import ensure_saliency, read_saliency

SHARED_VOC = Path(__file__).resolve().parents[2] / "shared" / "voc12"


def disc_image(h=90, w=140, cy=40, cx=85, r=18):
    """A bright disc, off-centre, on a smooth dark gradient; also its mask."""
    yy, xx = np.mgrid[:h, :w]
    image = np.empty((h, w, 3), np.float64)
    image[:] = (40 + 40 * xx / w + 20 * yy / h)[..., None] * np.array([1.0, 1.1, 1.3])
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image[inside] = (235, 220, 60)
    noise = np.random.default_rng(0).normal(0, 3, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), inside


def test_disc_is_salient_and_shape_kept_for_non_square_images():
    image, inside = disc_image()
    saliency = compute_saliency(image)
    assert saliency.shape == (90, 140) and saliency.dtype == np.float32
    assert saliency.min() >= 0 and saliency.max() <= 1
    assert saliency[inside].mean() > 0.7 and saliency[~inside].mean() < 0.2
    tall = compute_saliency(np.ascontiguousarray(image.transpose(1, 0, 2)))
    assert tall.shape == (140, 90) and tall[inside.T].mean() > tall[~inside.T].mean() + 0.5


def test_featureless_image_has_no_saliency_and_bad_input_is_refused():
    assert not compute_saliency(np.full((30, 40, 3), 128, np.uint8)).any()
    with pytest.raises(ValueError, match="RGB uint8"):
        compute_saliency(np.zeros((30, 40), np.uint8))


def test_loader_resizes_a_map_of_another_size(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 30).round().astype(np.uint8), (20, 1))  # 20x30, dark left
    write_png(tmp_path / "a1.png", ramp)
    same = read_saliency(tmp_path, "a1")
    assert same.shape == (20, 30) and same.dtype == np.float32
    assert same[0, 0] == 0 and same[0, -1] == 1
    big = read_saliency(tmp_path, "a1", shape=(45, 70))
    assert big.shape == (45, 70) and big.dtype == np.float32
    assert big.min() >= 0 and big.max() <= 1
    assert np.all(np.diff(big[10]) >= 0) and big[:, :5].mean() < 0.1 and big[:, -5:].mean() > 0.9


def test_missing_map_error_names_the_id_and_path(tmp_path, tiny_voc):
    with pytest.raises(DatasetError, match=r"nowhere_007") as err:
        read_saliency(tmp_path, "nowhere_007")
    assert str(tmp_path / "nowhere_007.png") in str(err.value)
    dataset = VOCDataset(tiny_voc, "train")
    maps = tmp_path / "maps"
    maps.mkdir()
    for id_ in dataset.ids[1:]:
        write_png(maps / f"{id_}.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=dataset.ids[0]) as err:
        ensure_saliency(dataset, dataset.ids, tmp_path / "out", source=str(maps))
    assert str(maps / f"{dataset.ids[0]}.png") in str(err.value)
    with pytest.raises(DatasetError, match="saliency folder not found"):
        ensure_saliency(dataset, dataset.ids, tmp_path / "out", source=str(tmp_path / "absent"))


def test_ensure_saliency_writes_every_id_at_image_size_and_resumes(tmp_path, tiny_voc):
    dataset = VOCDataset(tiny_voc, "train")
    out = tmp_path / "saliency"
    out.mkdir()
    kept = out / f"{dataset.ids[1]}.png"
    write_png(kept, np.full((5, 5), 7, np.uint8))  # a file from an earlier, interrupted run
    os.utime(kept, ns=(1_000_000_000, 1_000_000_000))

    ensure_saliency(dataset, dataset.ids, out, workers=1)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.png" for i in dataset.ids)
    assert kept.stat().st_mtime_ns == 1_000_000_000 and (read_mask(kept) == 7).all()
    for id_ in dataset.ids:
        if id_ != dataset.ids[1]:
            saliency = read_saliency(out, id_)
            assert saliency.shape == dataset.image(id_).shape[:2]
            assert saliency.max() > 0.5
            mask = dataset.mask(id_)
            assert saliency[(mask > 0) & (mask < 255)].mean() > saliency[mask == 0].mean()

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    ensure_saliency(dataset, dataset.ids, out, workers=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_precomputed_maps_in_a_process_pool(tmp_path, tiny_voc):
    dataset = VOCDataset(tiny_voc, "train")
    maps = tmp_path / "maps"
    for id_ in dataset.ids:  # DSS-style maps at a fixed size, bright on the right half
        write_png(maps / f"{id_}.png", np.repeat([[0] * 10 + [255] * 10], 12, 0).astype(np.uint8))
    out = tmp_path / "saliency"
    ensure_saliency(dataset, dataset.ids, out, source=str(maps), workers=2)
    for id_ in dataset.ids:
        written = np.asarray(Image.open(out / f"{id_}.png"))
        assert written.dtype == np.uint8 and written.shape == dataset.image(id_).shape[:2]
        assert written[:, :3].max() == 0 and written[:, -3:].min() == 255


@pytest.mark.skipif(not (SHARED_VOC / "ImageSets" / "Segmentation" / "photos.txt").is_file(),
                    reason="real VOC photos not available")
def test_real_photos_objects_are_more_salient_than_background():
    ids = (SHARED_VOC / "ImageSets" / "Segmentation" / "photos.txt").read_text().split()[:4]
    wins = 0
    for id_ in ids:
        image = read_image(SHARED_VOC / "JPEGImages" / f"{id_}.jpg")
        mask = read_mask(SHARED_VOC / "SegmentationClassAug" / f"{id_}.png")
        saliency = compute_saliency(image)
        assert saliency.shape == mask.shape
        wins += saliency[(mask > 0) & (mask < 255)].mean() > saliency[mask == 0].mean()
    assert wins >= 3


def test_the_max_of_the_cues_finds_more_of_an_object_at_the_border():
    """A large object that reaches the top border (by a short neck) and one inside: both combinations
    find the inner one and leave the background; the minimum-barrier cue sees no barrier between the
    border and the first object, so the cues' product loses all of it where their maximum keeps it (the
    robust-background cue finds it: little border for its area)."""
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(128, 10, (120, 160, 3)), 0, 255).astype(np.uint8)
    image[25:85, 20:80] = (200, 40, 40)
    image[0:25, 45:55] = (200, 40, 40)  # its neck, on the top border
    image[60:100, 100:145] = (40, 60, 200)
    found = {}
    for combine in ("product", "max"):
        s = compute_saliency(image, combine)
        assert (s[65:95, 105:140] >= 0.5).mean() > 0.9  # the inner object, either way
        assert (s[0:20, 100:160] >= 0.5).mean() < 0.05  # background stays background
        found[combine] = float((s[25:85, 20:80] >= 0.5).mean())
    assert found["product"] < 0.2 and found["max"] > 0.9, found
    with pytest.raises(ValueError, match="combine"):
        compute_saliency(image, "sum")
