"""Fusion rules: mined object regions + saliency -> pseudo-mask labels (an algorithm: arrays in, arrays out).


The fusion rule is a named option (`--fusion`, the plug-ins of `FUSION_RULES`; the default is the
one constant `FUSION_DEFAULT`). Per pixel, with the image's classes only (0 = background, 255 =
ignored by stage 3); "low saliency" is saliency < `--bg-threshold`, "high" is >= `--fg-threshold`:

- `mined-first` (this project's first reading of AE-PSL, Wei et al. CVPR 2017): a pixel in a mined
  region keeps its class even where saliency is low; saliency decides only the background among
  unmined pixels; the rest is ignored. Trusts the classifier's evidence over class-agnostic saliency.
- `ae-psl` (AE-PSL as its talk states it: saliency supplies the background, the
  mined regions the objects, unassigned pixels are ignored): as mined-first, except that a mined
  pixel of low saliency is claimed by both sources, and the talk gives neither precedence, so it is
  ignored.
- `saliency-first` (after the saliency-guided pseudo-labels of later methods, e.g. OAA, Jiang et al.
  ICCV 2019, and EPS, Lee et al. CVPR 2021; a plain per-pixel form, neither paper's exact
  procedure): high saliency is foreground, its class the labelled class with the highest normalised
  CAM score (stage 1's per-class "score", the max over the erasing steps; a tie goes to the class
  listed first); low saliency is background; in between ignored. The mined regions are not used.

- `saliency-seeds`: saliency-first, except that a pixel of low saliency inside a seed region is ignored
  instead of background: where saliency and the seeds disagree, neither is trusted. Saliency misses
  objects (objects that touch the image border, low-contrast ones) and saliency-first makes them
  confident background; good seeds (the random-walk seeds of `--rw`) cover many of them.
- `seeds`: the seeds alone, as IRN makes its pseudo-labels (no saliency): a pixel in a seed region
  takes its class (overlaps as `--conflict`), every other pixel is background.

Multi-label images and overlaps: in mined-first and ae-psl a pixel in the regions of two or more
classes takes the one with the highest score (`--conflict score`, the rule of stage 1's
regions/ID.png) or is ignored (`--conflict ignore`); in saliency-first every salient pixel takes its
highest-scoring class (there is no overlap to resolve; `--conflict` does not apply). A salient
region that misses every CAM is ignored by every rule: unmined in mined-first and ae-psl, every
labelled class's score 0 (the CAMs are ReLU'd, so 0 means no evidence) in saliency-first.

Stage 2 (wsss.pseudo) applies a rule to every image; the CRF step (`wsss.crf.crf_labels`, over
background + the image's classes) then checks the fused labels against the image: by default
("agree") a fused label is kept where the CRF gives the same label and becomes 255 where it does
not; ignore pixels stay ignored (wsss.crf says why).
`bench/bench_fusion.py` scores every rule, with and without the CRF, on a finished run.

The STC form (`stc_soft_target`): for a simple (single-class) image the saliency map is the soft
foreground probability of the image's class, 1 - saliency that of background.
"""
from __future__ import annotations

import numpy as np

from wsss.labels import IGNORE

# ---------------------------------------------------------------- the fusion rule

