"""Shared fixtures: `tiny_voc` is a dataset in the VOC layout small enough for any test (milliseconds)."""
from __future__ import annotations

import os

# Before torch is imported: OpenMP threads that spin while they wait make every torch op many times
# slower when the cores are shared with other work (a test suite went from 12 s to 111 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from wsss import io  # noqa: E402

TINY_CLASSES = ("background", "disc", "square", "bar")
COLOURS = {1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 70, 230)}


def _draw(mask: np.ndarray, cls: int, cy: int, cx: int, r: int) -> None:
    h, w = mask.shape
    yy, xx = np.mgrid[:h, :w]
    if cls == 1:
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif cls == 2:
        inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    else:
        inside = (abs(yy - cy) <= r // 3) & (abs(xx - cx) <= r * 2)
    mask[inside] = cls


def make_tiny_voc(root, n_train: int = 4, n_val: int = 2, size=(48, 64), seed: int = 0,
                  unlabelled: int = 0) -> Path:
    """Write a tiny VOC-layout dataset to `root` and return it.

    Classes `TINY_CLASSES` (background + disc, square, bar, each one colour). Images are JPEGs of
    `size` (H, W), except the last training image which is smaller (so datasets of mixed sizes are
    exercised); each holds one or two objects, every third one two classes (multi-label). Masks are
    palette PNGs in SegmentationClassAug with a 255 (ignore) outline around discs;
    `cls_labels.npy`, `class_names.txt`, `ImageSets/Segmentation/{train,val}.txt` (no val.txt when
    n_val is 0). The first
    `unlabelled` training images hold no object (label vector of zeros).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "class_names.txt").write_text("\n".join(TINY_CLASSES) + "\n")
    labels, train, val = {}, [], []
    n = n_train + n_val
    for i in range(n):
        id_ = f"tiny_{i:03d}"
        h, w = (size[0] - 8, size[1] - 8) if i == n_train - 1 else size
        mask = np.zeros((h, w), np.uint8)
        if i >= unlabelled or i >= n_train:
            classes = [i % 3 + 1] + ([(i + 1) % 3 + 1] if i % 3 == 2 else [])
            for j, cls in enumerate(classes):
                r = int(rng.integers(6, 10))
                cy = int(rng.integers(r, h - r))
                cx = int(rng.integers(r, w // 2 - r)) if j == 0 else int(rng.integers(w // 2 + r // 2, w - r))
                _draw(mask, cls, cy, cx, r)
        image = np.empty((h, w, 3), np.uint8)
        image[:] = rng.integers(90, 140, size=3, dtype=np.uint8)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        for cls, colour in COLOURS.items():
            image[mask == cls] = colour
        outline = (mask == 1) & ~(np.pad(mask == 1, 1)[2:, 1:-1] & np.pad(mask == 1, 1)[:-2, 1:-1]
                                  & np.pad(mask == 1, 1)[1:-1, 2:] & np.pad(mask == 1, 1)[1:-1, :-2])
        mask[outline] = 255
        Image.fromarray(image).save(root / "JPEGImages" / f"{id_}.jpg", quality=95)
        io.write_mask(root / "SegmentationClassAug" / f"{id_}.png", mask)
        label = np.zeros(len(TINY_CLASSES) - 1, np.float32)
        present = np.unique(mask[(mask > 0) & (mask < 255)])
        label[present - 1] = 1
        labels[id_] = label
        (train if i < n_train else val).append(id_)
    np.save(root / "cls_labels.npy", labels)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(train) + "\n")
    if val:
        (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(val) + "\n")
    return root


@pytest.fixture
def tiny_voc(tmp_path) -> Path:
    """A 6-image VOC-layout dataset (4 train, 2 val, 3 classes + background) under tmp_path/tiny_voc."""
    return make_tiny_voc(tmp_path / "tiny_voc")


@pytest.fixture
def tiny_voc_factory(tmp_path):
    """`make(name, **kwargs)` writes a `make_tiny_voc` dataset to tmp_path/name (sizes, splits, unlabelled)."""
    return lambda name="tiny_voc", **kwargs: make_tiny_voc(tmp_path / name, **kwargs)
