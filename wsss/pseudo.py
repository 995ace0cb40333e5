"""Stage 2: mined object regions + saliency -> fused pseudo-masks -> dense CRF -> pseudo-masks.

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

Multi-label images and overlaps: in mined-first and ae-psl a pixel in the regions of two or more
classes takes the one with the highest score (`--conflict score`, the rule of stage 1's
regions/ID.png) or is ignored (`--conflict ignore`); in saliency-first every salient pixel takes its
highest-scoring class (there is no overlap to resolve; `--conflict` does not apply). A salient
region that misses every CAM is ignored by every rule: unmined in mined-first and ae-psl, every
labelled class's score 0 (the CAMs are ReLU'd, so 0 means no evidence) in saliency-first.

The CRF step (`wsss.crf.crf_labels`, over background + the image's classes) then checks the fused
labels against the image: by default ("agree") a fused label is kept where the CRF gives the same
label and becomes 255 where it does not; ignore pixels stay ignored (wsss.crf says why).
`bench/bench_fusion.py` scores every rule, with and without the CRF, on a finished run.

The STC form (`stc_soft_target`): for a simple (single-class) image the saliency map is the soft
foreground probability of the image's class, 1 - saliency that of background.

Outputs under outputs/RUN/stage2/: saliency/ID.png (grey, cached), fused/ID.png (before CRF),
pseudo/ID.png (after CRF, what stage 3 trains on), overlay/ID.png for --overlays images spread over
the list (image | saliency | fused, titled with the rule | CRF), contact_sheet.png (a sample of
overlays), manifest.json (the rule, ignored and background fractions; with ground-truth masks also
the mIoU over labelled pixels of the stage-1 seeds, the fused masks and the pseudo-masks, as
`python -m wsss.eval --run RUN --stage stage2` computes it). Images already written are not redone
on a rerun with the same config and inputs; a different config stops (wsss.stage), --force starts afresh.
A CRF that cannot run (pydensecrf missing, a crashed worker) fails the stage unless --no-crf: a
pseudo-mask silently left unrefined would pass for a refined one.
Images without any label get an all-background pseudo-mask (that is what the label says);
labelled images without a seeds file are skipped with a warning.

Seeds: stage 2 reads its seeds through one format, stage 1's `regions/ID.npz` (written by
`wsss.erasing.write_union`), one file per labelled training image, with three arrays:

    keys   int (n,)           mask ids (1..C-1) of the image's labelled classes the seeds cover
    masks  bool (n, H, W)     the seed region of each of those classes, at the image's size
    score  float (n, H, W)    a per-class score in [0, 1] (stage 1: the normalised CAM, the max
                              over the erasing steps): conflicts and saliency-first use it; or
                              uint8 steps of 1/255, at the image's size or at wsss.scoremaps'
                              stored size (a quarter of it, resized bilinearly: stage 1 stores it so)

Any seed source in this format (another CAM method, an affinity-refined CAM, hand-drawn scribbles)
feeds stage 2 with `--seeds DIR` instead of stage 1's regions, with no code change: the folder is
checked up front (every file against its image's size and labels; an error names the file) and its
files are an input of the stage (a changed file stops a rerun, as a changed stage 1 does).
"""
from __future__ import annotations

import argparse
import zipfile
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss import io
from wsss.crf import LABEL_CRF_DEFAULTS, check_crf, crf_labels, parallel_map
from wsss.data.voc import DatasetError, VOCDataset
from wsss.io import IGNORE
from wsss.run import (
    barrier,
    count_images,
    gather,
    is_main_process,
    log,
    phase,
    runtime,
    shard,
    spread,
    stage_dir,
)
from wsss.scoremaps import CAMFileError, restore_scores
from wsss.shapes import MAX_SIDE, fitted_size
from wsss.stage import StageError, check_same_dataset, dataset_inputs, error_line, open_stage

PER_IMAGE = ("fused", "pseudo", "overlay")
# One overlay per image took 0.1 MB of the 0.15 MB an image may cost on disk over a whole run
# (about 1 GB on VOC's train_aug); a sample shows the rule at work, and the pseudo-masks are all there.
OVERLAYS = 24
OVERLAY_HEIGHT = 240  # overlay panels are scaled to this height: one PNG per image must stay small


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
FUSION_DEFAULT = "saliency-first"
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


