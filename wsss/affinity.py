"""Inter-pixel affinity and the random walk (an algorithm: arrays in, arrays out; torch-free).

A CAM is right about *where* an object is and wrong about its extent: it covers the discriminative
parts and leaks over the borders. AffinityNet (Ahn & Kwak, CVPR 2018, "PSA") and IRN (Ahn et al.,
CVPR 2019) fix that without any other supervision:

1. the confident parts of the CAMs (high: that class; low: background; the rest unknown) say, for
   pairs of nearby pixels, "same label" or "different label" (`confident_labels`, `pair_labels`);
2. a small net on the classifier's features learns a feature per pixel whose L1 distance gives the
   affinity of a pair, a = exp(-mean |f_i - f_j|) (PSA's form; wsss.models.affinity), trained with
   PSA's loss (background pairs 1/4, foreground pairs 1/4, pairs of different labels 1/2);
3. the predicted affinities, raised to a power beta and normalised, are the transition matrix of a
   random walk over the feature grid (`transition_matrix`); walking the CAMs spreads each class over
   the pixels that have high affinity to it, up to the object's boundary, where affinity drops
   (`random_walk`); a background threshold on the walked maps, normalised per class, gives the labels
   (`walk_labels`).

Settings, and where they come from:

- RADIUS 5 (pairs within 5 grid cells; PSA and IRN both train and walk with radius 5).
- Confident labels as IRN makes them: the CAMs thresholded high (foreground) and low (background),
  each refined by a dense CRF. IRN's thresholds, 0.30 / 0.05, suit its CAMs, whose best background
  threshold is about 0.15; stage 1's seeds are the max over the erasing steps, whose best threshold
  is 0.45-0.7 (docs/results.md), and at 0.30 two thirds of the "confident" foreground pixels of the
  demo data were background. FG_CONFIDENT 0.7 / BG_CONFIDENT 0.3 keep IRN's ratios to the best
  threshold roughly (2x and 1/2-1/3 of it, capped below 1); docs/results.md, "Random-walk seeds", has
  how many of the labels each choice got right.
- BETA 10 (IRN's beta; PSA used 8): sharpens the affinities so the walk stops at boundaries.
  Lower (6) let the classes flood the background.
- WALK_STEPS 32 on a grid of stride 8. IRN walks 2^8 = 256 steps on a stride-4 grid. A walk's reach
  grows with the square root of its steps, so 64 steps at stride 8 would reach as many image pixels
  as IRN's (8 * sqrt(64) = 4 * sqrt(256) = 64 px); our affinities come from a head trained on a few
  thousand images instead of IRN's 10,582, leak more, and 128 or more steps spread the classes past
  their objects; 16-64 steps scored within 1.5 points of each other, 32 best at the default
  threshold (`python -m bench.bench_rw`; docs/results.md, "Random-walk seeds").
- WALK_BG_THRESHOLD 0.6: background where every walked class map, divided by its maximum, is below
  it (IRN pads a constant background score the same way, at 0.25 of the global maximum). Swept on
  both of our datasets (docs/results.md, "Random-walk seeds"): 0.55-0.65 best, 0.6 within a point
  of the best on each. With stage 1's 300-step floor both datasets' seeds are best at 0.7, 2-3 points
  above 0.6 ("Stage 1's budget"); the pseudo-masks and nets at 0.7 are not measured yet, so 0.6 stays.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse

from wsss.crf import CONFIDENT_CRF, crf_labels
from wsss.labels import IGNORE

RADIUS = 5
BETA = 10.0
WALK_STEPS = 32
FG_CONFIDENT = 0.7
BG_CONFIDENT = 0.3
WALK_BG_THRESHOLD = 0.6


def pair_offsets(radius: int = RADIUS) -> list[tuple[int, int]]:
    """The (dy, dx) of the pairs a pixel forms with its neighbours closer than `radius`, each
    unordered pair once (dy > 0, or dy == 0 and dx > 0), as PSA and IRN index them."""
    return [(dy, dx) for dy in range(radius) for dx in range(-radius + 1, radius)
            if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius]


def shifted(a, dy: int, dx: int):
    """(a[..., y, x], a[..., y + dy, x + dx]) over the (y, x) where both lie inside the grid (the last
    two axes); plain slicing, so it serves numpy arrays and torch tensors alike."""
    h, w = a.shape[-2:]
    c0, c1 = (0, w - dx) if dx >= 0 else (-dx, w)
    return a[..., :h - dy, c0:c1], a[..., dy:, c0 + dx:c1 + dx]


def confident_labels(image: np.ndarray, score: np.ndarray, keys, fg: float = FG_CONFIDENT,
                     bg: float = BG_CONFIDENT) -> np.ndarray:
    """uint8 HxW affinity labels from normalised CAMs (n, H, W), as IRN makes them: the CAMs above `fg`
    (the highest class) and above `bg` are each refined to the image's edges by a dense CRF
    (`wsss.crf.CONFIDENT_CRF`); a pixel the first calls an object takes that class, a pixel both call
    background is background (0), the rest is IGNORE. Without classes, all IGNORE."""
    keys = np.asarray(keys, np.int64).reshape(-1)
    if len(keys) == 0:
        return np.full(score.shape[1:], IGNORE, np.uint8)
    top, best = score.max(axis=0), keys[np.argmax(score, axis=0)]

    def refined(threshold: float) -> np.ndarray:
        hard = np.where(top >= threshold, best, 0).astype(np.uint8)
        return crf_labels(image, hard, keys, gt_prob=0.7, mode="fill", **CONFIDENT_CRF)

    sure, possible = refined(fg), refined(bg)
    out = np.where(sure != 0, sure, IGNORE).astype(np.uint8)
    out[(sure == 0) & (possible == 0)] = 0
    return out


def to_grid(labels: np.ndarray, stride: int, size: tuple[int, int]) -> np.ndarray:
    """The label at the centre of each stride x stride cell, cropped or padded (IGNORE) to `size`."""
    grid = labels[stride // 2::stride, stride // 2::stride][:size[0], :size[1]]
    out = np.full(size, IGNORE, np.uint8)
    out[:grid.shape[0], :grid.shape[1]] = grid
    return out


def pair_labels(grid: np.ndarray, radius: int = RADIUS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background pairs, foreground pairs, pairs of different labels), bool, one entry per pair in
    the order of `pair_offsets` x `shifted` (the order `wsss.models.affinity.pair_affinity` gives);
    pairs with an IGNORE end are in none of the three."""
    bg, fg, neg = [], [], []
    for dy, dx in pair_offsets(radius):
        a, b = shifted(grid, dy, dx)
        known = (a != IGNORE) & (b != IGNORE)
        same = known & (a == b)
        bg.append((same & (a == 0)).ravel())
        fg.append((same & (a != 0)).ravel())
        neg.append((known & (a != b)).ravel())
    return np.concatenate(bg), np.concatenate(fg), np.concatenate(neg)


