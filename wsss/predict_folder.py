"""Masks for any folder of photos: `python -m wsss.predict --run RUN --images DIR --out OUT`.

No image labels are needed: a PSL net's classification branch gates the class maps (`--gate`),
as at val time. Every photo under DIR (jpg/jpeg/png/webp, nested) is predicted by the run's final
stage-3 net (wsss.predict, steps 1, 2 and 4) and written with its relative path:

    OUT/masks/REL.png       palette PNG at the photo's full size (0 background, 1..C-1 the classes)
    OUT/overlays/REL.png    with --overlay: the photo (at most --max-side) blended with its mask,
                            a legend of the classes found below
    OUT/masks.json          each photo's mask, size, and its classes with their pixel fractions
    OUT/settings.json       the settings the masks were made with

A photo larger than --max-side is predicted at that size (the net was trained near the dataset's
scale, and memory stays bounded); the probabilities of the classes found are then resized
bilinearly to the full size before the argmax (after a CRF, the labels nearest-neighbour).

Resume: rerun with the same settings and the photos already done are kept. OUT is never emptied:
an OUT that is not empty and holds no predictions with these settings is an error, as is an OUT
inside DIR (or DIR inside OUT), so no photo can be overwritten.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from wsss import io
from wsss.data.voc import DatasetError, find_images
from wsss.predict import SETTINGS, TEST_CRF, _crf_job, _present, label_map, predict_probs
from wsss.viz import overlay_with_legend, resize

log = logging.getLogger("wsss")
MASKS, OVERLAYS, INDEX = "masks", "overlays", "masks.json"


def bounded(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image scaled down so that its longer side is at most `max_side` (unchanged if it is)."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    return resize(image, (max(1, round(h * scale)), max(1, round(w * scale))))


def predict_image(model, image: np.ndarray, device, *, scales=(1.0,), flip=False, gate=False,
                  crf_params=None, max_side: int = 1024) -> np.ndarray:
    """uint8 label mask (H, W) of one RGB photo of any size."""
    h, w = image.shape[:2]
    small = bounded(image, max_side)
    probs = predict_probs(model, small, device, scales, flip, gate)
    if crf_params is None and small is image:
        return label_map(probs)
    present = _present(probs)
    sub = probs[torch.as_tensor(present, device=probs.device)]
    if crf_params is not None:
        try:
            mask = _crf_job(crf_params, (None, small, sub.cpu().numpy(), present))
        except Exception as e:  # noqa: BLE001 - a failed CRF keeps the net's argmax, as in predict_split
            log.warning("CRF failed (%s: %s); keeping the net's argmax", type(e).__name__, e)
            mask = present[label_map(sub)]
        return resize(mask, (h, w), nearest=True)
    full = F.interpolate(sub[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return present[label_map(full)].astype(np.uint8)


def mask_name(rel: Path) -> Path:
    return rel.with_suffix(".png")


def plan(images: Path, out: Path) -> list[Path]:
    """The photos' relative paths; errors for a missing folder, overlapping folders, clashing names."""
    if not images.is_dir():
        raise DatasetError(f"{images}: image folder not found")
    a, b = images.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise DatasetError(f"--out {out} and --images {images} overlap; write the masks to a separate folder")
    rels = [p.relative_to(images) for p in find_images(images)]
    if not rels:
        raise DatasetError(f"{images}: no images (.jpg, .jpeg, .png, .webp) found")
    seen = {}
    for rel in rels:
        name = mask_name(rel)
        if name in seen:
            raise DatasetError(f"{images / seen[name]} and {images / rel}: both would write "
                               f"{out / MASKS / name}; rename one of them")
        seen[name] = rel
    for rel in rels:  # header only: a file that is not an image is reported before any work starts
        try:
            with Image.open(images / rel) as img:
                img.size  # noqa: B018
        except (OSError, ValueError) as e:
            raise DatasetError(f"{images / rel}: cannot read image ({e})") from e
    return rels


def _prepare_out(out: Path, settings: dict) -> None:
    path = out / SETTINGS
    if out.is_dir() and any(out.iterdir()):
        try:
            same = io.read_json(path) == settings
        except (OSError, ValueError):
            same = False
        if not same:
            raise DatasetError(f"{out}: not empty and holds no predictions with these settings; choose another "
                               f"--out (nothing in it is deleted)")
        return
    io.write_json(path, settings)


def mask_summary(mask: np.ndarray, names) -> dict:
    ids, counts = np.unique(mask, return_counts=True)
    return {(names[c] if c < len(names) else "ignore" if c == 255 else str(c)): round(n / mask.size, 4)
            for c, n in zip(ids.tolist(), counts.tolist(), strict=True)}


def predict_folder(model, images, out, names, *, device, scales=(1.0,), flip=False, gate=False, crf=False,
                   max_side: int = 1024, overlay=False, checkpoint=None) -> dict:
    """Write masks (and overlays) of every photo under `images` to `out` (see the docstring); returns
    the masks.json index."""
    images, out = Path(images), Path(out)
    rels = plan(images, out)
    crf_params = dict(TEST_CRF) if crf else None
    settings = {"scales": [float(s) for s in scales], "flip": bool(flip), "gate": bool(gate), "crf": crf_params,
                "max_side": int(max_side), "checkpoint": io.fingerprint(checkpoint) if checkpoint else None}
    _prepare_out(out, settings)
    index = {}
    for rel in tqdm(rels, desc="predict", leave=False):
        mask_path = out / MASKS / mask_name(rel)
        overlay_path = out / OVERLAYS / mask_name(rel)
        image = None
        if mask_path.is_file():
            mask = io.read_mask(mask_path)
        else:
            try:
                image = io.read_image(images / rel)
            except (OSError, ValueError) as e:
                raise DatasetError(str(e)) from e
            mask = predict_image(model, image, device, scales=scales, flip=flip, gate=gate,
                                 crf_params=crf_params, max_side=max_side)
            io.write_mask(mask_path, mask)
        if overlay and not overlay_path.is_file():
            image = io.read_image(images / rel) if image is None else image
            small = bounded(image, max_side)
            io.write_png(overlay_path, overlay_with_legend(small, resize(mask, small.shape[:2], nearest=True), names))
        index[rel.as_posix()] = {"mask": f"{MASKS}/{mask_name(rel).as_posix()}",
                                 "overlay": f"{OVERLAYS}/{mask_name(rel).as_posix()}" if overlay else None,
                                 "size": [int(mask.shape[1]), int(mask.shape[0])],
                                 "classes": mask_summary(mask, names)}
    result = {"classes": list(names), "images": index}
    io.write_json(out / INDEX, result)
    return result
