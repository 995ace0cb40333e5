"""Per-image scores of a prediction folder against the ground truth: where a net fails, image by image.

`wsss.eval` sums one confusion matrix over a split (the papers' mIoU); a low figure there does
not say which photos went wrong. Here each image gets its own confusion matrix (the same
`wsss.metrics.confusion_matrix`, so 255 in the ground truth is not counted) and its mIoU over the
classes present in its ground truth or its prediction; the report lists the worst ones and the
summed matrix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss import io
from wsss.metrics import confusion_matrix


def image_score(conf: np.ndarray) -> dict:
    """mIoU and pixel accuracy (percent) of one image's confusion matrix (rows ground truth)."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    total = conf.sum()
    return {"miou": round(float(np.mean(tp[present] / union[present]) * 100), 2) if present.any() else None,
            "pixel_acc": round(float(tp.sum() / total * 100), 2) if total else None}


def score_images(pred_dir, dataset, ids=None) -> tuple[list[dict], np.ndarray]:
    """([{id, miou, pixel_acc, gt, pred}] worst first, summed confusion matrix) over the `ids` (default:
    the split's) that have both a ground-truth mask and a prediction; `gt`, `pred` name the classes shown."""
    pred_dir = Path(pred_dir)
    names, n = dataset.class_names, dataset.num_classes
    total = np.zeros((n, n), np.int64)
    rows = []
    for id_ in tqdm(dataset.ids if ids is None else ids, desc="per-image scores", leave=False):
        path = pred_dir / f"{id_}.png"
        if not (dataset.has_mask(id_) and path.is_file()):
            continue
        gt, pred = dataset.mask(id_), io.read_mask(path)
        conf = confusion_matrix(gt, pred, n)
        total += conf
        shown = [names[c] for c in range(n) if conf[c].sum()], [names[c] for c in range(n) if conf[:, c].sum()]
        rows.append({"id": id_, **image_score(conf), "gt": shown[0], "pred": shown[1]})
    rows.sort(key=lambda r: (r["miou"] is None, r["miou"] if r["miou"] is not None else 0, r["id"]))
    return rows, total
