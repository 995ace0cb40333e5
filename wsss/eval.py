"""Score segmentations, pseudo-masks and CAM seeds against ground-truth masks (VOC protocol).

    python -m wsss.eval --pred DIR --gt DIR --list FILE [--num-classes C] [--json FILE]
    python -m wsss.eval --pred DIR --data ROOT [--split val]         # gt, list and class names from ROOT
    python -m wsss.eval --cam DIR --gt DIR --list FILE               # CAM background-threshold sweep
    python -m wsss.eval --run NAME [--stage stage1|stage2|stage3]    # artifacts of outputs/NAME/

VOC protocol: one confusion matrix summed over all images (rows = ground truth, columns =
prediction); ground-truth 255 is ignored; IoU_c = TP / (TP + FP + FN); mIoU is the mean over all
classes including background. A class with neither ground truth nor prediction in the whole set
has IoU 0/0: it is NaN and left out of the mean, as the standard implementations (the VOC devkit,
DeepLab, IRN) do; a class predicted but absent from the ground truth has IoU 0 and counts. Also
pixel accuracy, mean class accuracy (classes with ground truth) and frequency-weighted IoU.
Every figure is a percentage.

Pseudo-masks (`--ignore-pred`, on for stage1/stage2 via --run): the headline scores count the
pixels a prediction marks 255 as background, as IRN's and SEAM's evaluations of seeds and
pseudo-masks do (so figures compare with theirs, and leaving a pixel unlabelled is never cheaper
than labelling it); beside them, "labelled" holds the scores over the labelled pixels only and
`ignored` the percentage of valid ground-truth pixels the prediction left unlabelled. Without it a
prediction may hold 255 only where the ground truth is 255 too (so a ground-truth folder scores as
a prediction); 255 on a valid pixel is an error rather than a silent choice of protocol.

CAM seeds (`--cam`): each ID.npz holds "cam" (n, H, W) in [0, 1] (wsss.cam's format) and "keys"
int64 (n,) mask ids; a constant background plane at threshold t is put before the CAMs and the argmax is the
label (as IRN's eval_cam), for every threshold of the sweep in one pass over the images. The same
sweep runs on stage 1's union (regions/ID.npz, whose "score" is the max normalised CAM over the
erasing steps).

Which images (--run stage1/stage2): the field reports seeds and pseudo-masks on VOC `train`
(1,464 images), while a run trains on train_aug (10,582, which holds train). When the dataset has
ImageSets/Segmentation/train.txt and the run trained on another split, the images of `train` that
the run has artifacts for (those in its split) are scored; otherwise the run's split. The output
and each result's "split" say which.

Why it is fast: this module imports numpy and PIL only (no torch); each image pair becomes one
np.bincount over `gt * 256 + pred` of the raw uint8 values, which gives the matrix, the ignore
counts and the out-of-range checks at once without boolean indexing; images are read by a thread
pool (PNG decoding releases the GIL) and each worker sums its own chunk.

JSON (`--json`, default outputs/NAME/STAGE/eval.json with --run): the result of one evaluation,
{"miou", "pixel_acc", "mean_class_acc", "fwiou", "iou": [per class, null = NaN], "class_acc",
"class_names", "confusion", "num_images", "missing", ...}; with several evaluations (--run
stage1/stage2) a dict of them by name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from wsss.io import read_mask, write_json
from wsss.labels import IGNORE
from wsss.layout import (
    CONFIG,
    MANIFEST,
    PRED,
    STAGE2,
    STAGE3,
    STAGES,
    RunLayout,
    Stage1Folder,
    Stage2Folder,
    Stage3Folder,
    eval_file,
)
from wsss.metrics import (  # noqa: F401 - confusion_matrix: eval's API, defined with the metric
    EvalError,
    check_classes,
    confusion_matrix,
    histogram_problem,
    joint_histogram,
    percent,
    scores,
)
from wsss.scoremaps import CAMFileError, read_cams

# Same tuple as wsss.data.voc.VOC_CLASSES (a test keeps them equal); repeated so that this module
# imports nothing beyond numpy and PIL.
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
CHUNK = 32  # images a worker scores before handing back its partial sum
SHOW_MISSING = 5


# ---------------------------------------------------------------- reading many images

class _Progress:
    """A one-line counter on stderr when it is a terminal (stdlib only: tqdm is not imported here)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.last = total, desc, 0, 0.0
        self.live = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.live and (now - self.last > 0.2 or self.done == self.total):
            self.last = now
            print(f"\r{self.desc}: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live:
            print(file=sys.stderr, flush=True)


def _sum_over_chunks(score_chunk, ids: list[str], workers: int, desc: str) -> np.ndarray:
    """Sum `score_chunk(ids_of_chunk)` over chunks of ids, chunks scored by a thread pool."""
    chunks = [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)]
    progress = _Progress(len(ids), desc)
    total = None
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(score_chunk, chunk): len(chunk) for chunk in chunks}
        try:
            for future in as_completed(futures):
                part = future.result()
                total = part if total is None else total + part
                progress.update(futures[future])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        finally:
            progress.close()
    return total


