"""Score maps on disk: CAMs (stage 1's step{k}/cam) and seed scores (regions/ID.npz "score").

A map of floats in [0, 1] per class is stored as uint8 steps of 1/255 at a quarter of the image's
size (area-averaged), in a compressed .npz, and read back at the image's size (bilinear): 3.5 KB
where float16 at full size took 190 KB. The maps come from features at output stride 16 (about 11
at CAM scale 1.5), so a quarter of the image's size holds all they say, and 1/255 is far finer than
any threshold anyone sweeps; docs/results.md has what it changes in the seeds. Readers always get
the map as stored, so whatever is mined or scored from a file is reproducible from it.

Float maps at the image's size (the first format, another CAM method's, hand-made seeds) are read
as they are. Torch-free, so that `wsss.eval` stays light to import.
"""
from __future__ import annotations

import cv2
import numpy as np

from wsss.errors import WsssError

STORE_STRIDE = 4


class CAMFileError(WsssError, ValueError):
    """A CAM or seeds file that is missing, unreadable or does not fit its image; the message names it."""


def stored_size(shape) -> tuple[int, int]:
    """(h, w) a map of an image of size `shape` (H, W) is stored at."""
    return -(-int(shape[0]) // STORE_STRIDE), -(-int(shape[1]) // STORE_STRIDE)


def _resize(maps: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    out = np.empty((maps.shape[0], *size), np.float32)
    for i, m in enumerate(maps):
        out[i] = cv2.resize(m, (size[1], size[0]), interpolation=interpolation)
    return out


def store_scores(scores: np.ndarray) -> np.ndarray:
    """Float maps (n, H, W) in [0, 1] -> what is written: uint8 (n, *stored_size)."""
    scores = np.asarray(scores, np.float32)
    small = _resize(scores, stored_size(scores.shape[1:]), cv2.INTER_AREA)
    return np.rint(np.clip(small, 0, 1) * 255).astype(np.uint8)


def restore_scores(stored: np.ndarray, shape, path) -> np.ndarray:
    """Stored maps -> float32 (n, H, W) at the image size `shape`. A map of any size other than the
    image's or its stored size is an error naming `path` (a stale or foreign file), never resized."""
    shape = (int(shape[0]), int(shape[1]))
    scores = stored.astype(np.float32) / 255 if stored.dtype == np.uint8 else stored.astype(np.float32)
    if scores.shape[1:] == shape:
        return scores
    if stored.dtype != np.uint8 or scores.shape[1:] != stored_size(shape):
        raise CAMFileError(f"{path}: map size {scores.shape[2]}x{scores.shape[1]} differs from the image size "
                           f"{shape[1]}x{shape[0]} (stale or foreign file?)")
    return _resize(scores, shape, cv2.INTER_LINEAR)
