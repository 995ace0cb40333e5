"""A VOC-like dataset: the real PASCAL VOC object layouts, painted.

    python -m wsss.data.voclike --layouts data/VOCdevkit/VOC2012 --out data/voclike [--train 1464] [--val 1449]

Why it exists: defaults chosen on the embedded dataset (6 classes of cartoon things, one to three
objects of 4-50 % of the image) must also hold on VOC, where 20 classes share the images, most
objects are small, and a class appears in a few percent of the images. Real VOC photos cannot be
had here, but their ground-truth masks can (`SegmentationClassAug` of a VOC + SBD folder): this dataset
keeps the real layouts (every object's shape, size and position, the classes that occur together,
the 255 borders) and paints each class with its own look, so it is exactly as hard as VOC in
everything that depends on layout, and easier than VOC in appearance.

Painting reuses the embedded generator's pieces (`wsss.data.synthetic`): backgrounds are its clean
or cluttered scenes; each class has a hue (the 20 spread round the colour wheel, 0.05 apart, drawn
with a spread of 0.012 and a saturation above the clutter's) and a favourite texture it wears 80 % of
the time (5 % of objects take a random hue); the top fifth of every object (by its vertical extent)
is a discriminative part with a two-colour stripe pattern of its class (its own colours, direction
and period), the analogue of a face, so that CAMs find the part first and adversarial erasing has a
body left to find. Version 1 drew hues with a spread that made neighbouring classes overlap, 20 % of
objects at a random hue and a favourite texture 60 % of the time: its 20 classes looked too alike
for a classifier to tell apart (docs/results.md), and each class must be learnable for the figures
on this data to say anything. Pixels under VOC's 255 borders are painted as the nearest object or
background, and stay 255 in the mask.

Images are the VOC masks scaled by `--scale` (0.5: about 250 x 190 px, the size the project's
VOC-like measurements use), ids are the VOC ids, splits follow VOC's `train` and `val` lists. Output is the
VOC layout of `wsss/data/voc.py` with `class_names.txt` and `cls_labels.npy` from the masks, and a
`dataset.json` written last; each image is drawn from a generator seeded by (seed, id), so the
files do not depend on the worker count.
"""
from __future__ import annotations

import argparse
import io as _io
import os
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt
from scipy.ndimage import label as connected
from tqdm import tqdm

from wsss.data import synthetic
from wsss.data.voc import IGNORE, VOC_CLASSES, labels_from_mask, read_ids
from wsss.io import read_json, read_mask, write_bytes, write_json, write_mask, write_npy
from wsss.run import process_pool

VERSION = 2
PART_FRACTION = 0.2  # of an object's height: its discriminative part
SCENES = tuple(synthetic.SCENES)


def class_look(cls: int) -> tuple[float, str, tuple[np.ndarray, np.ndarray], tuple[float, float]]:
    """(hue, favourite texture, part colours, part stripe (direction, period in px at 500 px)) of
    class `cls`: fixed for the dataset."""
    n = len(VOC_CLASSES) - 1
    hue = ((cls - 1) * 7 % n) / n  # neighbouring ids get distant hues
    texture = synthetic.TEXTURES[cls % len(synthetic.TEXTURES)]
    part = (synthetic.hsv(hue + 0.5, 0.9, 0.95), synthetic.hsv(hue + 0.25, 0.8, 0.3))
    stripe = ((cls % 4) * np.pi / 4, 8.0 + 4.0 * (cls % 5))
    return hue, texture, part, stripe


def object_paint(rng: np.random.Generator, cls: int):
    """Body paint of one object of class `cls` (see the module docstring)."""
    hue, favourite, _, _ = class_look(cls)
    hue = rng.random() if rng.random() < 0.05 else hue + rng.normal(0, 0.012)
    base = synthetic.hsv(hue, rng.uniform(0.55, 0.95), rng.uniform(0.45, 0.95))  # clutter stays below 0.55
    second = base * rng.uniform(0.45, 0.7)
    kind = favourite if rng.random() < 0.8 else synthetic.TEXTURES[int(rng.integers(len(synthetic.TEXTURES)))]
    texture, mottle = synthetic.make_texture(rng, kind), synthetic.make_texture(rng, "mottled")

    def paint(u, v):
        t = texture(u, v)[..., None]
        return (base * (1 - t) + second * t) * (0.85 + 0.3 * mottle(u, v))[..., None]
    return paint


