"""Does the built-in saliency see objects that touch the image border? Each cue combination, measured.

    python -m bench.bench_saliency_border --data data/voclike [--split train] [--images 300]

For every image of a VOC-layout dataset with masks, the built-in saliency (`wsss.saliency.compute_saliency`)
with its two border cues joined by product (the default) and by max. Objects are the connected
components of each class in the mask; one "touches the border" when any of its pixels lies on the
image's outermost row or column. Reported per combination (pixels pooled over the images):

- recall of object pixels, at saliency >= stage 2's foreground threshold, for objects touching the
  border and for the others; precision of the salient pixels;
- the share of object pixels below stage 2's background threshold (what the saliency-first fusion
  labels background with confidence);
- the ceiling of saliency-first masks: every salient pixel given its true class, background below the
  background threshold, the rest ignored, scored the IRN way (ignored counted as background): what no
  seed can beat with that saliency.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from bench.common import publish
from wsss.data.voc import VOCDataset
from wsss.fusion import BG_THRESHOLD, FG_THRESHOLD
from wsss.io import IGNORE
from wsss.metrics import confusion_matrix, scores
from wsss.saliency import COMBINE, compute_saliency


def border_objects(mask: np.ndarray) -> np.ndarray:
    """Pixels of objects (connected components of one class) that touch the image border (bool)."""
    out = np.zeros(mask.shape, bool)
    for c in np.unique(mask):
        if c in (0, IGNORE):
            continue
        parts, _ = ndi.label(mask == c)
        edge = np.unique(np.concatenate([parts[0], parts[-1], parts[:, 0], parts[:, -1]]))
        out |= np.isin(parts, edge[edge > 0])
    return out


def ceiling(mask: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """Saliency-first masks with the true class: salient pixels their class, low saliency background."""
    out = np.full(mask.shape, IGNORE, np.uint8)
    out[saliency < BG_THRESHOLD] = 0
    salient = saliency >= FG_THRESHOLD
    out[salient] = np.where(mask[salient] == IGNORE, 0, mask[salient])
    return np.where(out == IGNORE, 0, out).astype(np.uint8)  # IRN's protocol: ignored counts as background


def measure(dataset: VOCDataset, ids: list[str]) -> dict:
    counts = {c: dict.fromkeys(("border", "border_hit", "inner", "inner_hit", "salient", "salient_obj",
                                "obj_low"), 0) for c in COMBINE}
    conf = dict.fromkeys(COMBINE, 0)
    for id_ in tqdm(ids, desc="saliency", leave=False):
        image, mask = dataset.image(id_), dataset.mask(id_)
        obj = (mask != 0) & (mask != IGNORE)
        edge = border_objects(mask)
        for combine in COMBINE:
            sal = compute_saliency(image, combine)
            hit, k = sal >= FG_THRESHOLD, counts[combine]
            k["border"] += int(edge.sum())
            k["border_hit"] += int((edge & hit).sum())
            k["inner"] += int((obj & ~edge).sum())
            k["inner_hit"] += int((obj & ~edge & hit).sum())
            k["salient"] += int((hit & (mask != IGNORE)).sum())
            k["salient_obj"] += int((hit & obj).sum())
            k["obj_low"] += int((obj & (sal < BG_THRESHOLD)).sum())
            conf[combine] = conf[combine] + confusion_matrix(mask, ceiling(mask, sal), dataset.num_classes)
    out = {}
    for combine, k in counts.items():
        objects = k["border"] + k["inner"]
        out[combine] = {"recall_border": round(k["border_hit"] / max(k["border"], 1), 3),
                        "recall_inner": round(k["inner_hit"] / max(k["inner"], 1), 3),
                        "precision": round(k["salient_obj"] / max(k["salient"], 1), 3),
                        "object_pixels_below_bg": round(k["obj_low"] / max(objects, 1), 3),
                        "border_share": round(k["border"] / max(objects, 1), 3),
                        "ceiling_miou": round(scores(conf[combine])["miou"], 1)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a VOC-layout dataset with masks")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=300)
    a = p.parse_args(argv)
    dataset = VOCDataset(a.data, a.split)
    ids = [i for i in dataset.ids if dataset.has_mask(i)][:a.images]
    result = {"data": str(a.data), "split": a.split, "images": len(ids), "fg_threshold": FG_THRESHOLD,
              "bg_threshold": BG_THRESHOLD, "combine": measure(dataset, ids)}
    lines = [f"{a.data} ({a.split}, {len(ids)} images), salient = saliency >= {FG_THRESHOLD}",
             "| combine | recall, border objects | recall, others | precision | object px < bg threshold | "
             "ceiling mIoU |", "|---|---|---|---|---|---|"]
    for combine, r in result["combine"].items():
        lines.append(f"| {combine} | {r['recall_border']} | {r['recall_inner']} | {r['precision']} | "
                     f"{r['object_pixels_below_bg']} | {r['ceiling_miou']} |")
    lines.append(f"object pixels in objects touching the border: {result['combine']['product']['border_share']}")
    publish(f"bench_saliency_border-{a.data.name}", result, "\n".join(lines))


if __name__ == "__main__":
    main()