# name -> rule(regions bool (n, H, W), keys int64 (n,), score float32 (n, H, W) normalised CAM,
# saliency float32 (H, W) in [0, 1], *, bg_threshold, fg_threshold, conflict) -> uint8 (H, W) with
# 0 = background, a key, or 255 = ignore. A rule uses the arguments it needs; the inputs come
# checked (shapes agree) from fuse_with_saliency.
FUSION_RULES = {
    "mined-first": fuse_mined_first,
    "ae-psl": fuse_ae_psl,
    "saliency-first": fuse_saliency_first,
}


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


# ---------------------------------------------------------------- flags

def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("stage 2: saliency fusion and dense CRF")
    # builtin-max by default: the product of the two border cues lost most objects that touch the border
    # (over half of VOC's object pixels) and the saliency-first fusion labelled them background; their
    # maximum raised the pseudo-masks by 6-7 points on both datasets and the demo's net by 6 (docs/results.md,
    # "Saliency and objects that touch the border").
    g.add_argument("--saliency", default="builtin-max",
                   help="builtin (unsupervised, wsss.saliency: its two border cues multiplied), builtin-max (the "
                        "cues' maximum: finds more of the objects that touch the border, less precisely; "
                        "bench/bench_saliency_border.py) or a folder of grey ID.png maps (DSS, DRFI...)")
    g.add_argument("--seeds", type=Path, default=None,
                   help="a folder of ID.npz seeds (keys, masks, score: the format of stage 1's regions, in the "
                        "module docstring of wsss/pseudo.py) to use instead of stage 1's; stage 1 is then not needed")
    g.add_argument("--fusion", choices=sorted(FUSION_RULES), default=FUSION_DEFAULT,
                   help="how mined regions and saliency make the pseudo-masks (wsss/pseudo.py): mined-first (a "
                        "mined pixel keeps its class, saliency only decides the background), ae-psl (as "
                        "mined-first, but a mined pixel of low saliency is ignored), saliency-first (high "
                        "saliency is foreground, classed by the highest CAM score among the image's labels)")
    g.add_argument("--bg-threshold", type=float, default=BG_THRESHOLD,
                   help="pixels with saliency below this are background (in mined-first and ae-psl only the "
                        "unmined ones). Low, as AE-PSL takes only clearly non-salient pixels "
                        "(docs/results.md, \"Saliency\")")
    g.add_argument("--fg-threshold", type=float, default=FG_THRESHOLD,
                   help="saliency-first: pixels with saliency at or above this are foreground (at least "
                        "--bg-threshold; equal to it: no ignore band)")
    g.add_argument("--conflict", choices=["score", "ignore"], default="score",
                   help="mined-first, ae-psl: a pixel mined for two classes: the higher normalised CAM wins (the "
                        "rule of stage 1's regions/ID.png), or it is ignored")
    g.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True,
                   help="check the fused masks with a dense CRF over the image's own labels")
    g.add_argument("--crf-mode", choices=["agree", "fill"], default="agree",
                   help="agree: keep a fused label only where the CRF gives the same, else 255, ignore stays "
                        "ignore; fill: the CRF's labels everywhere (worse in bench/bench_crf.py; see wsss.crf)")
    g.add_argument("--crf-gt-prob", type=float, default=0.7,
                   help="unary probability of a fused label (IRN's value for CRFs on hard labels; 0.7 beat "
                        "0.9 in bench/bench_crf.py)")
    g.add_argument("--crf-confidence", type=float, default=0.0,
                   help="pixels whose largest CRF marginal is below this become 255 (0: off)")
    g.add_argument("--crf-soft", action=argparse.BooleanOptionalAction, default=False,
                   help="give ignore pixels soft evidence from saliency and CAM scores instead of a uniform "
                        "unary (off: no gain in mode agree in bench/bench_crf.py)")
    g.add_argument("--crf-iterations", type=int, default=LABEL_CRF_DEFAULTS["iterations"])
    g.add_argument("--crf-gauss-sxy", type=float, default=LABEL_CRF_DEFAULTS["gauss_sxy"],
                   help="CRF kernels default to DeepLab v2's test-time ones: the PSA ones (3, 3, 80, 13, 10) "
                        "overpower hard-label unaries (wsss.crf)")
    g.add_argument("--crf-gauss-compat", type=float, default=LABEL_CRF_DEFAULTS["gauss_compat"])
    g.add_argument("--crf-bi-sxy", type=float, default=LABEL_CRF_DEFAULTS["bi_sxy"])
    g.add_argument("--crf-bi-srgb", type=float, default=LABEL_CRF_DEFAULTS["bi_srgb"])
    g.add_argument("--crf-bi-compat", type=float, default=LABEL_CRF_DEFAULTS["bi_compat"])
    runtime(g.add_argument("--overlays", type=int, default=OVERLAYS,
                           help="overlay pictures to draw, spread over the list (a number above the image "
                                "count draws every image)"))
    runtime(g.add_argument("--sample", type=int, default=16, help="overlays in the contact sheet"))
    return parser


