"""Scoring folders of masks and CAM seeds against ground-truth folders (the VOC protocol of
wsss.metrics), many images at once; the library behind `python -m wsss.eval` and stage 3's own
val scores. numpy and PIL only (no torch).

Why it is fast: each image pair becomes one np.bincount (wsss.metrics); images are read by a thread
pool (PNG decoding releases the GIL) and each worker sums its own chunk. The CAM sweep and the
pseudo-mask protocol (`ignore_pred`) are described in wsss.eval's docstring.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from wsss.io import read_mask
from wsss.labels import IGNORE
from wsss.metrics import EvalError, check_classes, histogram_problem, joint_histogram, percent, scores
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
