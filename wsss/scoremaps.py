"""Score maps on disk: CAMs (stage 1's step{k}/cam) and seeds (regions/ID.npz); the one reader and
the one writer of each file.

    CAM file   ID.npz {"cam": the maps (n, H, W) as stored, "keys": int64 (n,) mask ids}
    seeds file ID.npz {"keys": int (n,), "masks": bool (n, H, W) at the image's size,
                       "score": the maps (n, H, W) as stored, or float in [0, 1] at the image's size}

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

import zipfile
from pathlib import Path

import cv2
import numpy as np

from wsss import io
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


def _arrays(path, names: tuple[str, ...], what: str) -> list[np.ndarray]:
    try:
        with np.load(path) as f:
            return [f[name] for name in names]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise CAMFileError(f"{path}: cannot read {what} ({e})") from e


def write_cams(path, cam: np.ndarray, keys) -> np.ndarray:
    """Write a CAM file atomically; returns the maps as stored, float32 (n, H, W), which is what
    callers must mine (so that a resumed run mines the same)."""
    cam = np.asarray(cam)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if cam.ndim != 3 or cam.shape[0] != keys.size:
        raise ValueError(f"{path}: CAM shape {cam.shape} does not fit {keys.size} class ids")
    stored = store_scores(cam)
    io.write_npz(path, cam=stored, keys=keys)
    return restore_scores(stored, cam.shape[1:], path)


def read_cams(path, shape=None, array: str = "cam") -> tuple[np.ndarray, np.ndarray]:
    """(maps float32 (n, H, W) at the image size `shape` (None: as stored), keys int64 (n,)) of a CAM
    file, checked: a map stored for another size is an error, never used. `array`: the entry that
    holds the maps ("score" reads a seeds file's maps the same way)."""
    if not Path(path).is_file():
        raise CAMFileError(f"{path}: CAM file not found")
    cam, keys = _arrays(path, (array, "keys"), "CAM file")
    if keys.ndim != 1 or cam.ndim != 3 or cam.shape[0] != keys.shape[0]:
        raise CAMFileError(f"{path}: CAM of shape {cam.shape} does not fit class ids of shape {keys.shape}")
    return restore_scores(cam, cam.shape[1:] if shape is None else shape, path), keys.astype(np.int64)


def write_seeds(path, keys, masks: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Write a seeds file (stage 1's union) atomically; returns its score as read back, float32 (n, H, W)."""
    stored = store_scores(score)
    io.write_npz(path, keys=keys, masks=masks, score=stored)
    return restore_scores(stored, masks.shape[1:], path)


def read_seeds(path, label_ids, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys int64, masks bool, score float32) of a seeds file, checked against the image's labels and size."""
    keys, masks, score = _arrays(path, ("keys", "masks", "score"), "seeds (an .npz with keys, masks, score)")
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if masks.shape != (len(keys),) + tuple(shape) or score.ndim != 3 or score.shape[0] != len(keys):
        raise CAMFileError(f"{path}: masks {masks.shape} / score {score.shape} do not fit {len(keys)} keys "
                           f"at image size {tuple(shape)}")
    stray = sorted(set(keys.tolist()) - set(label_ids))
    if stray:
        raise CAMFileError(f"{path}: classes {stray} are not among the image's labels {list(label_ids)}")
    if keys.size and score.dtype != np.uint8 and (
            not np.issubdtype(score.dtype, np.floating) or score.min() < 0 or score.max() > 1):
        raise CAMFileError(f"{path}: score must be float in [0, 1] (or uint8 steps of 1/255), got {score.dtype} "
                           f"in [{score.min()}, {score.max()}]")
    return keys, masks.astype(bool), restore_scores(score, shape, path)
