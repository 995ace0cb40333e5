"""The erasing union against plain CAMs of the same run's classifiers: does erasing beat
a tuned CAM threshold, or only more training?

    python -m bench.bench_cam_baseline --run R [--steps 1 3] [--outputs outputs] [--limit N]

With `--ae-init previous` (the CPU default) step k's classifier starts from step k-1's, so the last
step's classifier has had every step's epochs. For each given step k, its classifier's CAMs of the
*unerased* training images (the run's CAM scales, flip and size limit) go to a temporary folder and
get the background-threshold sweep of `python -m wsss.eval --cam`; beside them, the same sweep of
the run's union score (stage1/regions). The union beats "just train longer" only if it beats the
last step's plain CAM at its best threshold. Scores: the run's split, ignore counted as background.
Writes bench/results/cam-baseline-RUN.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import machine_info, write_result
from wsss import erasing, layout
from wsss import eval as ev
from wsss.data.voc import VOCDataset
from wsss.io import MANIFEST, load_checkpoint, read_manifest
from wsss.layout import RunLayout
from wsss.models.classifier import build_classifier


def plain_cams(config: dict, dataset: VOCDataset, ids: list[str], checkpoint: Path, out: Path) -> None:
    model = build_classifier(config["backbone"], dataset.num_classes - 1, output_stride=config["output_stride"],
                             weights=None)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    model.eval()
    job = erasing.CamJob(dataset, frozenset(ids), out, (), tuple(config["cam_scales"]), config["cam_flip"],
                         config["ae_threshold"], config["max_side"])
    erasing.write_cams(model, job, ids, torch.device("cpu"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_cam_baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--outputs", type=Path, default=Path("outputs"))
    p.add_argument("--steps", type=int, nargs="+", help="default: the first and the last kept step")
    p.add_argument("--limit", type=int, help="score the first N labelled images only")
    args = p.parse_args(argv)
    folder = RunLayout.of(args.outputs, args.run).stage1
    stage1 = folder.path
    if not (stage1 / MANIFEST).is_file():
        p.error(f"{stage1}: stage 1 is not finished")
    config = read_manifest(stage1)["config"]
    dataset = VOCDataset(config["data"], config["train_split"])
    ids = [i for i in dataset.ids if dataset.labels(i).any() and dataset.has_mask(i)][:args.limit]
    kept = sorted(layout.step_number(d.name) for d in stage1.glob(layout.STEP_GLOB) if (d / layout.CAMS).is_dir())
    steps = args.steps or sorted({kept[0], kept[-1]})
    result = {"run": args.run, "images": len(ids), "steps": {}, "machine": machine_info(("torch",))}
    names = dataset.class_names
    for k in steps:
        with tempfile.TemporaryDirectory() as tmp:
            plain_cams(config, dataset, ids, folder.checkpoint(k), Path(tmp))
            r = ev.evaluate_cams(Path(tmp) / layout.CAMS, dataset.mask_dir, ids, dataset.num_classes, class_names=names)
        result["steps"][k] = {"best_threshold": r["best_threshold"], "miou": r["miou"]}
        print(f"plain CAM of step {k}'s classifier: best threshold {r['best_threshold']:.2f}: mIoU {r['miou']:.2f}")
    r = ev.evaluate_cams(folder.regions, dataset.mask_dir, ids, dataset.num_classes, array="score",
                         class_names=names)
    at = {round(s["threshold"], 2): s["miou"] for s in r["sweep"]}
    seed = config.get("seed_threshold", config["ae_threshold"])  # runs before --seed-threshold used the latter
    result["union"] = {"best_threshold": r["best_threshold"], "miou": r["miou"], "seed_threshold": seed,
                       "at_seed_threshold": at.get(round(seed, 2))}
    print(f"union score of steps {kept}: best threshold {r['best_threshold']:.2f}: mIoU {r['miou']:.2f}; "
          f"at the run's seed threshold {seed}: {result['union']['at_seed_threshold']:.2f}")
    write_result(f"cam-baseline-{args.run}", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
