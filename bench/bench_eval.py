"""Time `wsss.eval` on the 1,449 real VOC 2012 val masks (ground truth scored against itself)
against a straightforward per-image numpy loop, in one run.

    python -m bench.bench_eval [--voc VOC_ROOT] [--repeat 3] [--workers N]

The naive loop is the usual first version: read each pair with PIL, then for every class build
boolean masks and count TP / FP / FN. Both read the same PNGs; the files are read once beforehand so
that neither pays for a cold disk; each is timed --repeat times and the best run counts (the
machine may be shared); ours also with one thread, to separate the gain of the vectorised
matrix from that of the thread pool. Also times the whole command `python -m wsss.eval` (interpreter start,
imports, table). Checks that both give the same TP / FP / FN, prints the figures and writes
bench/results/eval.json with the machine's description.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from bench.common import RESULTS, machine_info, write_result
from wsss import eval as ev

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 21


def naive_counts(pred_dir: Path, gt_dir: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN per class, one image and one class at a time with boolean masks."""
    tp, fp, fn = (np.zeros(NUM_CLASSES, np.int64) for _ in range(3))
    for id_ in tqdm(ids, desc="naive loop", leave=False, disable=None):
        gt = np.array(Image.open(gt_dir / f"{id_}.png"))
        pred = np.array(Image.open(pred_dir / f"{id_}.png"))
        valid = gt != 255
        for c in range(NUM_CLASSES):
            is_gt = (gt == c) & valid
            is_pred = (pred == c) & valid
            tp[c] += np.sum(is_gt & is_pred)
            fp[c] += np.sum(~is_gt & is_pred)
            fn[c] += np.sum(is_gt & ~is_pred)
    return tp, fp, fn


def best_of(repeat: int, fn):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc", type=Path, default=REPO.parent / "shared" / "voc12", help="VOC 2012 root")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=ev.default_workers(), help="reader threads of ours")
    p.add_argument("--out", type=Path, default=RESULTS / "eval.json")
    args = p.parse_args(argv)

    gt_dir = args.voc / "SegmentationClassAug"
    val_list = args.voc / "ImageSets" / "Segmentation" / "val.txt"
    ids = ev.read_list(val_list)
    for id_ in ids:  # warm the page cache for both contenders
        (gt_dir / f"{id_}.png").read_bytes()

    load_before = os.getloadavg()
    ours_s, ours_runs, result = best_of(
        args.repeat, lambda: ev.evaluate(gt_dir, gt_dir, ids, NUM_CLASSES, workers=args.workers))
    one_s, one_runs, _ = best_of(args.repeat, lambda: ev.evaluate(gt_dir, gt_dir, ids, NUM_CLASSES, workers=1))
    naive_s, naive_runs, (tp, fp, fn) = best_of(args.repeat, lambda: naive_counts(gt_dir, gt_dir, ids))
    command = [sys.executable, "-m", "wsss.eval", "--pred", str(gt_dir), "--gt", str(gt_dir),
               "--list", str(val_list), "--workers", str(args.workers)]
    cli_s, cli_runs, _ = best_of(
        args.repeat, lambda: subprocess.run(command, cwd=REPO, check=True, capture_output=True))

    conf = np.asarray(result["confusion"])
    diag = np.diag(conf)
    same = (np.array_equal(diag, tp) and np.array_equal(conf.sum(0) - diag, fp)
            and np.array_equal(conf.sum(1) - diag, fn))
    if not same:
        print("error: the two implementations disagree on TP / FP / FN", file=sys.stderr)
        return 1

    figures = {
        "images": len(ids),
        "pixels_scored": result["pixels"],
        "miou": result["miou"],
        "ours_s": round(ours_s, 3),
        "ours_1_thread_s": round(one_s, 3),
        "naive_s": round(naive_s, 3),
        "speedup": round(naive_s / ours_s, 1),
        "cli_s": round(cli_s, 3),
        "runs_s": {"ours": [round(t, 3) for t in ours_runs], "ours_1_thread": [round(t, 3) for t in one_runs],
                   "naive": [round(t, 3) for t in naive_runs],
                   "cli": [round(t, 3) for t in cli_runs]},
        "workers": args.workers,
        "same_counts": same,
        "machine": machine_info(("numpy", "pillow"), load_average_before=[round(x, 2) for x in load_before]),
    }
    print(f"{len(ids)} val masks, GT against GT (mIoU {result['miou']:.1f}), best of {args.repeat}:")
    print(f"  wsss.eval.evaluate, {args.workers} threads   {ours_s:7.2f} s")
    print(f"  wsss.eval.evaluate, 1 thread    {one_s:7.2f} s")
    print(f"  naive per-image loop          {naive_s:7.2f} s   ({naive_s / ours_s:.1f}x ours)")
    print(f"  python -m wsss.eval, whole command {cli_s:.2f} s")
    write_result("eval", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