def draw_image(layout: np.ndarray, seed: int, id_: str) -> np.ndarray:
    """RGB uint8 image for a VOC mask (values 0..20, 255)."""
    rng = np.random.default_rng([seed, zlib.crc32(id_.encode())])
    h, w = layout.shape
    scene = SCENES[int(rng.integers(len(SCENES)))]
    image = synthetic.clean_background(rng, (h, w), scene)
    if rng.random() < 0.5:
        synthetic.clutter(rng, image, scene)
    # paint 255 borders as their nearest labelled pixel
    unknown = layout == IGNORE
    filled = layout
    if unknown.any() and not unknown.all():
        _, (iy, ix) = distance_transform_edt(unknown, return_indices=True)
        filled = layout[iy, ix]
    side = float(max(h, w))
    for cls in np.unique(filled):
        if cls == 0 or cls == IGNORE:
            continue
        components, n = connected(filled == cls)
        _, _, part_colours, (direction, period) = class_look(int(cls))
        for k in range(1, n + 1):
            ys, xs = np.nonzero(components == k)
            # object-local coordinates, about -1..1 across the object, for the textures
            cy, cx = ys.mean(), xs.mean()
            scale = max(np.ptp(ys), np.ptp(xs), 4) / 2
            u, v = (xs - cx) / scale, (ys - cy) / scale
            rgb = object_paint(rng, int(cls))(u.astype(np.float32), v.astype(np.float32))
            part = ys <= ys.min() + PART_FRACTION * max(np.ptp(ys), 1)
            if part.any():
                along = xs[part] * np.cos(direction) + ys[part] * np.sin(direction)
                stripes = (np.sin(along * 2 * np.pi / (period * side / 500)) > 0)[:, None]
                rgb[part] = np.where(stripes, part_colours[0], part_colours[1])
            image[ys, xs] = rgb
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 0.8))
    image = image * 255 + rng.normal(0, rng.uniform(2, 5), image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _write_one(task) -> None:
    layouts, root, seed, scale, id_ = task
    cv2.setNumThreads(1)
    mask = read_mask(Path(layouts) / "SegmentationClassAug" / f"{id_}.png")
    if scale != 1.0:
        h, w = mask.shape
        mask = cv2.resize(mask, (max(1, round(w * scale)), max(1, round(h * scale))),
                          interpolation=cv2.INTER_NEAREST)
    image = draw_image(mask, seed, id_)
    buf = _io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    write_bytes(root / "JPEGImages" / f"{id_}.jpg", buf.getvalue())
    write_mask(root / "SegmentationClassAug" / f"{id_}.png", mask)


def generate(layouts, out, n_train: int = 1464, n_val: int = 1449, scale: float = 0.5, seed: int = 0,
             workers: int | None = None) -> dict:
    """Write the dataset (the first n_train ids of VOC `train`, n_val of `val`); skipped when
    `out/dataset.json` holds the same arguments."""
    root, layouts = Path(out), Path(layouts)
    config = {"layouts": str(layouts.resolve()), "n_train": n_train, "n_val": n_val, "scale": scale,
              "seed": seed, "version": VERSION}
    summary_path = root / "dataset.json"
    if summary_path.is_file() and read_json(summary_path).get("config") == config:
        print(f"{root}: VOC-like dataset already generated with {config}; skipping")
        return read_json(summary_path)
    if summary_path.exists():
        summary_path.unlink()
    splits = {"train": read_ids(layouts, "train")[:n_train], "val": read_ids(layouts, "val")[:n_val]}
    tasks = [(str(layouts), root, seed, scale, i) for ids in splits.values() for i in ids]
    workers = min(os.cpu_count() or 1, 8) if workers is None else max(1, workers)
    t0 = time.time()
    if workers == 1:
        for t in tqdm(tasks, desc="voclike", unit="img"):
            _write_one(t)
    else:
        with process_pool(workers) as pool:  # spawned, one thread each, dying with this process
            list(tqdm(pool.map(_write_one, tasks, chunksize=8), total=len(tasks), desc="voclike", unit="img"))
    lists = root / "ImageSets" / "Segmentation"
    for name, ids in (("train", splits["train"]), ("train_aug", splits["train"]), ("val", splits["val"])):
        write_bytes(lists / f"{name}.txt", "".join(f"{i}\n" for i in ids).encode())
    write_bytes(root / "class_names.txt", "".join(f"{n}\n" for n in VOC_CLASSES).encode())
    labels = {i: labels_from_mask(read_mask(root / "SegmentationClassAug" / f"{i}.png"), len(VOC_CLASSES))
              for ids in splits.values() for i in ids}
    write_npy(root / "cls_labels.npy", labels)
    summary = {"config": config, "classes": list(VOC_CLASSES),
               "splits": {s: {"images": len(ids)} for s, ids in splits.items()}}
    write_json(summary_path, summary)
    print(f"{root}: {len(tasks)} images in {time.time() - t0:.1f}s with {workers} worker(s)")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.data.voclike", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", type=Path, required=True,
                        help="VOC folder with SegmentationClassAug/ and ImageSets/Segmentation/{train,val}.txt")
    parser.add_argument("--out", type=Path, default=Path("data/voclike"))
    parser.add_argument("--train", type=int, default=1464, help="first N ids of VOC train")
    parser.add_argument("--val", type=int, default=1449, help="first N ids of VOC val")
    parser.add_argument("--scale", type=float, default=0.5, help="image size relative to VOC's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if args.train < 1 or args.val < 0 or not 0 < args.scale <= 1:
        parser.error("need --train >= 1, --val >= 0 and 0 < --scale <= 1")
    generate(args.layouts, args.out, args.train, args.val, args.scale, args.seed, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
