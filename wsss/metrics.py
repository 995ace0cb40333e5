"""The segmentation metric (VOC protocol) of a confusion matrix: the one every score of the pipeline
comes from (wsss.eval, stage 2's summary, stage 3's validation during training, the report, the
benchmarks), so that they agree to the pixel.

One confusion matrix summed over all images (rows = ground truth, columns = prediction); ground-truth
255 is ignored; IoU_c = TP / (TP + FP + FN); mIoU is the mean over all classes including background,
a class with neither ground truth nor prediction (0/0) left out (wsss.eval's docstring says why).
Each image pair becomes one np.bincount over `gt * 256 + pred` of the raw uint8 values, which gives
the matrix, the ignore counts and the out-of-range checks at once. numpy only.
"""
from __future__ import annotations

import numpy as np

from wsss.errors import WsssError
from wsss.labels import IGNORE


class EvalError(WsssError, ValueError):
    """Bad input to the evaluation; the message names the file and the problem."""


# ---------------------------------------------------------------- confusion matrix and scores

def _as_labels(values, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values
    if not np.issubdtype(values.dtype, np.integer):
        raise EvalError(f"{what} must hold integer label ids, got dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise EvalError(f"{what} has label ids outside 0..255")
    return values.astype(np.uint8)


def joint_histogram(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(256, 256) int64 counts of (gt value, pred value) pairs of two uint8 label maps."""
    index = gt.astype(np.uint16) << 8
    index |= pred
    return np.bincount(index.ravel(), minlength=256 * 256).reshape(256, 256)


def histogram_problem(hist: np.ndarray, num_classes: int, ignore_pred: bool) -> tuple[str, str] | None:
    """("gt" or "pred", message) for the first bad value in a joint histogram, None if all fine."""
    bad_gt = np.flatnonzero(hist[num_classes:IGNORE].any(axis=1)) + num_classes
    if bad_gt.size:
        return "gt", f"label ids {bad_gt.tolist()} outside 0..{num_classes - 1} and 255"
    bad_pred = np.flatnonzero(hist[:, num_classes:IGNORE].any(axis=0)) + num_classes
    if bad_pred.size:
        return "pred", f"prediction has label ids {bad_pred.tolist()} outside 0..{num_classes - 1}"
    unlabelled = hist[:num_classes, IGNORE].sum()
    if unlabelled and not ignore_pred:
        return "pred", (f"prediction leaves {unlabelled} pixels of valid ground truth unlabelled (255); "
                        "score pseudo-masks with --ignore-pred (ignore_pred=True)")
    return None


def check_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= IGNORE:
        raise EvalError(f"num_classes must lie in 2..255 (uint8 masks, 255 = ignore), got {num_classes}")


def confusion_matrix(gt, pred, num_classes: int, ignore_pred: bool = False) -> np.ndarray:
    """(C, C) int64 matrix, rows = ground truth, columns = prediction, over pixels whose ground
    truth is not 255 (and, with ignore_pred, whose prediction is not 255)."""
    check_classes(num_classes)
    gt, pred = _as_labels(gt, "ground truth"), _as_labels(pred, "prediction")
    if gt.shape != pred.shape:
        raise EvalError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    hist = joint_histogram(gt, pred)
    problem = histogram_problem(hist, num_classes, ignore_pred)
    if problem:
        raise EvalError(problem[1])
    return hist[:num_classes, :num_classes].copy()


def percent(x) -> float | None:
    return None if np.isnan(x) else float(100 * x)


def scores(conf: np.ndarray) -> dict:
    """mIoU, pixel accuracy, mean class accuracy, frequency-weighted IoU and per-class IoU and
    accuracy (percent; None where 0/0) of a confusion matrix (rows = ground truth)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    gt_count, pred_count, total = conf.sum(axis=1), conf.sum(axis=0), conf.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt_count + pred_count - tp)
        class_acc = tp / gt_count
        pixel_acc = tp.sum() / total
    scored = ~np.isnan(iou)
    has_gt = gt_count > 0
    return {
        "miou": percent(iou[scored].mean() if scored.any() else np.nan),
        "pixel_acc": percent(pixel_acc),
        "mean_class_acc": percent(class_acc[has_gt].mean() if has_gt.any() else np.nan),
        "fwiou": percent((gt_count[has_gt] * iou[has_gt]).sum() / total if total else np.nan),
        "iou": [percent(x) for x in iou],
        "class_acc": [percent(x) for x in class_acc],
        "pixels": int(total),
    }


class ConfusionMatrix:
    """A (C, C) confusion matrix summed over images as they come (`add`), and its `scores()`."""

    def __init__(self, num_classes: int, ignore_pred: bool = False):
        check_classes(num_classes)
        self.num_classes, self.ignore_pred = num_classes, ignore_pred
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def add(self, gt, pred) -> ConfusionMatrix:
        """Count one image pair (confusion_matrix's checks and rules)."""
        self.matrix += confusion_matrix(gt, pred, self.num_classes, self.ignore_pred)
        return self

    def scores(self) -> dict:
        return scores(self.matrix)
