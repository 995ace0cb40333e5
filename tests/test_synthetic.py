"""The embedded dataset: deterministic, in the VOC layout, and with the properties the stages rely on."""
from pathlib import Path

import numpy as np
import pytest

from wsss.data.synthetic import CLASS_NAMES, generate, main
from wsss.data.voc import IGNORE, VOCDataset, read_ids
from wsss.io import read_json, read_mask

TINY = {"n_train": 10, "n_val": 2, "size": 96}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0, workers=1, **TINY)
    return root


def test_same_seed_same_bytes_whatever_the_workers(tiny, tmp_path):
    generate(tmp_path / "again", seed=0, workers=2, **TINY)
    assert files(tiny) == files(tmp_path / "again")


def test_other_seed_other_images(tiny, tmp_path):
    generate(tmp_path / "other", seed=1, workers=1, **TINY)
    ours, theirs = files(tiny), files(tmp_path / "other")
    jpgs = [name for name in ours if name.endswith(".jpg")]
    assert sum(ours[n] != theirs[n] for n in jpgs) == len(jpgs)


def test_voc_layout_loads_and_checks(tiny):
    ds = VOCDataset(tiny, "train")
    ds.check(need_mask=True)
    VOCDataset(tiny, "val").check(need_mask=True)
    assert ds.class_names == CLASS_NAMES and ds.num_classes == len(CLASS_NAMES)
    assert len(ds) == TINY["n_train"] and len(read_ids(tiny, "val")) == TINY["n_val"]
    assert read_ids(tiny, "train_aug") == ds.ids
    for sub in ("JPEGImages", "SegmentationClassAug", "SegmentationPart"):
        assert not list((tiny / sub).glob(".*.tmp")), "a temporary file was left behind"


def test_labels_are_the_classes_in_the_masks(tiny):
    for split in ("train", "val"):
        ds = VOCDataset(tiny, split)
        for id_ in ds.ids:
            mask = ds.mask(id_)
            present = np.unique(mask[(mask > 0) & (mask != IGNORE)])
            assert ds.label_ids(id_).tolist() == present.tolist(), id_
            assert ds.labels(id_).dtype == np.float32


def test_simple_and_multi_label_images_and_varied_sizes(tiny):
    ds = VOCDataset(tiny, "train")
    n_classes = [len(ds.label_ids(i)) for i in ds.ids]
    assert 1 in n_classes and max(n_classes) >= 2
    summary = read_json(tiny / "dataset.json")
    train = summary["splits"]["train"]
    assert train["simple"] >= 1 and train["complex"] >= 1 and train["multi_label"] >= 1
    assert train["simple"] + train["complex"] == TINY["n_train"]
    for id_ in train["simple_ids"]:
        assert len(ds.label_ids(id_)) == 1
    assert sum(train["images_per_class"].values()) == sum(n_classes)
    shapes = {ds.image(i).shape[:2] for i in ds.ids}
    assert len(shapes) > 1 and any(h != w for h, w in shapes)
    assert all(0.75 * 96 - 1 <= s <= 1.125 * 96 + 1 for shape in shapes for s in shape)


def test_ignore_band_separates_every_pair_of_labels(tiny):
    ds = VOCDataset(tiny, "train")
    for id_ in ds.ids:
        mask = ds.mask(id_)
        assert (mask == IGNORE).any(), id_
        # no two different labels touch: every border runs through the ignore band
        for a, b in ((mask[:, 1:], mask[:, :-1]), (mask[1:], mask[:-1])):
            touching = (a != b) & (a != IGNORE) & (b != IGNORE)
            assert not touching.any(), id_
        # the band is narrow: it covers far less than the objects
        assert (mask == IGNORE).sum() < (mask > 0).sum(), id_


def test_parts_lie_inside_their_objects(tiny):
    ds = VOCDataset(tiny, "train")
    for id_ in ds.ids:
        mask, part = ds.mask(id_), read_mask(tiny / "SegmentationPart" / f"{id_}.png")
        inside = (part > 0) & (part != IGNORE)
        assert inside.any(), id_
        assert (part[inside] == mask[inside]).all(), id_
        for cls in np.unique(mask[(mask > 0) & (mask != IGNORE)]):
            assert 0 < (part == cls).sum() < 0.5 * (mask == cls).sum(), (id_, cls)


def test_skip_when_done_and_regenerate_when_arguments_change(tmp_path):
    root = tmp_path / "data"
    generate(root, seed=3, workers=1, **TINY)
    image = root / "JPEGImages" / "train_00000.jpg"
    stamp = image.stat().st_mtime_ns
    generate(root, seed=3, workers=1, **TINY)
    assert image.stat().st_mtime_ns == stamp  # skipped
    generate(root, seed=3, workers=1, force=True, **TINY)
    assert image.stat().st_mtime_ns != stamp  # --force redoes it

    smaller = dict(TINY, n_train=4)
    generate(root, seed=3, workers=1, **smaller)
    assert read_json(root / "dataset.json")["config"]["n_train"] == 4
    assert read_ids(root, "train") == [f"train_{i:05d}" for i in range(4)]
    assert not (root / "JPEGImages" / "train_00009.jpg").exists()  # leftovers of the larger set removed
    VOCDataset(root, "train").check(need_mask=True)


def test_command_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "cli"), "--train", "3", "--val", "1", "--size", "64", "--workers", "1"]) == 0
    assert (tmp_path / "cli" / "dataset.json").is_file()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--train", "0"])