def _checked(regions, keys, score, conflict: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(regions bool, keys int64, score float32), or a ValueError saying which shape is off."""
    regions = np.asarray(regions, dtype=bool)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    score = np.asarray(score, dtype=np.float32)
    if regions.ndim != 3 or len(keys) != regions.shape[0]:
        raise ValueError(f"regions must be (n, H, W) with n = len(keys) = {len(keys)}, got {regions.shape}")
    if score.shape != regions.shape:
        raise ValueError(f"score shape {score.shape} differs from regions shape {regions.shape}")
    if conflict not in ("score", "ignore"):
        raise ValueError(f"conflict must be 'score' or 'ignore', got {conflict!r}")
    return regions, keys, score


def regions_label_map(regions: np.ndarray, keys, score: np.ndarray, conflict: str = "score") -> np.ndarray:
    """uint8 HxW: the class of the region that holds the pixel, overlaps by score (or 255), else 0."""
    regions, keys, score = _checked(regions, keys, score, conflict)
    if len(keys) == 0:
        return np.zeros(regions.shape[1:], np.uint8)
    claims = regions.sum(axis=0)
    best = np.argmax(np.where(regions, score, -np.inf), axis=0)
    out = np.where(claims > 0, keys[best], 0).astype(np.uint8)
    if conflict == "ignore":
        out[claims > 1] = IGNORE
    return out


# Saliency-first, by measurement (bench/bench_fusion.py; docs/results.md, "Stage 2: fusion rules"): the
# best pseudo-masks and the best PSL net on the VOC-like dataset (real VOC layouts, 20 classes, small
# objects), where a CAM blob at output stride 16 spills over the objects' borders and gets classes
# wrong while the saliency map follows the objects; the CAM only names the class. On the embedded
# set mined-first's net was better: saliency that misses object parts makes them background, where
# mined-first leaves them ignored; the results document has both.
#
# With the random-walk seeds (stage 1's default since), saliency-seeds was the default for a while: the walked
# seeds cover much of what saliency misses (objects at the border), and ignoring those pixels instead of
# calling them background gave the best PSL net on the VOC-like data while stage 1 was undertrained.
# With stage 1's 300-step floor the seeds are good enough to supply the objects themselves: ae-psl (the
# AE-PSL paper's own rule: objects from the mined/walked seeds, background from saliency, a pixel both claim
# ignored) gives the best pseudo-masks on both datasets, 7 and 5 points above saliency-seeds, the better PSL
# net on the VOC-like data over three stage-3 seeds and one as good on the embedded set (docs/results.md,
# "Stage 1's budget"). Saliency no longer names the objects: an object it misses (at the image border) is
# ignored where the walked seeds cover it, not background.
FUSION_DEFAULT = "ae-psl"
BG_THRESHOLD = 0.1
FG_THRESHOLD = 0.5
FUSION_BEFORE_OPTIONS = "mined-first"  # the rule of runs made before --fusion existed (no "fusion" in config)


def fuse_mined_first(regions, keys, score, saliency, *, bg_threshold, fg_threshold, conflict) -> np.ndarray:
    """Mined regions first (module docstring): a mined pixel keeps its class whatever its saliency."""
    out = regions_label_map(regions, keys, score, conflict)
    out[~regions.any(axis=0) & (saliency >= bg_threshold)] = IGNORE
    return out


def fuse_ae_psl(regions, keys, score, saliency, *, bg_threshold, fg_threshold, conflict) -> np.ndarray:
    """AE-PSL as its talk states it (module docstring): a mined pixel of low saliency is ignored."""
    out = fuse_mined_first(regions, keys, score, saliency, bg_threshold=bg_threshold, fg_threshold=fg_threshold,
                           conflict=conflict)
    out[regions.any(axis=0) & (saliency < bg_threshold)] = IGNORE
    return out


def fuse_saliency_first(regions, keys, score, saliency, *, bg_threshold, fg_threshold, conflict) -> np.ndarray:
    """Saliency first (OAA, EPS; module docstring): the foreground from saliency, its class from the CAMs."""
    if fg_threshold < bg_threshold:
        raise ValueError(f"fg_threshold {fg_threshold} is below bg_threshold {bg_threshold}")
    out = np.full(saliency.shape, IGNORE, np.uint8)
    out[saliency < bg_threshold] = 0
    if len(keys):
        salient = (saliency >= fg_threshold) & (score.max(axis=0) > 0)
        out[salient] = keys[np.argmax(score, axis=0)][salient]
    return out


def fuse_saliency_seeds(regions, keys, score, saliency, *, bg_threshold, fg_threshold, conflict) -> np.ndarray:
    """Saliency first, a seeded pixel of low saliency ignored (module docstring)."""
    out = fuse_saliency_first(regions, keys, score, saliency, bg_threshold=bg_threshold,
                              fg_threshold=fg_threshold, conflict=conflict)
    out[(out == 0) & regions.any(axis=0)] = IGNORE
    return out


def fuse_seeds(regions, keys, score, saliency, *, bg_threshold, fg_threshold, conflict) -> np.ndarray:
    """The seeds alone (IRN; module docstring): seeded pixels their class, the rest background."""
    return regions_label_map(regions, keys, score, conflict)


# name -> rule(regions bool (n, H, W), keys int64 (n,), score float32 (n, H, W) normalised CAM,
# saliency float32 (H, W) in [0, 1], *, bg_threshold, fg_threshold, conflict) -> uint8 (H, W) with
# 0 = background, a key, or 255 = ignore. A rule uses the arguments it needs; the inputs come
# checked (shapes agree) from fuse_with_saliency.
FUSION_RULES = {
    "mined-first": fuse_mined_first,
    "ae-psl": fuse_ae_psl,
    "saliency-first": fuse_saliency_first,
    "saliency-seeds": fuse_saliency_seeds,
    "seeds": fuse_seeds,
}
SALIENCY_FIRST = ("saliency-first", "saliency-seeds")  # the rules that take the foreground from saliency


def fuse_with_saliency(regions: np.ndarray, keys, score: np.ndarray, saliency: np.ndarray,
                       bg_threshold: float = BG_THRESHOLD, conflict: str = "score", *,
                       rule: str = FUSION_DEFAULT, fg_threshold: float = FG_THRESHOLD) -> np.ndarray:
    """The fusion `rule` of the module docstring: uint8 HxW, 0 = background, keys, 255 = ignore.

    regions bool (n, H, W) mined region per class, keys (n,) their mask ids, score float (n, H, W)
    normalised CAM, saliency float HxW in [0, 1].
    """
    if rule not in FUSION_RULES:
        raise ValueError(f"fusion rule must be one of {sorted(FUSION_RULES)}, got {rule!r}")
    regions, keys, score = _checked(regions, keys, score, conflict)
    saliency = np.asarray(saliency, dtype=np.float32)
    if saliency.shape != regions.shape[1:]:
        raise ValueError(f"saliency shape {saliency.shape} differs from the regions' {regions.shape[1:]}")
    return FUSION_RULES[rule](regions, keys, score, saliency, bg_threshold=bg_threshold, fg_threshold=fg_threshold,
                              conflict=conflict)


def soft_scores(score: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """float32 (1 + n, H, W) soft evidence over background + the image's classes for the CRF:
    background 1 - saliency; the salient mass split over the classes by their CAM scores
    (evenly where every score is zero)."""
    score = np.clip(np.asarray(score, dtype=np.float32), 0, None)
    saliency = np.clip(np.asarray(saliency, dtype=np.float32), 0, 1)
    total = score.sum(axis=0)
    share = np.where(total > 0, score / np.maximum(total, 1e-6), 1.0 / max(len(score), 1))
    return np.concatenate([(1 - saliency)[None], saliency[None] * share]).astype(np.float32)


def stc_soft_target(saliency: np.ndarray, class_id: int, num_classes: int) -> np.ndarray:
    """STC's target for a simple image of one class: float32 (C, H, W), channel `class_id` = saliency,
    channel 0 = 1 - saliency, every other class 0. Saliency uint8 0..255 or float in [0, 1]."""
    saliency = np.asarray(saliency)
    sal = saliency.astype(np.float32) / 255 if saliency.dtype == np.uint8 else saliency.astype(np.float32)
    if not 0 < class_id < num_classes:
        raise ValueError(f"class_id must be an object class in 1..{num_classes - 1}, got {class_id}")
    target = np.zeros((num_classes,) + sal.shape, np.float32)
    target[0] = 1 - np.clip(sal, 0, 1)
    target[class_id] = np.clip(sal, 0, 1)
    return target


def fusion_of(config: dict) -> str:
    """The rule a stage-2 config made its pseudo-masks with."""
    return config.get("fusion", FUSION_BEFORE_OPTIONS)
