"""Joint image/mask augmentation for training, in numpy; networks see ImageNet-normalised NCHW tensors.

Masks are resized with nearest neighbour and padded with 255 (ignore), images padded with the
mean pixel (zero after normalisation) so padding never looks like an object or like background.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from wsss.labels import IGNORE

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 3xHxW, ImageNet-normalised."""
    return ((image.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def denormalize(tensor: np.ndarray) -> np.ndarray:
    """float 3xHxW -> RGB uint8 HxWx3 (for pictures)."""
    image = (np.asarray(tensor).transpose(1, 2, 0) * STD + MEAN) * 255.0
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def resize(array: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an HxW[xC] uint8 array to (h, w)."""
    h, w = size
    if array.shape[:2] == (h, w):
        return array
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((w, h), resample))


def random_scale(image, mask, rng: np.random.Generator, scale_range=(0.7, 1.3)):
    s = rng.uniform(*scale_range)
    h, w = image.shape[:2]
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return resize(image, size), None if mask is None else resize(mask, size, nearest=True)


def random_flip(image, mask, rng: np.random.Generator):
    if rng.random() < 0.5:
        image = image[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    return image, mask


def random_crop(image, mask, crop: int, rng: np.random.Generator):
    """Pad (image with the mean, mask with 255) to at least crop x crop, then crop at random."""
    h, w = image.shape[:2]
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        mean_pixel = np.round(MEAN * 255).astype(np.uint8)
        padded = np.empty((h + ph, w + pw, 3), dtype=np.uint8)
        padded[:] = mean_pixel
        padded[:h, :w] = image
        image = padded
        if mask is not None:
            mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE)
    h, w = image.shape[:2]
    y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    image = image[y:y + crop, x:x + crop]
    mask = None if mask is None else mask[y:y + crop, x:x + crop]
    return image, mask


def train_augment(image, mask, crop: int, rng: np.random.Generator, scale_range=(0.7, 1.3)):
    """Random scale, flip and crop applied jointly; mask may be None (classification)."""
    image, mask = random_scale(image, mask, rng, scale_range)
    image, mask = random_flip(image, mask, rng)
    image, mask = random_crop(image, mask, crop, rng)
    return np.ascontiguousarray(image), None if mask is None else np.ascontiguousarray(mask)
