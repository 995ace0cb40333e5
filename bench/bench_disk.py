"""Disk a finished run takes, per stage and per training image (the aim: at most 0.15 MB an image).

    python -m bench.bench_disk [--run demo] [--outputs outputs] [--target 0.15]

Counts every file under outputs/RUN (all stages, checkpoints and logs included) and divides by the
number of training images stage 1 processed (its manifest's "images"). On VOC the checkpoints, a
fixed cost of a few nets, become a small share, so the per-image figure without them is printed
too: it is what scales to a VOC run. Exits 1 when the run is over --target MB an image (all files).
Without --run, measures outputs/demo (`make demo`) if it is finished, and says it skipped otherwise.
Writes bench/results/disk-RUN.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import machine_info, write_result
from wsss.io import MANIFEST, read_json
from wsss.layout import RunLayout

DEFAULT_RUN = "demo"
TARGET_MB = 0.15


def sizes(run: Path) -> dict[str, dict[str, int]]:
    """{top-level folder: {"all": bytes, "checkpoints": bytes}} of a run."""
    out: dict[str, dict[str, int]] = {}
    for path in run.rglob("*"):
        if not path.is_file():
            continue
        top = path.relative_to(run).parts[0]
        entry = out.setdefault(top, {"all": 0, "checkpoints": 0})
        entry["all"] += path.stat().st_size
        if path.suffix == ".pt":
            entry["checkpoints"] += path.stat().st_size
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_disk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help=f"a finished run (default: {DEFAULT_RUN}, skipped if absent)")
    p.add_argument("--outputs", type=Path, default=Path("outputs"))
    p.add_argument("--target", type=float, default=TARGET_MB, help="MB an image, all files")
    args = p.parse_args(argv)
    run = args.outputs / (args.run or DEFAULT_RUN)
    manifest = RunLayout(run).stage1.path / MANIFEST
    if not manifest.is_file():
        if args.run:
            p.error(f"{run}: no finished stage 1 ({manifest} missing)")
        print(f"{run}: no finished run; skipped (run `make demo` first)")
        return 0
    images = read_json(manifest)["outputs"]["images"]
    per_stage = sizes(run)
    total = sum(e["all"] for e in per_stage.values())
    checkpoints = sum(e["checkpoints"] for e in per_stage.values())
    mb = 1e6
    print(f"{run}: {images} training images")
    for name, entry in sorted(per_stage.items()):
        print(f"  {name:<16} {entry['all'] / mb:8.1f} MB  (checkpoints {entry['checkpoints'] / mb:.1f} MB)")
    per_image, without = total / images / mb, (total - checkpoints) / images / mb
    print(f"  all files: {total / mb:.1f} MB = {per_image:.3f} MB an image "
          f"({without:.3f} MB an image without the checkpoints); target {args.target} MB")
    write_result(f"disk-{run.name}", {
        "run": str(run), "images": images, "bytes": total, "checkpoint_bytes": checkpoints,
        "mb_per_image": round(per_image, 4), "mb_per_image_without_checkpoints": round(without, 4),
        "per_stage": per_stage, "target_mb_per_image": args.target, "machine": machine_info()})
    return 0 if per_image <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
