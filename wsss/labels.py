"""What the values of a label mask mean, in every mask of the pipeline: 0 background, 1..C-1 the
classes, IGNORE a pixel no loss or score counts; and the colours masks are drawn and saved with."""
from __future__ import annotations

import numpy as np

IGNORE = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), shape (n, 3) uint8."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


PALETTE = voc_palette()
