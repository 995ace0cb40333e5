"""Per-image cost of the CPU pools: stage 2's saliency, stage 2 end to end, and a prediction pass with
the dense CRF, each with 1 and with 2 workers.

    python -m bench.bench_pools --data data/synthetic --stage1 outputs/demo/stage1 [--images 48]

- saliency: `wsss.saliency_maps.ensure_saliency` (built-in saliency) of the first N training images;
- stage 2: `stages/stage2.py --limit N` in a fresh run whose stage 1 is a copy of `--stage1` (fusion,
  CRF, writing; its own saliency pass included), as a user runs it;
- predict --crf: `wsss.predict.predict_split` with `crf=True` over N val images, a random-init
  DeepLab-LargeFOV efficientnet-lite0 net (the times do not depend on the weights), on the CPU.

Seconds per image (wall) for each; the library under test is whichever `wsss` is first on the path,
so the same script times an older checkout (`PYTHONPATH=OLD python -c ...`). Writes
bench/results/bench_pools.json with the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import publish

WORKERS = (1, 2)


def time_saliency(data: Path, images: int, workers: int, tmp: Path) -> float:
    from wsss.data.voc import VOCDataset
    from wsss.saliency_maps import ensure_saliency

    dataset = VOCDataset(data, "train")
    ids = dataset.ids[:images]
    out = tmp / f"saliency-{workers}"
    t0 = time.perf_counter()
    ensure_saliency(dataset, ids, out, "builtin", workers)
    return (time.perf_counter() - t0) / len(ids)


def time_stage2(data: Path, stage1: Path, images: int, workers: int, tmp: Path) -> float:
    import wsss

    outputs = tmp / f"outputs-{workers}"
    shutil.copytree(stage1, outputs / "bench" / "stage1")
    root = Path(wsss.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(root / "stages" / "stage2.py"), "--data", str(data), "--outputs", str(outputs),
                    "--run", "bench", "--limit", str(images), "--workers", str(workers), "--device", "cpu"],
                   env=env, check=True, capture_output=True)
    return (time.perf_counter() - t0) / images


def time_predict_crf(data: Path, images: int, workers: int, tmp: Path) -> float:
    import torch

    from wsss.data.voc import VOCDataset
    from wsss.models.segnet import build_segnet
    from wsss.predict import PredictOptions, predict_split

    torch.manual_seed(0)
    val = VOCDataset(data, "val")
    model = build_segnet("efficientnet-lite0", val.num_classes, weights=None).eval()
    t0 = time.perf_counter()
    predict_split(model, val, val.ids[:images], tmp / f"pred-{workers}", device=torch.device("cpu"),
                  options=PredictOptions(crf=True), workers=workers)
    return (time.perf_counter() - t0) / images


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/synthetic"))
    p.add_argument("--stage1", type=Path, default=Path("outputs/demo/stage1"), help="a finished stage 1 to copy")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--label", default="", help="a name for the library under test, e.g. a commit")
    a = p.parse_args(argv)
    import warnings

    import wsss

    warnings.simplefilter("ignore")
    result = {"library": str(Path(wsss.__file__).resolve().parent), "label": a.label, "images": a.images,
              "seconds_per_image": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for workers in WORKERS:
            result["seconds_per_image"][str(workers)] = {
                "saliency": round(time_saliency(a.data, a.images, workers, tmp), 4),
                "stage2": round(time_stage2(a.data.resolve(), a.stage1.resolve(), a.images, workers, tmp), 4),
                "predict_crf": round(time_predict_crf(a.data, a.images, workers, tmp), 4)}
    lines = [f"{a.label or result['library']}: seconds per image ({a.images} images)",
             "| workers | saliency | stage 2 (with its saliency) | predict --crf |", "|---|---|---|---|"]
    for w, t in result["seconds_per_image"].items():
        lines.append(f"| {w} | {t['saliency']} | {t['stage2']} | {t['predict_crf']} |")
    publish(f"bench_pools{'-' + a.label if a.label else ''}", result, "\n".join(lines), packages=("torch", "numpy"))


if __name__ == "__main__":
    main()
