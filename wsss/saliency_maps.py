"""Saliency maps on disk for stage 2: grey PNGs `ID.png`, 0..255, at the image's size, computed with
the built-in method (wsss.saliency) or taken from a folder of precomputed maps, in a process pool."""
from __future__ import annotations

from concurrent.futures import as_completed
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from wsss.errors import DatasetError
from wsss.io import write_png
from wsss.layout import item
from wsss.run import count_images, process_pool
from wsss.saliency import BUILTIN, BUILTINS, compute_saliency
from wsss.shapes import MAX_SIDE, fitted_size
from wsss.viz import resize


def saliency_path(folder, id_: str) -> Path:
    return item(folder, id_)


def read_saliency(folder, id_: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The grey map `folder/ID.png` as float32 in [0, 1], resized (bilinear) to `shape` (H, W) if given."""
    path = saliency_path(folder, id_)
    if not path.is_file():
        raise DatasetError(f"{path}: no saliency map for image '{id_}'")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read saliency map ({e})") from e
    if img.mode not in ("L", "P", "RGB", "RGBA", "LA", "1"):
        raise DatasetError(f"{path}: a saliency map must be an 8-bit grey PNG, got mode {img.mode}")
    saliency = np.asarray(img.convert("L"), dtype=np.float32) / 255
    if shape is not None and saliency.shape != tuple(shape):
        saliency = np.clip(cv2.resize(saliency, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR), 0, 1)
    return saliency


def to_uint8(saliency: np.ndarray) -> np.ndarray:
    return np.round(np.clip(saliency, 0, 1) * 255).astype(np.uint8)


_worker_dataset = None  # in each pool worker: the dataset, sent once rather than with every task


def _init_worker(dataset) -> None:
    global _worker_dataset
    _worker_dataset = dataset
    cv2.setNumThreads(1)


def _write_one(id_: str, out_dir: str, source: str, dataset=None) -> None:
    dataset = dataset if dataset is not None else _worker_dataset
    image = dataset.image(id_)
    if source in BUILTINS:
        size = fitted_size(image.shape[:2], MAX_SIDE)
        if size == image.shape[:2]:
            saliency = compute_saliency(image, BUILTINS[source])
        else:  # a huge photo: computed at MAX_SIDE (memory stays bounded), written at its own size
            saliency = resize(compute_saliency(resize(image, size), BUILTINS[source]), image.shape[:2])
    else:
        saliency = read_saliency(source, id_, image.shape[:2])
    write_png(saliency_path(out_dir, id_), to_uint8(saliency))


def ensure_saliency(dataset, ids, out_dir, source: str = BUILTIN, workers: int = 1) -> None:
    """Write `out_dir/ID.png` (grey 0..255 at image size) for every id that has none yet.

    `source` is "builtin" or "builtin-max" (compute_saliency, its cues multiplied or their maximum:
    `BUILTINS`) or a folder of precomputed grey PNGs `ID.png` of any
    size (DSS / PoolNet / DRFI maps as WSSS papers distribute them), resized to the image. Existing
    files are kept, so an interrupted run resumes; each file is written atomically.
    """
    out_dir = Path(out_dir)
    todo = [id_ for id_ in ids if not saliency_path(out_dir, id_).is_file()]
    if source not in BUILTINS:
        folder = Path(source)
        if not folder.is_dir():
            raise DatasetError(f"{folder}: saliency folder not found (give a folder of ID.png maps or 'builtin')")
        missing = [id_ for id_ in todo if not saliency_path(folder, id_).is_file()]
        if missing:
            raise DatasetError(f"{saliency_path(folder, missing[0])}: no saliency map for image '{missing[0]}' "
                               f"({len(missing)} of {len(todo)} maps missing)")
        source = str(folder)
    count_images(len(todo))
    if not todo:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    desc = "saliency" if source in BUILTINS else "saliency maps"
    if workers <= 1:
        for id_ in tqdm(todo, desc=desc):
            _write_one(id_, str(out_dir), source, dataset)
        return
    pool = process_pool(min(workers, len(todo)), initializer=_init_worker, initargs=(dataset,))
    try:
        futures = [pool.submit(_write_one, id_, str(out_dir), source) for id_ in todo]
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc):
            future.result()
    finally:
        pool.shutdown(cancel_futures=True)
