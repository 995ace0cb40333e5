"""Stage 2: mined object regions + saliency -> fused pseudo-masks -> dense CRF -> pseudo-masks.

The fusion rules (`--fusion`) are wsss.fusion's, the CRF wsss.crf's; this module runs them over a
run's images.

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

Stage 1 run with `--rw` writes random-walk seeds (wsss.rw) in this format to `rw/seeds/`; stage 2
then reads those instead of the union's.

Any seed source in this format (another CAM method, an affinity-refined CAM, hand-drawn scribbles)
feeds stage 2 with `--seeds DIR` instead of stage 1's regions, with no code change: the folder is
checked up front (every file against its image's size and labels; an error names the file) and its
files are an input of the stage (a changed file stops a rerun, as a changed stage 1 does).
"""
from __future__ import annotations

import argparse
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss import io
from wsss.crf import LABEL_CRF_DEFAULTS, check_crf, crf_labels, crf_params_of
from wsss.data.voc import DatasetError, VOCDataset
from wsss.fusion import (
    BG_THRESHOLD,
    FG_THRESHOLD,
    FUSION_DEFAULT,
    FUSION_RULES,
    SALIENCY_FIRST,
    fuse_with_saliency,
    fusion_of,
    regions_label_map,
    soft_scores,
)
from wsss.labels import IGNORE
from wsss.layout import (
    CONTACT_SHEET,
    FUSED,
    OVERLAY,
    PSEUDO,
    SALIENCY,
    STAGE1,
    STAGE2,
    Stage1Folder,
    Stage2Folder,
    item,
)
from wsss.run import (
    barrier,
    count_images,
    gather,
    is_main_process,
    layout,
    log,
    phase,
    runtime,
    shard,
    spread,
)
from wsss.scoremaps import CAMFileError, read_seeds
from wsss.shapes import MAX_SIDE, fitted_size
from wsss.stage import StageError, check_same_dataset, dataset_inputs, error_line, open_stage
from wsss.workers import parallel_map

PER_IMAGE = (FUSED, PSEUDO, OVERLAY)
# One overlay per image took 0.1 MB of the 0.15 MB an image may cost on disk over a whole run
# (about 1 GB on VOC's train_aug); a sample shows the rule at work, and the pseudo-masks are all there.
OVERLAYS = 24
OVERLAY_HEIGHT = 240  # overlay panels are scaled to this height: one PNG per image must stay small


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
                   help="how mined regions and saliency make the pseudo-masks (wsss/pseudo.py): ae-psl (the "
                        "default: the seeds give the objects, low saliency the background, a seeded pixel of low "
                        "saliency is ignored), mined-first (a mined pixel keeps its class, saliency only decides "
                        "the background), saliency-first (high saliency is foreground, classed by the highest "
                        "CAM score among the image's labels), "
                        "saliency-seeds (as saliency-first, but a seeded pixel of low saliency is ignored), "
                        "seeds (the seeds alone, the rest background: no saliency, as IRN)")
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
    if fusion in SALIENCY_FIRST and fg_threshold < bg_threshold:
        raise StageError(f"--fg-threshold {fg_threshold} is below --bg-threshold {bg_threshold}: "
                         f"{fusion} needs fg >= bg")


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


