"""Score every stage-2 fusion rule, with and without the dense CRF, on a finished run.

    python -m bench.bench_fusion --run R [--outputs outputs] [--data D] [--workers N]
        [--bg-threshold T] [--fg-threshold T] [--conflict score|ignore] [--no-crf] [--out FILE]

From the run's stage-1 seeds (stage1/regions/ID.npz, or stage1/rw/seeds/ID.npz after --rw) and
stage-2 saliency maps (stage2/saliency/ID.png), the pseudo-masks of every rule of `wsss.fusion.FUSION_RULES` are made as
stage 2 makes them (`wsss.pseudo.pseudo_mask`, with the run's stage-2 CRF settings), into a
temporary folder, and scored by `wsss.eval.evaluate` on the images `python -m wsss.eval --run R
--stage stage2` scores (VOC `train` where the run trained on a split that holds it, else the run's
split), less the labelled images stage 1 left without regions (stage 2 skips them too). Images
without a label get all-background masks, as in stage 2.

Columns: mIoU with ignore counted as background (the IRN/SEAM protocol: the headline), mIoU over the
labelled pixels only and the percentage of valid ground-truth pixels left ignored. The thresholds
and the conflict rule are the run's stage-2 flags unless given, so the row of the run's own rule
reproduces its stage-2 figures. `*` marks the stage-2 default (`wsss.fusion.FUSION_DEFAULT`).

Without --run, scores outputs/demo (`make demo`) if it has a stage 2, and says it skipped otherwise
(so `make bench` runs on a fresh clone). Writes bench/results/fusion-RUN.json (--out).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from bench.common import publish
from wsss import eval as ev
from wsss import io
from wsss.crf import check_crf
from wsss.data.voc import DatasetError, VOCDataset
from wsss.fusion import FG_THRESHOLD, FUSION_DEFAULT, FUSION_RULES
from wsss.layout import CONFIG, RunLayout, Stage2Folder
from wsss.pseudo import (
    Job,
    Settings,
    image_jobs,
    load_regions,
    pseudo_mask,
    settings_of,
    stage1_seeds,
)
from wsss.saliency_maps import read_saliency
from wsss.workers import parallel_map

DEFAULT_RUN = "demo"


def folder_name(rule: str, crf: bool) -> str:
    return f"{rule}+crf" if crf else rule


def masks_of_image(settings: list[Settings], saliency_dir: Path, job: Job) -> str:
    """Write the fused (and, with the CRF, refined) mask of every rule for one image; return its id."""
    out = settings[0].out
    if job.regions is None:  # no label: all background, whatever the rule
        shape = io.read_image(job.image).shape[:2]
        for s in settings:
            for crf in (False, True) if s.crf else (False,):
                io.write_mask(out / folder_name(s.fusion, crf) / f"{job.id}.png", np.zeros(shape, np.uint8))
        return job.id
    image = io.read_image(job.image)
    keys, masks, score = load_regions(job.regions, job.label_ids, image.shape[:2])
    saliency = read_saliency(saliency_dir, job.id)
    if saliency.shape != image.shape[:2]:
        raise DatasetError(f"{saliency_dir / (job.id + '.png')}: saliency {saliency.shape} differs from image "
                           f"size {image.shape[:2]}")
    for s in settings:
        fused, pseudo = pseudo_mask(image, keys, masks, score, saliency, s)
        io.write_mask(out / folder_name(s.fusion, False) / f"{job.id}.png", fused)
        if s.crf:
            io.write_mask(out / folder_name(s.fusion, True) / f"{job.id}.png", pseudo)
    return job.id


def run_config(outputs: Path, run: str) -> dict:
    """The run's stage-2 flags (config.json), checked to be a stage 2 that made its saliency maps."""
    stage2 = RunLayout.of(outputs, run).stage2.path
    path = stage2 / CONFIG
    if not path.is_file():
        raise SystemExit(f"error: {path}: not found (has stage 2 of run '{run}' been run?)")
    config = io.read_json(path)
    saliency = Stage2Folder(stage2).saliency
    if not saliency.is_dir():
        raise SystemExit(f"error: {saliency}: no saliency maps (stage 2 of run '{run}' has not made them)")
    return config