def _read(path: Path) -> np.ndarray:
    try:
        return read_mask(path)
    except ValueError as e:
        raise EvalError(str(e)) from e


def _existing(folder: Path, ids: list[str], suffix: str, what: str) -> set[str]:
    if not folder.is_dir():
        raise EvalError(f"{folder}: {what} folder not found")
    names = set(os.listdir(folder))
    return {i for i in ids if f"{i}{suffix}" in names}


def _missing_error(folder: Path, missing: list[str], total: int, what: str, hint: str = "") -> EvalError:
    shown = ", ".join(missing[:SHOW_MISSING]) + (", ..." if len(missing) > SHOW_MISSING else "")
    return EvalError(f"{folder}: {len(missing)} of {total} {what} missing ({shown}){hint}")


ALLOW_MISSING = "; --allow-missing (allow_missing=True) counts them as all background"


def _check_inputs(gt_dir: Path, ids) -> list[str]:
    """The ids as a list, after checking that there are some and that each has a ground truth."""
    ids = list(ids)
    if not ids:
        raise EvalError("no image ids to score (empty list)")
    have = _existing(gt_dir, ids, ".png", "ground truth")
    if len(have) < len(ids):
        raise _missing_error(gt_dir, [i for i in ids if i not in have], len(ids), "ground-truth masks")
    return ids


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _finish(conf: np.ndarray, num_classes: int, ids: list[str], missing: list[str], class_names) -> dict:
    result = scores(conf)
    result.update(num_images=len(ids), missing=len(missing), confusion=conf.tolist(),
                  class_names=list(class_names) if class_names else default_class_names(num_classes))
    return result


def evaluate(pred_dir, gt_dir, ids, num_classes: int = 21, *, ignore_pred: bool = False,
             allow_missing: bool = False, workers: int | None = None, class_names=None) -> dict:
    """Score pred_dir/ID.png (palette or grey PNGs) against gt_dir/ID.png over `ids`.

    Returns scores() plus "confusion", "num_images", "missing" (predictions counted as all
    background) and "class_names". With ignore_pred, pixels the prediction marks 255 count as
    background in those (the IRN/SEAM protocol), and the result also holds "ignored" (percent of
    valid GT pixels marked 255) and "labelled" (the scores over the other pixels only). Raises
    EvalError naming the file for a missing ground truth or prediction, a size mismatch or a label
    id out of range.
    """
    check_classes(num_classes)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    ids = _check_inputs(gt_dir, ids)
    have = _existing(pred_dir, ids, ".png", "prediction")
    missing = [i for i in ids if i not in have]
    if missing and not allow_missing:
        raise _missing_error(pred_dir, missing, len(ids), "predictions", ALLOW_MISSING)

    def score_one(id_: str) -> np.ndarray:
        gt_path, pred_path = gt_dir / f"{id_}.png", pred_dir / f"{id_}.png"
        gt = _read(gt_path)
        if id_ in have:
            pred = _read(pred_path)
            if pred.shape != gt.shape:
                raise EvalError(f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]} but its "
                                f"ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}")
        else:
            pred = np.zeros_like(gt)
        hist = joint_histogram(gt, pred)
        problem = histogram_problem(hist, num_classes, ignore_pred)
        if problem:
            raise EvalError(f"{gt_path if problem[0] == 'gt' else pred_path}: {problem[1]}")
        return hist

    def score_chunk(chunk: list[str]) -> np.ndarray:
        return sum(score_one(i) for i in chunk)

    hist = _sum_over_chunks(score_chunk, ids, workers or default_workers(), f"scoring {pred_dir}")
    if not ignore_pred:
        return _finish(hist[:num_classes, :num_classes], num_classes, ids, missing, class_names)
    labelled = hist[:num_classes, :num_classes]
    headline = labelled.copy()
    headline[:, 0] += hist[:num_classes, IGNORE]  # unlabelled pixels are background
    result = _finish(headline, num_classes, ids, missing, class_names)
    valid = hist[:num_classes].sum()
    result["ignored"] = percent(hist[:num_classes, IGNORE].sum() / valid if valid else np.nan)
    result["labelled"] = {k: v for k, v in scores(labelled).items() if k not in ("class_acc", "pixels")}
    return result


