"""Input shapes and GPU calls of one inference pass over VOC's image sizes, unpadded and bucketed.

`python -m bench.bench_shapes` counts, from the size table of VOC 2012 (`bench/data/voc12_sizes.csv`,
the sizes of its 12,031 masks), what one pass of CAMs (4 scales + flip) or predictions over
train_aug feeds the net: distinct input shapes per scale and forward calls, first as consecutive
same-size images batch (the list's order), then padded to `wsss.shapes.SIZE_DIVISOR["cuda"]` and
batched by bucket, with the extra pixels padding costs.

With `--run R` it also measures what padding changes in a trained classifier's CAMs: the step-1
classifier of run R computes the CAMs of `--images` training images unpadded and padded to the GPU's
divisor (both on this CPU), and the bench reports the mean and 99th-percentile absolute difference
and the mIoU of the mined regions (at the run's erasing threshold) against the ground truth, both ways.
"""
from __future__ import annotations

import argparse
import csv
import math
from collections import Counter
from pathlib import Path

from bench.common import publish
from wsss.shapes import SIZE_DIVISOR, bucket, padded_size, scaled_size, view_divisor

TABLE = Path(__file__).resolve().parent / "data" / "voc12_sizes.csv"
CAM_SCALES = (0.5, 1.0, 1.5, 2.0)
BATCH = 8  # images per forward on a GPU (wsss.erasing.CAM_BATCH, wsss.predict.PREDICT_BATCH)


def read_table(split: str) -> Counter:
    with open(TABLE, newline="") as f:
        return Counter({(int(r["height"]), int(r["width"])): int(r[split]) for r in csv.DictReader(f) if int(r[split])})


def consecutive_runs(sizes: Counter, order_runs: float) -> int:
    """Forward calls per scale when only consecutive same-size images batch: the number of runs in
    list order (mean run length `order_runs`), each split into batches of BATCH."""
    return math.ceil(sum(sizes.values()) / min(order_runs, BATCH))


def shapes_table(split: str, divisor: int, run_length: float) -> dict:
    sizes = read_table(split)
    total = sum(sizes.values())
    per_scale = {}
    for scale in CAM_SCALES:
        unpadded = {scaled_size(s, scale) for s in sizes}
        padded = {padded_size(scaled_size(s, scale), view_divisor(divisor, scale)) for s in sizes}
        per_scale[str(scale)] = {"unpadded": len(unpadded), "padded": len(padded)}
    buckets = Counter()
    for size, n in sizes.items():
        buckets[bucket(size, CAM_SCALES, divisor)] += n
    pixels = sum(n * math.prod(scaled_size(s, sc)) for s, n in sizes.items() for sc in CAM_SCALES)
    padded_pixels = sum(n * math.prod(p) for s, n in sizes.items() for p in bucket(s, CAM_SCALES, divisor))
    return {"images": total, "sizes": len(sizes), "shapes_per_scale": per_scale, "buckets": len(buckets),
            "calls_per_scale_unpadded": consecutive_runs(sizes, run_length),
            "calls_per_scale_bucketed": sum(math.ceil(n / BATCH) for n in buckets.values()),
            "extra_pixels": round(padded_pixels / pixels - 1, 4)}


def list_run_length(root: Path, split: str) -> float | None:
    """Mean length of runs of consecutive same-size images in a VOC list (needs the masks)."""
    from PIL import Image

    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        return None
    sizes = []
    for id_ in list_file.read_text().split():
        with Image.open(root / "SegmentationClassAug" / f"{id_}.png") as im:
            sizes.append(im.size)
    runs = 1 + sum(a != b for a, b in zip(sizes, sizes[1:], strict=False))
    return len(sizes) / runs