def measure(args) -> dict:
    config = run_config(args.outputs, args.run)
    folders = RunLayout.of(args.outputs, args.run)
    data = args.data or Path(config["data"])
    try:
        dataset = VOCDataset(data, config["train_split"])
        ids, split, why = ev.protocol_ids(data, config["train_split"])
    except (DatasetError, ev.EvalError) as e:
        raise SystemExit(f"error: {e}") from e
    if dataset.mask_dir is None:
        raise SystemExit(f"error: {data}: no ground-truth masks to score against")
    wanted = set(ids)
    dataset.ids = [i for i in dataset.ids if i in wanted]
    seeds = stage1_seeds(folders.stage1.path)  # the seeds the run's stage 2 took (random-walk ones after --rw)
    jobs, unlabelled, no_regions = image_jobs(dataset, seeds)
    if not jobs:
        raise SystemExit(f"error: {seeds}: no seeds file for any image of split '{split}'")
    scored = [j.id for j in jobs]

    run_args = argparse.Namespace(**{"fg_threshold": FG_THRESHOLD, **config})
    for flag in ("bg_threshold", "fg_threshold", "conflict"):
        if getattr(args, flag) is not None:
            setattr(run_args, flag, getattr(args, flag))
    run_args.crf = args.crf
    if args.crf:
        check_crf("bench_fusion", "--no-crf")
    names = ev.read_class_names(data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="wsss-fusion-") as tmp:
        base = settings_of(run_args, Path(tmp), dataset.num_classes)
        settings = [dataclasses.replace(base, fusion=rule) for rule in FUSION_RULES]
        work = partial(masks_of_image, settings, folders.stage2.saliency)
        for job, _, error in parallel_map(work, jobs, args.workers, "fusion rules"):
            if error is not None:
                raise SystemExit(f"error: {job.id}: {error}")
        for rule in FUSION_RULES:
            for crf in (False, True) if args.crf else (False,):
                result = ev.evaluate(Path(tmp) / folder_name(rule, crf), dataset.mask_dir, scored,
                                     dataset.num_classes, ignore_pred=True, workers=args.workers, class_names=names)
                rows.append({"rule": rule, "crf": crf, "miou": round(result["miou"], 2),
                             "miou_labelled": round(result["labelled"]["miou"], 2),
                             "ignored_percent": round(result["ignored"], 2)})
    return {"run": args.run, "data": str(data), "split": split, "images": len(scored), "why": why,
            "unlabelled_all_background": len(unlabelled), "skipped_no_regions": len(no_regions),
            "run_fusion": config.get("fusion"), "default_fusion": FUSION_DEFAULT,
            "bg_threshold": base.bg_threshold, "fg_threshold": base.fg_threshold, "conflict": base.conflict,
            "crf_settings": {"mode": base.crf_mode, "gt_prob": base.gt_prob, "confidence": base.confidence,
                             "soft": base.soft, **base.crf_params} if args.crf else None,
            "rows": rows}


def table(result: dict) -> str:
    lines = [f"fusion rules on run '{result['run']}': {result['images']} images, {result['why']}",
             f"  --bg-threshold {result['bg_threshold']} --fg-threshold {result['fg_threshold']} "
             f"--conflict {result['conflict']}; * = the stage-2 default",
             f"{'rule':17s} {'CRF':4s} {'mIoU (ignore = bg)':>19s} {'mIoU labelled':>14s} {'ignored %':>10s}"]
    for r in result["rows"]:
        mark = "*" if r["rule"] == result["default_fusion"] else " "
        lines.append(f"{r['rule'] + mark:17s} {'yes' if r['crf'] else 'no':4s} {r['miou']:19.2f} "
                     f"{r['miou_labelled']:14.2f} {r['ignored_percent']:10.2f}")
    if result["skipped_no_regions"]:
        lines.append(f"({result['skipped_no_regions']} labelled images have no stage-1 regions: left out, as in "
                     f"stage 2)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help=f"a run with stages 1 and 2 done (default: {DEFAULT_RUN}, skipped if absent)")
    p.add_argument("--outputs", type=Path, default=Path("outputs"))
    p.add_argument("--data", type=Path, help="dataset root (default: the one the run's stage 2 read)")
    p.add_argument("--bg-threshold", type=float, help="default: the run's stage-2 value")
    p.add_argument("--fg-threshold", type=float, help="default: the run's stage-2 value (or stage 2's default)")
    p.add_argument("--conflict", choices=["score", "ignore"], help="default: the run's stage-2 value")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True,
                   help="also each rule after the run's stage-2 CRF (--no-crf: the fused masks only)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, help="JSON result (default: bench/results/fusion-RUN.json)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.run is None:
        default = RunLayout.of(args.outputs, DEFAULT_RUN).stage2.path
        if not (default / CONFIG).is_file():
            print(f"bench_fusion: skipped: no --run and no {default} (make demo)",
                  file=sys.stderr)
            return 0
        args.run = DEFAULT_RUN
    result = measure(args)
    publish(f"fusion-{args.run}", result, table(result), ("numpy", "pydensecrf2"), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
