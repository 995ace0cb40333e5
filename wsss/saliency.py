"""Saliency maps for stage 2: precomputed maps loaded from a folder, or a built-in unsupervised method.

Stage 2 uses saliency to decide which pixels are background, so a map must be dark on background
and bright on the objects, with their extent, not only on edges or blobs of texture.

Built-in method (`compute_saliency`): robust background detection (Zhu et al., CVPR 2014) fused
with the minimum barrier distance (Zhang et al., ICCV 2015), refined by a per-image colour model.

- Robust background detection works on SLIC superpixels: a region is background when it is
  strongly connected to the image border along paths of similar colour (boundary connectivity),
  which holds for sky, walls and ground even when an object touches the border; objects get a
  contrast measured against likely background only; a least-squares optimisation then makes the
  map uniform inside regions and sharp along colour edges. It gives whole objects, not edges.
- The minimum barrier distance is a pixel-level border-seeded distance (largest minus smallest
  intensity on the best path from the border) that is robust to blur and smooth gradients; it
  keeps detail that superpixels lose and darkens smooth backgrounds. Each cue fails where the
  other does not, so their product keeps what both agree is salient.
- A Bayesian colour refinement (foreground / background colour histograms weighted by the map)
  moves the map onto the object's colours at pixel level, and the MB+ contrast enhancement
  (a sigmoid at the Otsu threshold) makes it confident, so background reads close to 0.

Why these: both are the strongest training-free methods of their time on real photos, both are
explicitly robust to objects touching the border (common on VOC), and both run in well under a
second a VOC image on one core at a 256-pixel working size with numpy / scipy / scikit-image /
OpenCV. Spectral residual marks small high-frequency spots (edges, text) rather than objects. How
each cue and their product score on the 48 real VOC photos (`python -m bench.bench_saliency`) is in
docs/results.md, "Saliency".

Maps on disk (`wsss.saliency_maps`: `ensure_saliency`, `read_saliency`): grey PNGs `ID.png`, 0..255,
at image size.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import shortest_path
from skimage.filters import threshold_otsu
from skimage.segmentation import slic

BUILTIN = "builtin"
# the built-in saliency by its cue combination: `--saliency builtin` (product) or `builtin-max`
BUILTINS = {BUILTIN: "product", "builtin-max": "max"}
WORK_SIDE = 256  # longer side of the working image; maps are resized back to the image size
SUPERPIXELS = 300
# Robust background detection, the paper's settings (colour distances in CIE-Lab units).
SIGMA_COLOUR = 10.0
SIGMA_BOUNDARY = 1.0
SIGMA_SPATIAL = 0.25  # positions normalised to [0, 1]
SMOOTHNESS_FLOOR = 0.1
COLOUR_BINS = 16  # per Lab axis, for the colour refinement
SIGMOID_GAIN = 10.0  # MB+ contrast enhancement


def _normalise(x: np.ndarray) -> np.ndarray:
    span = float(x.max() - x.min())
    return (x - x.min()) / span if span > 1e-12 else np.zeros_like(x)


# ---------------------------------------------------------------- robust background detection

def _superpixel_graph(labels: np.ndarray, lab: np.ndarray):
    """Mean Lab colour and normalised centre per superpixel, adjacent pairs, border superpixels."""
    h, w = labels.shape
    n = int(labels.max()) + 1
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n).astype(np.float64)
    colour = np.stack([np.bincount(flat, lab[..., c].ravel(), n) for c in range(3)], 1) / count[:, None]
    yy, xx = np.mgrid[:h, :w]
    centre = np.stack([np.bincount(flat, (yy / h).ravel(), n), np.bincount(flat, (xx / w).ravel(), n)], 1)
    centre /= count[:, None]
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:].ravel()])
    differ = a != b
    pairs = np.unique(np.sort(np.stack([a[differ], b[differ]], 1), 1), axis=0)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return colour, centre, pairs, border


def _robust_background(labels: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """Saliency per superpixel, in [0, 1] (Zhu et al. 2014, saliency optimisation)."""
    colour, centre, pairs, border = _superpixel_graph(labels, lab)
    n = len(colour)
    dist = np.sqrt(((colour[:, None] - colour[None]) ** 2).sum(2))
    edge = dist[pairs[:, 0], pairs[:, 1]]
    # Geodesic colour distance over adjacent superpixels; an extra node joins all border
    # superpixels at no cost, so the border counts as one connected background region.
    tiny = 1e-6  # scipy treats zero weights as missing edges
    rows = np.concatenate([pairs[:, 0], border])
    cols = np.concatenate([pairs[:, 1], np.full(len(border), n)])
    weights = np.concatenate([edge + tiny, np.full(len(border), tiny)])
    graph = coo_matrix((weights, (rows, cols)), shape=(n + 1, n + 1)).tocsr()
    geodesic = shortest_path(graph, method="D", directed=False)[:n, :n]
    similar = np.exp(-geodesic ** 2 / (2 * SIGMA_COLOUR ** 2))
    connectivity = similar[:, border].sum(1) / np.sqrt(similar.sum(1))  # border length / sqrt(area)
    background = 1 - np.exp(-connectivity ** 2 / (2 * SIGMA_BOUNDARY ** 2))
    spatial = np.exp(-((centre[:, None] - centre[None]) ** 2).sum(2) / (2 * SIGMA_SPATIAL ** 2))
    foreground = _normalise((dist * spatial * background[None]).sum(1))  # background-weighted contrast
    # minimise sum bg_i s_i^2 + fg_i (s_i - 1)^2 + sum_adjacent w_ij (s_i - s_j)^2
    smooth = np.exp(-edge ** 2 / (2 * SIGMA_COLOUR ** 2)) + SMOOTHNESS_FLOOR
    system = np.zeros((n, n))
    system[pairs[:, 0], pairs[:, 1]] = -smooth
    system[pairs[:, 1], pairs[:, 0]] = -smooth
    system[np.diag_indices(n)] = -system.sum(1) + background + foreground
    return np.clip(np.linalg.solve(system, foreground), 0, 1)


# ---------------------------------------------------------------- minimum barrier distance

def _barrier_sweep(image, dist, upper, lower) -> None:
    """One pass along axis 0: relax each line from the previous one (in place)."""
    for k in range(1, image.shape[0]):
        up = np.maximum(upper[k - 1], image[k])
        low = np.minimum(lower[k - 1], image[k])
        cand = up - low
        better = cand < dist[k]
        np.copyto(dist[k], cand, where=better)
        np.copyto(upper[k], up, where=better)
        np.copyto(lower[k], low, where=better)


def _minimum_barrier(lab: np.ndarray) -> np.ndarray:
    """Minimum barrier distance from the image border, summed over the Lab channels.

    FastMBD's raster scans, done as down, right, up and left passes over whole rows or columns
    at once so that numpy does the inner loop.
    """
    dist = np.full(lab.shape, np.inf, np.float32)
    dist[0] = dist[-1] = dist[:, 0] = dist[:, -1] = 0
    upper, lower = lab.copy(), lab.copy()
    for flip in (False, True):
        arrays = [a[::-1, ::-1] if flip else a for a in (lab, dist, upper, lower)]
        _barrier_sweep(*arrays)
        columns = [np.ascontiguousarray(a.transpose(1, 0, 2)) for a in arrays]
        _barrier_sweep(*columns)
        for a, c in zip(arrays[1:], columns[1:], strict=True):
            a[...] = c.transpose(1, 0, 2)
    return dist.sum(2)


# ---------------------------------------------------------------- refinement

def _colour_posterior(lab: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """P(object | colour, prior): Lab histograms of object and background weighted by the prior."""
    scale = np.array([100.0, 256.0, 256.0], np.float32)
    offset = np.array([0.0, 128.0, 128.0], np.float32)
    q = np.clip(((lab + offset) / scale * COLOUR_BINS).astype(np.int64), 0, COLOUR_BINS - 1)
    code = ((q[..., 0] * COLOUR_BINS + q[..., 1]) * COLOUR_BINS + q[..., 2]).ravel()
    p = prior.ravel().astype(np.float64)
    fg = np.bincount(code, p, COLOUR_BINS ** 3)
    bg = np.bincount(code, 1 - p, COLOUR_BINS ** 3)
    like_fg = (fg / max(fg.sum(), 1e-12))[code]
    like_bg = (bg / max(bg.sum(), 1e-12))[code]
    joint = p * like_fg
    return (joint / np.maximum(joint + (1 - p) * like_bg, 1e-12)).reshape(prior.shape)


def _enhance(saliency: np.ndarray) -> np.ndarray:
    """MB+ contrast enhancement: a sigmoid centred at the Otsu threshold, rescaled to [0, 1]."""
    threshold = threshold_otsu(saliency)
    return _normalise(1 / (1 + np.exp(-SIGMOID_GAIN * (saliency - threshold))))


COMBINE = ("product", "max")  # how the two border cues are joined (bench/bench_saliency_border.py)


def compute_saliency(image: np.ndarray, combine: str = "product") -> np.ndarray:
    """Unsupervised salient-object map of an RGB uint8 image (HxWx3): float32 HxW in [0, 1].

    `combine`: "product" (both cues must find an object: precise, but both treat the border as
    background, so an object touching it is lost when either does) or "max" (either cue suffices)."""
    if combine not in COMBINE:
        raise ValueError(f"combine {combine!r}: choose one of {', '.join(COMBINE)}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"compute_saliency needs an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    scale = WORK_SIDE / max(h, w)
    size = (max(2, round(w * scale)), max(2, round(h * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    lab = cv2.cvtColor(small.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    superpixels = slic(lab, n_segments=SUPERPIXELS, compactness=10, start_label=0, convert2lab=False,
                       channel_axis=-1)
    background_cue = _robust_background(superpixels, lab)[superpixels]
    barrier = _normalise(_minimum_barrier(lab))
    if combine == "product":
        saliency = _normalise(background_cue * barrier)
    else:
        saliency = _normalise(np.maximum(_normalise(background_cue), barrier))
    if saliency.max() == 0:  # a featureless image: nothing stands out
        return np.zeros((h, w), np.float32)
    saliency = _enhance(_colour_posterior(lab, saliency))
    return np.clip(cv2.resize(saliency.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), 0, 1)