def transition_matrix(features: np.ndarray, beta: float = BETA, radius: int = RADIUS) -> sparse.csr_matrix:
    """The walk's transition matrix T (N x N, N = H * W) of features (C, H, W): affinities
    a = exp(-mean |f_i - f_j|) for both directions of every pair within `radius` and 1 on the diagonal,
    raised to `beta`, each column divided by its sum (x -> x @ T averages over a pixel's neighbours)."""
    features = np.asarray(features, np.float32)
    h, w = features.shape[1:]
    index = np.arange(h * w).reshape(h, w)
    rows, cols, values = [index.ravel()], [index.ravel()], [np.ones(h * w, np.float32)]
    for dy, dx in pair_offsets(radius):
        fa, fb = shifted(features, dy, dx)
        ia, ib = shifted(index, dy, dx)
        a = np.exp(-beta * np.abs(fa - fb).mean(axis=0)).ravel()  # exp(-d) ** beta
        rows += [ia.ravel(), ib.ravel()]
        cols += [ib.ravel(), ia.ravel()]
        values += [a, a]
    affinity = sparse.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                                 shape=(h * w, h * w))
    return sparse.csr_matrix(affinity.multiply(1.0 / np.asarray(affinity.sum(axis=0)).ravel()[None]))


def random_walk(maps: np.ndarray, transition: sparse.csr_matrix, steps: int = WALK_STEPS) -> np.ndarray:
    """maps (n, H, W) walked `steps` times: x <- x @ T for each map (flattened)."""
    n, h, w = maps.shape
    x = np.asarray(maps, np.float64).reshape(n, h * w).T
    step = sparse.csr_matrix(transition.T)
    for _ in range(steps):
        x = step @ x
    return x.T.reshape(n, h, w).astype(np.float32)


def walk_labels(walked: np.ndarray, bg_threshold: float = WALK_BG_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(masks bool (n, H, W), score float32 (n, H, W) in [0, 1]) of walked class maps: each map divided
    by its maximum is the score; a class's mask is where its score reaches `bg_threshold` (where two
    reach it the seeds' reader gives the pixel to the higher score)."""
    walked = np.clip(np.asarray(walked, np.float32), 0, None)
    peak = walked.reshape(len(walked), -1).max(axis=1) if walked.size else np.zeros(len(walked), np.float32)
    score = walked / np.maximum(peak, 1e-12)[:, None, None]
    return score >= bg_threshold, score