def check_thresholds(fusion: str, bg_threshold: float, fg_threshold: float) -> None:
    """Thresholds a rule cannot use stop before any work, with the flags to fix."""
    if fusion == "saliency-first" and fg_threshold < bg_threshold:
        raise StageError(f"--fg-threshold {fg_threshold} is below --bg-threshold {bg_threshold}: "
                         f"saliency-first needs fg >= bg")


def fusion_of(config: dict) -> str:
    """The rule a stage-2 config made its pseudo-masks with."""
    return config.get("fusion", FUSION_BEFORE_OPTIONS)


# ---------------------------------------------------------------- one image (in a worker process)

@dataclass(frozen=True)
class Settings:
    """What a worker needs to process an image (small, picklable)."""
    out: Path
    num_classes: int
    fusion: str
    bg_threshold: float
    fg_threshold: float
    conflict: str
    crf: bool
    crf_mode: str
    gt_prob: float
    confidence: float
    soft: bool
    crf_params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    id: str
    image: Path
    regions: Path | None  # None: the image has no label, its pseudo-mask is all background
    gt: Path | None
    label_ids: tuple[int, ...]
    overlay: bool = False  # draw overlay/ID.png (a sample of the images: --overlays)


def settings_of(args, out: Path, num_classes: int) -> Settings:
    """A worker's Settings from stage 2's flags (parsed, or read back from its config.json)."""
    return Settings(out=out, num_classes=num_classes, fusion=fusion_of(vars(args)), bg_threshold=args.bg_threshold,
                    fg_threshold=args.fg_threshold, conflict=args.conflict, crf=args.crf,
                    crf_mode=args.crf_mode, gt_prob=args.crf_gt_prob, confidence=args.crf_confidence,
                    soft=args.crf_soft, crf_params=crf_params_of(vars(args)))


def crf_params_of(config: dict) -> dict:
    """The dense-CRF kernels of a stage-2 config (its --crf-* flags; stage 2's defaults for a flag
    it lacks, e.g. a config written before the flag existed)."""
    return {k: float(config.get(f"crf_{k}", v)) if k != "iterations" else int(config.get("crf_iterations", v))
            for k, v in LABEL_CRF_DEFAULTS.items()}