def padding_effect(run: Path, count: int) -> dict:
    """Padded against unpadded CAMs of run's step-1 classifier, and the mIoU of their mined regions."""
    import numpy as np
    import torch

    from wsss import io
    from wsss.cam import multiscale_cams_batch
    from wsss.data.voc import VOCDataset
    from wsss.layout import CONFIG, RunLayout
    from wsss.metrics import confusion_matrix, scores
    from wsss.mining import mine
    from wsss.models.classifier import build_classifier
    from wsss.run import spread

    torch.set_num_threads(2)
    config = io.read_json(RunLayout(run).stage1.path / CONFIG)
    data = VOCDataset(config["data"], config["train_split"])
    model = build_classifier(config["backbone"], data.num_classes - 1, output_stride=config["output_stride"],
                             weights=None)
    model.load_state_dict({k: v.float() for k, v in io.load_checkpoint(RunLayout(run).stage1.checkpoint(1),
                                                                      map_location="cpu")["model"].items()})
    ids = spread([i for i in data.ids if len(data.label_ids(i))], count)
    scales, divisor = tuple(config["cam_scales"]), SIZE_DIVISOR["cuda"]
    diffs, matrices = [], {1: 0, divisor: 0}
    for id_ in ids:
        image, keys, gt = data.image(id_), data.label_ids(id_), data.mask(id_)
        cams = {d: multiscale_cams_batch(model, [image], [keys], scales, config["cam_flip"], "cpu", divisor=d)[0]
                for d in (1, divisor)}
        diffs.append(np.abs(cams[1] - cams[divisor]).ravel())
        for d, cam in cams.items():
            matrices[d] = matrices[d] + confusion_matrix(gt, mine(cam, keys, config["ae_threshold"])[1],
                                                         data.num_classes)
    diff = np.concatenate(diffs)
    return {"images": len(ids), "divisor": divisor, "mean_abs_diff": round(float(diff.mean()), 4),
            "p99_abs_diff": round(float(np.percentile(diff, 99)), 4),
            "regions_miou_unpadded": round(scores(matrices[1])["miou"], 2),
            "regions_miou_padded": round(scores(matrices[divisor])["miou"], 2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc", type=Path, default=None,
                   help="a VOC 2012 root with SegmentationClassAug, to measure the list's same-size runs")
    p.add_argument("--run-length", type=float, default=1.27,
                   help="mean run of consecutive same-size images in a list's order, without --voc (train_aug's)")
    p.add_argument("--run", type=Path, default=None, help="a finished stage-1 run folder (outputs/RUN)")
    p.add_argument("--images", type=int, default=60)
    a = p.parse_args(argv)
    runs = {split: (list_run_length(a.voc, split) if a.voc else None) or a.run_length for split in ("train_aug", "val")}
    result = {"run_length": {k: round(v, 3) for k, v in runs.items()},
              **{split: shapes_table(split, SIZE_DIVISOR["cuda"], runs[split]) for split in ("train_aug", "val")}}
    lines = [f"VOC 2012 sizes, CAM scales {CAM_SCALES} + flip, divisor {SIZE_DIVISOR['cuda']}, batch {BATCH}",
             "| split | sizes | shapes per scale (unpadded -> padded) | buckets | forwards per scale "
             "(consecutive -> bucketed) | extra pixels |", "|---|---|---|---|---|---|"]
    for split in ("train_aug", "val"):
        t = result[split]
        per = ", ".join(f"{s}: {v['unpadded']} -> {v['padded']}" for s, v in t["shapes_per_scale"].items())
        lines.append(f"| {split} | {t['sizes']} | {per} | {t['buckets']} | {t['calls_per_scale_unpadded']} -> "
                     f"{t['calls_per_scale_bucketed']} | {100 * t['extra_pixels']:.1f} % |")
    if a.run is not None:
        result["padding_effect"] = e = padding_effect(a.run, a.images)
        lines.append(f"\npadding effect ({a.run}, step-1 classifier, {e['images']} images, divisor {e['divisor']}): "
                     f"CAM |diff| mean {e['mean_abs_diff']}, p99 {e['p99_abs_diff']}; mined regions mIoU "
                     f"{e['regions_miou_unpadded']} unpadded, {e['regions_miou_padded']} padded")
    publish("bench_shapes", result, "\n".join(lines))


if __name__ == "__main__":
    main()
