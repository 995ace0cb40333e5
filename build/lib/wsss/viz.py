"""Pictures for people: coloured masks, CAM heatmaps, panels side by side, contact sheets.

Everything takes and returns uint8 RGB arrays (HxWx3), so a result goes straight to
`wsss.io.write_png`. PIL only; no matplotlib (importing it costs seconds).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsss.io import IGNORE, PALETTE, read_image

WHITE = (255, 255, 255)


def to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 from an RGB image, a uint8 grey image, or a float map in [0, 1]."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxW or HxWx3 picture, got shape {array.shape}")
    return array


def colorize(mask: np.ndarray) -> np.ndarray:
    """A label mask in the VOC palette, ignore (255) in white."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"colorize: a mask must be 2-D, got shape {mask.shape}")
    rgb = PALETTE[mask.astype(np.uint8)]
    rgb[mask == IGNORE] = WHITE
    return rgb


def jet(x: np.ndarray) -> np.ndarray:
    """The jet colour map (blue -> red) of values in [0, 1], uint8 HxWx3."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * x - np.array([3.0, 2.0, 1.0], dtype=np.float32)), 0, 1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def resize(array: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an image or map to (height, width); `nearest` for label masks."""
    h, w = size
    if array.shape[:2] == (h, w):
        return array
    if array.dtype == np.uint8:
        img = Image.fromarray(array)
        return np.asarray(img.resize((w, h), Image.NEAREST if nearest else Image.BILINEAR))
    img = Image.fromarray(np.asarray(array, dtype=np.float32), mode="F")
    return np.asarray(img.resize((w, h), Image.NEAREST if nearest else Image.BILINEAR))


def heatmap(cam: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """A map in [0, 1] (a CAM, a saliency map) in jet colours, blended over `image` if given."""
    cam = np.asarray(cam, dtype=np.float32)
    if image is None:
        return jet(cam)
    image = to_rgb(image)
    colours = jet(resize(cam, image.shape[:2])).astype(np.float32)
    return (alpha * colours + (1 - alpha) * image + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A label mask blended over an image; background (0) left as the image."""
    image = to_rgb(image)
    mask = resize(np.asarray(mask, dtype=np.uint8), image.shape[:2], nearest=True)
    colours = colorize(mask)
    out = image.astype(np.float32)
    fg = mask != 0
    out[fg] = alpha * colours[fg] + (1 - alpha) * out[fg]
    return (out + 0.5).astype(np.uint8)


def _font():
    return ImageFont.load_default()


def _with_title(panel: np.ndarray, title: str | None, title_height: int) -> np.ndarray:
    if not title_height:
        return panel
    strip = Image.new("RGB", (panel.shape[1], title_height), WHITE)
    if title:
        ImageDraw.Draw(strip).text((3, 1), str(title), fill=(0, 0, 0), font=_font())
    return np.concatenate([np.asarray(strip), panel], axis=0)


def side_by_side(panels, titles=None, height: int | None = None, pad: int = 4) -> np.ndarray:
    """Panels (images, grey maps, floats in [0, 1]) in one row at a common height, titled above."""
    panels = [to_rgb(p) for p in panels]
    if not panels:
        raise ValueError("side_by_side: no panels")
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"side_by_side: {len(panels)} panels but {len(titles)} titles")
    height = height or max(p.shape[0] for p in panels)
    scaled = [resize(p, (height, max(1, round(p.shape[1] * height / p.shape[0])))) for p in panels]
    title_height = 14 if titles is not None else 0
    row = []
    for i, p in enumerate(scaled):
        if i:
            row.append(np.full((height + title_height, pad, 3), 255, np.uint8))
        row.append(_with_title(p, titles[i] if titles is not None else None, title_height))
    return np.concatenate(row, axis=1)


def contact_sheet(items, cols: int = 4, cell_width: int | None = None, titles=None, pad: int = 4) -> np.ndarray:
    """A grid of pictures (arrays or image paths), each scaled to `cell_width` (default: the widest)."""
    pictures = [read_image(x) if isinstance(x, (str, Path)) else to_rgb(x) for x in items]
    if not pictures:
        raise ValueError("contact_sheet: nothing to show")
    if titles is not None and len(titles) != len(pictures):
        raise ValueError(f"contact_sheet: {len(pictures)} pictures but {len(titles)} titles")
    cell_width = cell_width or max(p.shape[1] for p in pictures)
    title_height = 14 if titles is not None else 0
    cells = []
    for i, p in enumerate(pictures):
        p = resize(p, (max(1, round(p.shape[0] * cell_width / p.shape[1])), cell_width))
        cells.append(_with_title(p, titles[i] if titles is not None else None, title_height))
    cols = max(1, min(cols, len(cells)))
    rows = [cells[i:i + cols] for i in range(0, len(cells), cols)]
    row_heights = [max(c.shape[0] for c in row) for row in rows]
    sheet = np.full((sum(row_heights) + pad * (len(rows) + 1), cols * cell_width + pad * (cols + 1), 3),
                    255, np.uint8)
    y = pad
    for row, rh in zip(rows, row_heights, strict=True):
        x = pad
        for c in row:
            sheet[y:y + c.shape[0], x:x + c.shape[1]] = c
            x += cell_width + pad
        y += rh + pad
    return sheet


def legend(entries, width: int, row_height: int = 16) -> np.ndarray:
    """A white strip of (class id, text) entries, each a palette-coloured swatch and its text,
    wrapped into rows `width` px wide: the key to an overlay's colours."""
    font = _font()
    placed, x, y = [], 4, 0
    for cls, text in entries:
        text_width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(str(text), font=font))
        item = 12 + 4 + text_width + 12
        if x > 4 and x + item > width:
            x, y = 4, y + row_height
        placed.append((x, y, cls, str(text)))
        x += item
    strip = Image.new("RGB", (width, y + row_height), WHITE)
    draw = ImageDraw.Draw(strip)
    for x, y, cls, text in placed:
        draw.rectangle([x, y + 2, x + 11, y + 13], fill=tuple(int(c) for c in colorize(np.array([[cls]]))[0, 0]),
                       outline=(80, 80, 80))
        draw.text((x + 16, y + 2), text, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, names, alpha: float = 0.5) -> np.ndarray:
    """`overlay` with a legend below naming each class in the mask and its share of the pixels."""
    picture = overlay(image, mask, alpha)
    mask = resize(np.asarray(mask, dtype=np.uint8), picture.shape[:2], nearest=True)
    ids, counts = np.unique(mask, return_counts=True)
    entries = [(int(c), f"{names[c] if c < len(names) else 'ignore' if c == IGNORE else c} {n / mask.size:.0%}")
               for c, n in zip(ids, counts, strict=True)]
    return np.concatenate([picture, legend(entries, picture.shape[1])], axis=0)