def load_regions(path: Path, label_ids, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, masks, score) of a seeds file (the format in the module docstring), checked against
    the image's labels and size."""
    try:
        with np.load(path) as data:
            keys, masks, score = data["keys"], data["masks"], data["score"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: cannot read seeds (an .npz with keys, masks, score): {e}") from e
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if masks.shape != (len(keys),) + tuple(shape) or score.ndim != 3 or score.shape[0] != len(keys):
        raise DatasetError(f"{path}: masks {masks.shape} / score {score.shape} do not fit {len(keys)} keys "
                           f"at image size {tuple(shape)}")
    stray = sorted(set(keys.tolist()) - set(label_ids))
    if stray:
        raise DatasetError(f"{path}: classes {stray} are not among the image's labels {list(label_ids)}")
    if keys.size and score.dtype != np.uint8 and (
            not np.issubdtype(score.dtype, np.floating) or score.min() < 0 or score.max() > 1):
        raise DatasetError(f"{path}: score must be float in [0, 1] (or uint8 steps of 1/255), got {score.dtype} "
                           f"in [{score.min()}, {score.max()}]")
    try:
        score = restore_scores(score, shape, path)
    except CAMFileError as e:
        raise DatasetError(str(e)) from e
    return keys, masks.astype(bool), score


def check_seeds(dataset: VOCDataset, folder: Path) -> None:
    """Every seeds file of a --seeds folder, read and checked against its image before any work starts."""
    if not folder.is_dir():
        raise DatasetError(f"--seeds {folder}: not a folder")
    found = 0
    for id_ in tqdm(dataset.ids, desc="check seeds", leave=False, disable=not is_main_process()):
        path, label_ids = folder / f"{id_}.npz", dataset.label_ids(id_)
        if label_ids.size and path.is_file():
            w, h = dataset.image_size(id_)
            load_regions(path, [int(k) for k in label_ids], (h, w))
            found += 1
    if not found:
        raise DatasetError(f"--seeds {folder}: no ID.npz for any labelled image of split '{dataset.split}'")


def _read_image(path: Path) -> np.ndarray:
    try:
        return io.read_image(path)
    except (OSError, ValueError) as e:
        raise DatasetError(str(e)) from e


def _overlay(image, saliency, fused, pseudo, id_, s: Settings):
    from wsss.viz import colorize, side_by_side

    return side_by_side([image, saliency, colorize(fused), colorize(pseudo)],
                        [id_, "saliency", f"fused: {s.fusion}", "after CRF" if s.crf else "pseudo (no CRF)"],
                        height=OVERLAY_HEIGHT)


def bounded_pseudo_mask(image, keys, masks, score, saliency, s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """`pseudo_mask` of a photo at most MAX_SIDE large, its masks brought back to full size (nearest)."""
    from wsss.viz import resize

    shape = image.shape[:2]
    size = fitted_size(shape, MAX_SIDE)
    if size == shape:
        return pseudo_mask(image, keys, masks, score, saliency, s)
    masks = np.stack([resize(m.astype(np.uint8), size, nearest=True) for m in masks]).astype(bool) if len(masks) \
        else np.zeros((0, *size), bool)
    score = np.stack([resize(c, size) for c in score]) if len(score) else np.zeros((0, *size), np.float32)
    fused, pseudo = pseudo_mask(resize(image, size), keys, masks, score, resize(saliency, size), s)
    return resize(fused, shape, nearest=True), resize(pseudo, shape, nearest=True)


def pseudo_mask(image, keys, masks, score, saliency, s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """(fused, pseudo-mask) of one image by the rule and CRF of `s`."""
    fused = fuse_with_saliency(masks, keys, score, saliency, s.bg_threshold, s.conflict, rule=s.fusion,
                               fg_threshold=s.fg_threshold)
    return fused, refine(image, fused, keys, score, saliency, s) if s.crf else fused


def refine(image, fused, keys, score, saliency, s: Settings) -> np.ndarray:
    """The CRF step of one image: fused labels in, pseudo-mask out (see wsss.crf for the 255 rule)."""
    soft = soft_scores(score, saliency) if s.soft else None
    return crf_labels(image, fused, keys, gt_prob=s.gt_prob, confidence=s.confidence, soft=soft,
                      mode=s.crf_mode, **s.crf_params)


def process_image(s: Settings, job: Job) -> dict:
    """Fuse, CRF and write one image (or read it back if already done); return its figures."""
    from wsss.eval import confusion_matrix
    from wsss.saliency import read_saliency

    paths = {k: s.out / k / f"{job.id}.png" for k in PER_IMAGE}
    gt = io.read_mask(job.gt) if job.gt is not None else None
    if job.regions is None:
        shape = gt.shape if gt is not None else _read_image(job.image).shape[:2]
        seeds = fused = pseudo = np.zeros(shape, np.uint8)
        if not paths["pseudo"].is_file():
            io.write_mask(paths["fused"], fused)
            io.write_mask(paths["pseudo"], pseudo)
    else:
        image = _read_image(job.image)
        keys, masks, score = load_regions(job.regions, job.label_ids, image.shape[:2])
        seeds = regions_label_map(masks, keys, score)
        done = paths["fused"].is_file() and paths["pseudo"].is_file()
        if not done or (job.overlay and not paths["overlay"].is_file()):
            saliency = read_saliency(s.out / "saliency", job.id)
            if saliency.shape != image.shape[:2]:
                raise DatasetError(f"{s.out / 'saliency' / (job.id + '.png')}: saliency {saliency.shape} "
                                   f"differs from image size {image.shape[:2]}")
        if done:
            fused, pseudo = io.read_mask(paths["fused"]), io.read_mask(paths["pseudo"])
        else:
            fused, pseudo = bounded_pseudo_mask(image, keys, masks, score, saliency, s)
            io.write_mask(paths["fused"], fused)
            io.write_mask(paths["pseudo"], pseudo)  # written last: marks the image done
        if job.overlay and not paths["overlay"].is_file():
            io.write_png(paths["overlay"], _overlay(image, saliency, fused, pseudo, job.id, s))
    figures = {"pixels": fused.size}
    for name, mask in (("fused", fused), ("pseudo", pseudo)):
        figures[f"{name}_ignored"] = int((mask == IGNORE).sum())
        figures[f"{name}_background"] = int((mask == 0).sum())
    if gt is not None:
        if gt.shape != fused.shape:
            raise DatasetError(f"{job.gt}: mask size {gt.shape} differs from image size {fused.shape}")
        for name, mask in (("seeds", seeds), ("fused", fused), ("pseudo", pseudo)):
            try:
                figures[f"{name}_confusion"] = confusion_matrix(gt, mask, s.num_classes, ignore_pred=True)
            except ValueError as e:
                raise DatasetError(f"{job.gt}: {e}") from e
    return figures


# ---------------------------------------------------------------- the stage

def image_jobs(dataset: VOCDataset, regions_dir: Path) -> tuple[list[Job], list[str], list[str]]:
    """(jobs, ids without a label, labelled ids without a seeds file, which are skipped)."""
    jobs, unlabelled, no_regions = [], [], []
    for id_ in dataset.ids:
        label_ids = tuple(int(k) for k in dataset.label_ids(id_))
        gt = dataset.mask_path(id_) if dataset.has_mask(id_) else None
        if not label_ids:
            unlabelled.append(id_)
            jobs.append(Job(id_, dataset.image_path(id_), None, gt, label_ids))
            continue
        path = regions_dir / f"{id_}.npz"
        if not path.is_file():
            no_regions.append(id_)
            continue
        jobs.append(Job(id_, dataset.image_path(id_), path, gt, label_ids))
    return jobs, unlabelled, no_regions


def _summary(figures: list[dict], num_classes: int) -> dict:
    from wsss.eval import scores

    pixels = sum(f["pixels"] for f in figures)
    out = {}
    for name in ("seeds", "fused", "pseudo"):
        entry = {}
        if name != "seeds":
            entry["ignored_fraction"] = round(sum(f[f"{name}_ignored"] for f in figures) / pixels, 4)
            entry["background_fraction"] = round(sum(f[f"{name}_background"] for f in figures) / pixels, 4)
        confusions = [f[f"{name}_confusion"] for f in figures if f"{name}_confusion" in f]
        if confusions:
            result = scores(sum(confusions))
            entry["miou_labelled"] = None if result["miou"] is None else round(result["miou"], 2)
            entry["pixel_acc_labelled"] = None if result["pixel_acc"] is None else round(result["pixel_acc"], 2)
            entry["images_with_gt"] = len(confusions)
        if entry:
            out[name] = entry
    return out


def _contact_sheet(out: Path, ids: list[str], count: int, seed: int) -> None:
    from wsss.viz import contact_sheet

    have = [i for i in ids if (out / "overlay" / f"{i}.png").is_file()]
    if count <= 0 or not have:
        return
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(have, size=min(count, len(have)), replace=False).tolist())
    sheet = contact_sheet([out / "overlay" / f"{i}.png" for i in sample], cols=2)
    io.write_png(out / "contact_sheet.png", sheet)


def run(args) -> dict | None:
    """Stage 2 (see the module docstring); returns the manifest, or None when skipped."""
    from wsss.saliency import BUILTINS, ensure_saliency
    from wsss.train import init_distributed

    check_thresholds(args.fusion, args.bg_threshold, args.fg_threshold)
    dataset = VOCDataset(args.data, args.train_split, limit=args.limit)
    if args.seeds is None:
        stage1 = stage_dir(args, "stage1")
        if not (stage1 / io.MANIFEST).is_file():
            raise StageError(f"{stage1}: stage 1 is not complete (no {io.MANIFEST}); run stage 1 first")
        seeds, inputs = stage1 / "regions", {"stage1": stage1}
        check_same_dataset(stage1, dataset, "stage 2")
    dataset.validate()
    if args.seeds is not None:
        check_seeds(dataset, args.seeds)
        seeds, inputs = args.seeds, {"seeds": [args.seeds / f"{i}.npz" for i in dataset.ids]}
    inputs.update(dataset_inputs(dataset, masks=True))
    if args.saliency not in BUILTINS:
        if not Path(args.saliency).is_dir():
            raise StageError(f"--saliency {args.saliency}: not {' or '.join(BUILTINS)} and not a folder")
        inputs["saliency"] = Path(args.saliency)
    if args.crf:
        check_crf("stage 2", "--no-crf")
    stage = open_stage(args, "stage2", inputs,
                       owned=("saliency", *PER_IMAGE, "contact_sheet.png"))
    if stage is None:
        return None
    out = stage.path
    init_distributed("cpu")  # under torchrun the ranks share the images out (gloo, for the barriers)
    barrier()

    jobs, unlabelled, no_regions = image_jobs(dataset, seeds)
    if no_regions:
        log.warning("%d labelled images have no seeds file in %s (e.g. %s): skipped", len(no_regions), seeds,
                    ", ".join(no_regions[:3]))
    if unlabelled:
        log.info("%d images have no label: their pseudo-masks are all background", len(unlabelled))
    labelled = [j.id for j in jobs if j.regions is not None]
    if not labelled:
        raise StageError(f"{seeds}: no seeds file for any labelled image of "
                         f"split '{args.train_split}'")
    drawn = set(spread(labelled, args.overlays)) if args.overlays > 0 else set()
    jobs = [replace(j, overlay=j.id in drawn) for j in jobs]
    with phase("saliency"):
        ensure_saliency(dataset, shard(labelled), out / "saliency", args.saliency, args.workers)

    settings = settings_of(args, out, dataset.num_classes)
    figures, failed = [], []
    with phase("fusion-crf"):
        for job, result, error in parallel_map(partial(process_image, settings), shard(jobs), args.workers,
                                               "stage 2"):
            if isinstance(error, BrokenProcessPool):  # the worker died, twice: a crash in the CRF's native code
                error = RuntimeError(f"its worker process died (a crash in native code, e.g. the CRF: {error})")
            if error is not None:
                failed.append((job.id, error_line(error) or f"{type(error).__name__}: {error}"))
                log.error("%s: %s", *failed[-1])
                continue
            figures.append(result)
            count_images(1)
    figures, failed = (sum(parts, []) for parts in zip(*gather((figures, failed)), strict=True))
    if failed:
        raise StageError(f"stage 2 failed on {len(failed)} of {len(jobs)} images (first: {failed[0][0]}: "
                         f"{failed[0][1]}); the images already done are kept. Fix the cause (a CRF that cannot "
                         f"run: or pass --no-crf) and rerun; the stage is not marked complete")
    if not is_main_process():
        return None
    _contact_sheet(out, labelled, args.sample, args.seed)

    outputs = {"fusion": settings.fusion, "crf": settings.crf, "images": len(jobs),
               "unlabelled_all_background": len(unlabelled), "skipped_no_regions": len(no_regions),
               **_summary(figures, dataset.num_classes)}
    for name in ("seeds", "fused", "pseudo"):
        if name in outputs:
            log.info("%s: %s", name, outputs[name])
    return stage.finish(outputs)