def load_regions(path: Path, label_ids, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, masks, score) of a seeds file (`wsss.scoremaps.read_seeds`), checked against the
    image's labels and size; a bad file is the dataset's error, naming it."""
    try:
        return read_seeds(path, label_ids, shape)
    except CAMFileError as e:
        raise DatasetError(str(e)) from e


def check_seeds(dataset: VOCDataset, folder: Path) -> None:
    """Every seeds file of a --seeds folder, read and checked against its image before any work starts."""
    if not folder.is_dir():
        raise DatasetError(f"--seeds {folder}: not a folder")
    found = 0
    for id_ in tqdm(dataset.ids, desc="check seeds", leave=False, disable=not is_main_process()):
        path, label_ids = item(folder, id_, ".npz"), dataset.label_ids(id_)
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
    from wsss.metrics import confusion_matrix
    from wsss.saliency_maps import read_saliency

    paths = {k: item(s.out / k, job.id) for k in PER_IMAGE}
    gt = io.read_mask(job.gt) if job.gt is not None else None
    if job.regions is None:
        shape = gt.shape if gt is not None else _read_image(job.image).shape[:2]
        seeds = fused = pseudo = np.zeros(shape, np.uint8)
        if not paths[PSEUDO].is_file():
            io.write_mask(paths[FUSED], fused)
            io.write_mask(paths[PSEUDO], pseudo)
    else:
        image = _read_image(job.image)
        keys, masks, score = load_regions(job.regions, job.label_ids, image.shape[:2])
        seeds = regions_label_map(masks, keys, score)
        done = paths[FUSED].is_file() and paths[PSEUDO].is_file()
        if not done or (job.overlay and not paths[OVERLAY].is_file()):
            saliency = read_saliency(Stage2Folder(s.out).saliency, job.id)
            if saliency.shape != image.shape[:2]:
                raise DatasetError(f"{item(Stage2Folder(s.out).saliency, job.id)}: saliency {saliency.shape} "
                                   f"differs from image size {image.shape[:2]}")
        if done:
            fused, pseudo = io.read_mask(paths[FUSED]), io.read_mask(paths[PSEUDO])
        else:
            fused, pseudo = bounded_pseudo_mask(image, keys, masks, score, saliency, s)
            io.write_mask(paths[FUSED], fused)
            io.write_mask(paths[PSEUDO], pseudo)  # written last: marks the image done
        if job.overlay and not paths[OVERLAY].is_file():
            io.write_png(paths[OVERLAY], _overlay(image, saliency, fused, pseudo, job.id, s))
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
        path = item(regions_dir, id_, ".npz")
        if not path.is_file():
            no_regions.append(id_)
            continue
        jobs.append(Job(id_, dataset.image_path(id_), path, gt, label_ids))
    return jobs, unlabelled, no_regions


def _summary(figures: list[dict], num_classes: int) -> dict:
    from wsss.metrics import scores

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

    overlay = Stage2Folder(out).overlay
    have = [i for i in ids if item(overlay, i).is_file()]
    if count <= 0 or not have:
        return
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(have, size=min(count, len(have)), replace=False).tolist())
    sheet = contact_sheet([item(overlay, i) for i in sample], cols=2)
    io.write_png(out / CONTACT_SHEET, sheet)


def stage1_seeds(stage1: Path) -> Path:
    """The seeds stage 2 takes from a finished stage 1: a run with --rw made random-walk seeds, and
    those, not the union's regions."""
    walked = "rw" in io.read_manifest(stage1).get("outputs", {})
    return Stage1Folder(stage1).rw_seeds if walked else Stage1Folder(stage1).regions


def _seeds_and_inputs(args, dataset: VOCDataset) -> tuple[Path, dict]:
    """(the seeds folder, the stage's inputs), every check on them made before any work: stage 1
    finished on the same dataset (or a --seeds folder whose every file fits its image), a readable
    dataset, a saliency folder that exists."""
    from wsss.saliency import BUILTINS

    if args.seeds is None:
        stage1 = layout(args).stage1.path
        if not (stage1 / io.MANIFEST).is_file():
            raise StageError(f"{stage1}: stage 1 is not complete (no {io.MANIFEST}); run stage 1 first")
        seeds, inputs = stage1_seeds(stage1), {STAGE1: stage1}
        check_same_dataset(stage1, dataset, "stage 2")
    dataset.validate()
    if args.seeds is not None:
        check_seeds(dataset, args.seeds)
        seeds, inputs = args.seeds, {"seeds": [item(args.seeds, i, ".npz") for i in dataset.ids]}
    inputs.update(dataset_inputs(dataset, masks=True))
    if args.saliency not in BUILTINS:
        if not Path(args.saliency).is_dir():
            raise StageError(f"--saliency {args.saliency}: not {' or '.join(BUILTINS)} and not a folder")
        inputs["saliency"] = Path(args.saliency)
    return seeds, inputs


def run(args) -> dict | None:
    """Stage 2 (see the module docstring); returns the manifest, or None when skipped."""
    from wsss.saliency_maps import ensure_saliency
    from wsss.train import init_distributed

    check_thresholds(args.fusion, args.bg_threshold, args.fg_threshold)
    dataset = VOCDataset(args.data, args.train_split, limit=args.limit)
    seeds, inputs = _seeds_and_inputs(args, dataset)
    if args.crf:
        check_crf("stage 2", "--no-crf")
    stage = open_stage(args, STAGE2, inputs, owned=(SALIENCY, *PER_IMAGE, CONTACT_SHEET))
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
        ensure_saliency(dataset, shard(labelled), Stage2Folder(out).saliency, args.saliency, args.workers)

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