def evaluate_cams(cam_dir, gt_dir, ids, num_classes: int = 21, *, thresholds=THRESHOLDS, array: str = "cam",
                  allow_missing: bool = False, workers: int | None = None, class_names=None) -> dict:
    """Background-threshold sweep of CAM seeds: cam_dir/ID.npz against gt_dir/ID.png.

    `array`: the npz entry holding the (n, H, W) scores beside "keys" ("cam" for a step's CAMs,
    "score" for stage 1's union).

    A pixel takes the class of its highest CAM when that CAM exceeds t, background otherwise
    (a tie goes to background, as argmax over [t, cams...] does). All thresholds come from one
    pass: each pixel is binned by how many thresholds lie below its peak CAM, one bincount per
    image over (bin, gt, class), and the per-threshold matrices are cumulative sums over bins.

    Returns scores() of the best threshold plus "best_threshold" and "sweep": [{"threshold",
    "miou"}, ...]. A missing CAM is an error unless allow_missing (then all background).
    """
    check_classes(num_classes)
    cam_dir, gt_dir = Path(cam_dir), Path(gt_dir)
    ids = _check_inputs(gt_dir, ids)
    thresholds = np.asarray(sorted(thresholds), dtype=np.float64)
    if not thresholds.size:
        raise EvalError("no thresholds to sweep")
    bins = thresholds.size + 1
    have = _existing(cam_dir, ids, ".npz", "CAM")
    missing = [i for i in ids if i not in have]
    if missing and not allow_missing:
        raise _missing_error(cam_dir, missing, len(ids), "CAM files", ALLOW_MISSING)

    def read_cam(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        try:
            cam, keys = read_cams(path, shape, array)  # at the ground truth's size
        except CAMFileError as e:
            raise EvalError(str(e)) from e
        if keys.size and (keys.min() < 1 or keys.max() >= num_classes):
            raise EvalError(f"{path}: keys {keys.tolist()} outside 1..{num_classes - 1}")
        return cam, keys

    def score_one(id_: str) -> np.ndarray:
        gt_path = gt_dir / f"{id_}.png"
        gt = _read(gt_path)
        level = np.zeros(gt.shape, dtype=np.intp)  # number of thresholds below the peak CAM
        label = np.zeros(gt.shape, dtype=np.intp)
        if id_ in have:
            cam, keys = read_cam(cam_dir / f"{id_}.npz", gt.shape)
            if keys.size:
                level = np.searchsorted(thresholds, cam.max(axis=0), side="left")
                label = keys[cam.argmax(axis=0)]
        index = (level * 256 + gt) * num_classes + label
        hist = np.bincount(index.ravel(), minlength=bins * 256 * num_classes)
        hist = hist.reshape(bins, 256, num_classes)
        bad = np.flatnonzero(hist[:, num_classes:IGNORE].any(axis=(0, 2))) + num_classes
        if bad.size:
            raise EvalError(f"{gt_path}: label ids {bad.tolist()} outside 0..{num_classes - 1} and 255")
        return hist[:, :num_classes]

    def score_chunk(chunk: list[str]) -> np.ndarray:
        return sum(score_one(i) for i in chunk)

    hist = _sum_over_chunks(score_chunk, ids, workers or default_workers(), f"CAM sweep {cam_dir}")
    below = np.cumsum(hist, axis=0)  # below[i]: pixels whose peak CAM is <= thresholds[i]
    sweep, confs = [], []
    for i, t in enumerate(thresholds):
        conf = below[-1] - below[i]  # pixels above t keep their CAM class ...
        conf[:, 0] += below[i].sum(axis=1)  # ... the rest are background
        confs.append(conf)
        sweep.append({"threshold": float(t), "miou": scores(conf)["miou"]})
    best = int(np.argmax([s["miou"] if s["miou"] is not None else -1 for s in sweep]))
    result = _finish(confs[best], num_classes, ids, missing, class_names)
    result.update(best_threshold=float(thresholds[best]), sweep=sweep)
    return result


# ---------------------------------------------------------------- report

def default_class_names(num_classes: int) -> list[str]:
    if num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return ["background"] + [f"class {i}" for i in range(1, num_classes)]


def read_class_names(root) -> list[str] | None:
    """Names from ROOT/class_names.txt (one a line, background first), None when there is none."""
    path = Path(root) / "class_names.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise EvalError(f"{path}: needs background plus at least one class, found {len(names)} names")
    return names


def _fmt(x: float | None) -> str:
    return "     -" if x is None else f"{x:6.2f}"


def format_table(result: dict, class_names=None, title: str | None = None) -> str:
    """Per-class IoU table, then mIoU, pixel accuracy, mean class accuracy and FWIoU (percent)."""
    names = list(class_names or result.get("class_names") or default_class_names(len(result["iou"])))
    width = max(len(n) for n in names)
    lines = [title] if title else []
    if "sweep" in result:
        lines.append("background threshold sweep (mIoU):")
        lines += [f"  t={s['threshold']:.2f}  {_fmt(s['miou'])}" for s in result["sweep"]]
        lines.append(f"best threshold {result['best_threshold']:.2f}:")
    lines.append(f"  {'id':>3}  {'class':<{width}}     IoU    acc")
    for i, name in enumerate(names):
        lines.append(f"  {i:>3}  {name:<{width}}  {_fmt(result['iou'][i])} {_fmt(result['class_acc'][i])}")
    lines.append(f"mIoU {_fmt(result['miou'])}   pixel acc {_fmt(result['pixel_acc'])}   "
                 f"mean class acc {_fmt(result['mean_class_acc'])}   FWIoU {_fmt(result['fwiou'])}")
    if "labelled" in result:
        lines.append(f"  (unlabelled pixels counted as background, the IRN/SEAM protocol; over labelled pixels "
                     f"only: mIoU {_fmt(result['labelled']['miou']).strip()}, "
                     f"{_fmt(result['ignored']).strip()}% of valid pixels unlabelled)")
    extra = [f"{result['num_images']} images" + (f" of split '{result['split']}'" if result.get("split") else "")]
    if result.get("missing"):
        extra.append(f"{result['missing']} missing counted as background")
    lines.append("(" + "; ".join(extra) + ")")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line



def build_parser() -> argparse.ArgumentParser:
    from wsss import preset
    from wsss.run import Parser

    p = Parser(prog="python -m wsss.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.preset_section = "eval"
    p.add_argument("--preset", metavar="NAME|FILE", help=f"the eval section of a preset as defaults: {preset.describe()}")
    p.add_argument("--smoke", action="store_true", help="the smoke overrides of the eval section (wsss.preset)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--pred", type=Path, help="folder of ID.png predictions (palette or grey PNGs)")
    what.add_argument("--cam", type=Path, help="folder of ID.npz CAMs: background-threshold sweep")
    what.add_argument("--run", help="score the artifacts of OUTPUTS/RUN/STAGE against that run's dataset")
    p.add_argument("--outputs", type=Path, default=Path("outputs"), help="folder holding the runs")
    p.add_argument("--stage", choices=STAGES, default="stage3",
                   help="with --run: stage3 = val predictions, stage2 = pseudo-masks, stage1 = seeds")
    p.add_argument("--gt", type=Path, help="folder of ground-truth ID.png (default: DATA/SegmentationClassAug "
                                           "or DATA/SegmentationClass)")
    p.add_argument("--data", type=Path, help="dataset root: default ground truth, list and class names")
    p.add_argument("--split", default="val", help="with --data and no --list: ImageSets/Segmentation/SPLIT.txt")
    ids = p.add_mutually_exclusive_group()
    ids.add_argument("--list", type=Path, help="file of image ids, one a line (first word)")
    ids.add_argument("--ids", nargs="+", help="image ids")
    p.add_argument("--num-classes", type=int,
                   help="classes including background (default: DATA/class_names.txt, else 21)")
    p.add_argument("--ignore-pred", action="store_true",
                   help="pseudo-masks: count pixels the prediction marks 255 as background (IRN/SEAM), with the "
                        "mIoU over labelled pixels and the unlabelled fraction beside it")
    p.add_argument("--allow-missing", action="store_true", help="count missing predictions as all background")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS),
                   help="background thresholds of the CAM sweep")
    p.add_argument("--workers", type=int, default=default_workers(), help="reader threads")
    p.add_argument("--json", type=Path, help="write the results here (default with --run: OUTPUTS/RUN/STAGE/eval.json)")
    return p


