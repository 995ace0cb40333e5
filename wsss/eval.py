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
erasing steps), and on the random-walk seeds of a run with --rw (rw/seeds/ID.npz, each walked class
divided by its maximum).

Which images (--run stage1/stage2): the field reports seeds and pseudo-masks on VOC `train`
(1,464 images), while a run trains on train_aug (10,582, which holds train). When the dataset has
ImageSets/Segmentation/train.txt and the run trained on another split, the images of `train` that
the run has artifacts for (those in its split) are scored; otherwise the run's split. The output
and each result's "split" say which.

The metric is wsss.metrics', the scoring of folders wsss.scoring's (numpy and PIL only, no torch,
so that this command starts fast); this module is the command line.

JSON (`--json`, default outputs/NAME/STAGE/eval.json with --run): the result of one evaluation,
{"miou", "pixel_acc", "mean_class_acc", "fwiou", "iou": [per class, null = NaN], "class_acc",
"class_names", "confusion", "num_images", "missing", ...}; with several evaluations (--run
stage1/stage2) a dict of them by name.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from wsss.io import read_manifest, write_json
from wsss.layout import (
    CONFIG,
    PRED,
    PRED_DEFAULT,
    STAGE2,
    STAGE3,
    STAGES,
    RunLayout,
    Stage1Folder,
    Stage2Folder,
    Stage3Folder,
    eval_file,
)
from wsss.metrics import EvalError, confusion_matrix, scores  # noqa: F401 - part of wsss.eval's API
from wsss.scoring import (  # noqa: F401 - part of wsss.eval's API
    MASK_DIRS,
    THRESHOLDS,
    VOC_CLASSES,
    default_class_names,
    default_workers,
    evaluate,
    evaluate_cams,
    format_table,
    read_class_names,
)

# ---------------------------------------------------------------- command line



def build_parser() -> argparse.ArgumentParser:
    from wsss import preset
    from wsss.run import Parser

    p = Parser(prog="python -m wsss.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.preset_section = "eval"
    p.add_argument("--preset", metavar="NAME|FILE",
                   help=f"the eval section of a preset as defaults: {preset.describe()}")
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
    """The prediction folder of a stage-3 run to score: that of the default test-time flags when there
    (`pred-nogate`, or `pred` of a run made before the gate's default was off), else the one its
    manifest lists last (e.g. `pred-crf-nogate` of a preset with test-time CRF)."""
    for name in (PRED_DEFAULT, PRED):
        if Stage3Folder(stage_dir).pred(name).is_dir():
            return name
    try:
        listed = list(read_manifest(stage_dir)["outputs"]["predictions"])
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
    jobs = [("step1_regions", "pred", stage1.step_regions(1), True, ""),
            ("union_regions", "pred", stage1.regions, True, ""),
            ("cam_sweep", "cam", stage1.cams(1), True, "cam"),
            ("union_sweep", "cam", stage1.regions, True, "score")]
    if stage1.rw_seeds.is_dir():  # a run with --rw
        jobs += [("rw_seeds", "pred", stage1.rw_seeds, True, ""), ("rw_sweep", "cam", stage1.rw_seeds, True, "score")]
    return data, split, jobs, json_path, ids, why


TITLES = {"pred": "predictions", "pseudo": "pseudo-masks (after CRF)", "fused": "fused pseudo-masks (before CRF)",
          "step1_regions": "mined regions, step 1 (plain CAM)", "union_regions": "mined regions, union of steps",
          "cam_sweep": "CAM seeds, step 1", "union_sweep": "CAM seeds, max over the erasing steps",
          "rw_seeds": "random-walk seeds (--rw)", "rw_sweep": "random-walk seeds, background threshold sweep"}


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
