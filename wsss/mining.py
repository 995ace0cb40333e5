"""The adversarial-erasing rule (Wei et al. CVPR 2017) on arrays: mine a step's object regions from
its CAMs, and erase what earlier steps mined so that the next classifier must find other evidence.

Stage 1 (wsss.erasing) applies it to a run's images, the report draws with it what each step saw."""
from __future__ import annotations

import numpy as np

from wsss.data.transforms import MEAN
from wsss.fusion import regions_label_map

MEAN_PIXEL = np.round(MEAN * 255).astype(np.uint8)  # what an erased pixel is painted with (zero once normalised)


def erase(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of `image` with the pixels of `mask` set to the mean pixel (zero after normalisation)."""
    if mask.shape != image.shape[:2]:
        raise ValueError(f"erase mask {mask.shape} does not fit image {image.shape[:2]}")
    out = image.copy()
    out[mask] = MEAN_PIXEL
    return out


def mine(cam: np.ndarray, keys: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-class regions (cam > threshold) and their label map (overlaps -> the higher CAM)."""
    masks = cam > threshold
    return masks, regions_label_map(masks, keys, cam)