def read_list(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: list file not found")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise EvalError(f"{path}: the list is empty")
    return ids


def _mask_dir(root: Path) -> Path:
    for name in MASK_DIRS:
        if (root / name).is_dir():
            return root / name
    raise EvalError(f"{root}: no ground truth folder ({' or '.join(MASK_DIRS)})")


def _list_path(root: Path, split: str) -> Path:
    return root / "ImageSets" / "Segmentation" / f"{split}.txt"


def stage3_predictions(stage_dir: Path) -> str:
    """The prediction folder of a stage-3 run to score: `pred` (the default test-time flags) when
    there, else the one its manifest lists last (e.g. `pred-crf` of a preset with test-time CRF)."""
    if Stage3Folder(stage_dir).pred().is_dir():
        return PRED
    try:
        listed = list(json.loads((stage_dir / MANIFEST).read_text())["outputs"]["predictions"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = []
    if not listed:
        raise EvalError(f"{stage_dir}: no predictions (has stage 3 finished?)")
    return listed[-1]


def protocol_ids(data: Path, run_split: str) -> tuple[list[str], str, str]:
    """(ids, split, why) of the images to score a run's stage-1/2 artifacts on: VOC `train` where
    the dataset has that list and the run trained on another split (the images of it in the run's
    split, the only ones with artifacts), else the run's split (module docstring)."""
    run_ids = read_list(_list_path(data, run_split))
    if run_split == "train":
        return run_ids, run_split, "the run's split, 'train' (the IRN/SEAM protocol)"
    if not _list_path(data, "train").is_file():
        return run_ids, run_split, f"the run's split '{run_split}': the dataset has no separate 'train' list"
    train = read_list(_list_path(data, "train"))
    in_run = set(run_ids)
    ids = [i for i in train if i in in_run]
    if not ids:
        return run_ids, run_split, f"the run's split '{run_split}': no image of 'train' is in it"
    part = "" if len(ids) == len(train) else f", the {len(ids)} of its {len(train)} in the run's split"
    return ids, "train", f"split 'train' (the IRN/SEAM protocol{part}); the run trained on '{run_split}'"


def _run_jobs(args) -> tuple[Path, str, list[tuple[str, str, Path, bool, str]], Path, list[str] | None, str]:
    """(data root, split, [(name, "pred" | "cam", folder, ignore_pred, npz array)], default json,
    ids or None for the whole split, why these images) for --run."""
    stage_dir = RunLayout.of(args.outputs, args.run).stage(args.stage)
    config_path = stage_dir / CONFIG
    if not config_path.is_file():
        raise EvalError(f"{config_path}: not found (has {args.stage} of run '{args.run}' been started?)")
    try:
        config = json.loads(config_path.read_text())
        data = Path(config["data"])
        split = config["val_split" if args.stage == STAGE3 else "train_split"]
    except (ValueError, KeyError, TypeError) as e:
        raise EvalError(f"{config_path}: needs 'data', 'train_split' and 'val_split' ({e!r})") from e
    if not data.is_dir():
        raise EvalError(f"{config_path}: dataset root {data} not found (run from the folder the stage ran in)")
    json_path = stage_dir / eval_file(PRED)
    limit = config.get("limit") or 0  # a --limit run has artifacts for the first `limit` images of each split
    if args.stage == STAGE3:
        pred = stage3_predictions(stage_dir)
        jobs = [("pred", "pred", Stage3Folder(stage_dir).pred(pred), args.ignore_pred, "")]
        json_path = stage_dir / eval_file(pred)
        ids = read_list(_list_path(data, split))[:limit] if limit else None
        return data, split, jobs, json_path, ids, f"the run's val split '{split}'" + (
            f", its first {limit} images (--limit)" if limit else "")
    ids, split, why = protocol_ids(data, split)
    if limit:
        kept = set(read_list(_list_path(data, config["train_split"]))[:limit])
        ids, why = [i for i in ids if i in kept], f"{why}; the images of the run's first {limit} (--limit)"
        if not ids:
            raise EvalError(f"{config_path}: none of the run's {limit} images (--limit) is in split '{split}'")
    if args.stage == STAGE2:
        stage2 = Stage2Folder(stage_dir)
        jobs = [("pseudo", "pred", stage2.pseudo, True, "")]
        if stage2.fused.is_dir():
            jobs.append(("fused", "pred", stage2.fused, True, ""))
        return data, split, jobs, json_path, ids, why
    stage1 = Stage1Folder(stage_dir)
    return data, split, [("step1_regions", "pred", stage1.step_regions(1), True, ""),
                         ("union_regions", "pred", stage1.regions, True, ""),
                         ("cam_sweep", "cam", stage1.cams(1), True, "cam"),
                         ("union_sweep", "cam", stage1.regions, True, "score")], json_path, ids, why


TITLES = {"pred": "predictions", "pseudo": "pseudo-masks (after CRF)", "fused": "fused pseudo-masks (before CRF)",
          "step1_regions": "mined regions, step 1 (plain CAM)", "union_regions": "mined regions, union of steps",
          "cam_sweep": "CAM seeds, step 1", "union_sweep": "CAM seeds, max over the erasing steps"}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_ids, why = None, None
        if args.run:
            data, split, jobs, json_path, run_ids, why = _run_jobs(args)
        else:
            data, split = args.data, args.split
            folder = args.pred or args.cam
            jobs = [("pred" if args.pred else "cam_sweep", "pred" if args.pred else "cam", folder, args.ignore_pred,
                     "cam")]
            json_path = None
        json_path = args.json or json_path
        gt_dir = args.gt or (_mask_dir(data) if data else None)
        if gt_dir is None:
            raise EvalError("say where the ground truth is: --gt DIR or --data ROOT")
        if args.ids or args.list:
            ids, split, why = (args.ids or read_list(args.list)), None, None
        elif run_ids is not None:
            ids = run_ids
        elif data:
            ids = read_list(_list_path(data, split))
        else:
            raise EvalError("say which images to score: --list FILE, --ids ID ... or --data ROOT [--split]")
        names = read_class_names(data) if data else None
        num_classes = args.num_classes or (len(names) if names else len(VOC_CLASSES))
        if names and len(names) != num_classes:
            raise EvalError(f"--num-classes {num_classes} but {data / 'class_names.txt'} names {len(names)} classes")
        if why:
            print(f"scoring {len(ids)} images: {why}\n")

        results = {}
        for name, kind, folder, ignore_pred, array in jobs:
            t0 = time.perf_counter()
            if kind == "cam":
                result = evaluate_cams(folder, gt_dir, ids, num_classes, thresholds=args.thresholds, array=array,
                                       allow_missing=args.allow_missing, workers=args.workers, class_names=names)
            else:
                result = evaluate(folder, gt_dir, ids, num_classes, ignore_pred=ignore_pred,
                                  allow_missing=args.allow_missing, workers=args.workers, class_names=names)
            result.update(pred_dir=str(folder), gt_dir=str(gt_dir), split=split)
            print(format_table(result, title=f"== {TITLES[name]}: {folder}"))
            print(f"scored {len(ids)} images in {time.perf_counter() - t0:.1f} s\n", file=sys.stderr)
            results[name] = result
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if json_path:
        write_json(json_path, results[jobs[0][0]] if len(results) == 1 else results)
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
