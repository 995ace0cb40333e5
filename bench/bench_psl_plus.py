"""PSL+'s training masks under every --psl-plus-merge rule, from a finished PSL net, before training PSL+.

    python -m bench.bench_psl_plus --run R [--tag T] [--outputs outputs] [--workers N] [--out FILE]

The final net of outputs/R/stage3[-T] (a PSL net) predicts the training images that have a stage-2
pseudo-mask as PSL+ would (`wsss.segtrain.Stage3.predict_train`: the run's --self-train-scales and
flip, restricted to the labels, stage 2's CRF kernels, 255 below --self-train-confidence or where
the CRF disagrees), into a temporary folder; each rule of `wsss.methods.psl.merge_targets` combines
them with the pseudo-masks, and every set of masks is scored as bench_methods scores a net's targets
(mIoU with ignore as background, over labelled pixels, ignored share, object pixels labelled
background). A PSL+ round costs a second training; this says in minutes which rule gives it the
better masks (the figures of docs/results.md, "Stage-3 methods", on the VOC-like data).

Without --run, scores outputs/demo/stage3 if it is finished and says it skipped otherwise. Writes
bench/results/psl-plus-RUN.json (--out).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.bench_methods import score_targets, stage_dir
from bench.common import publish
from wsss import eval as ev
from wsss import io, nets
from wsss.data.voc import VOCDataset
from wsss.layout import CONFIG, RunLayout, item
from wsss.methods.psl import MERGES, merge_folder, stage2_crf
from wsss.predict import PredictOptions, predict_split

DEFAULT_RUN = "demo"


def measure(args) -> dict:
    stage = stage_dir(args.outputs / args.run, args.tag)
    stage2 = RunLayout.of(args.outputs, args.run).stage2
    pseudo = stage2.pseudo
    config = io.read_json(stage / CONFIG)
    train = VOCDataset(config["data"], config["train_split"])
    ids = [i for i in train.ids if item(pseudo, i).is_file()]
    model, checkpoint, has_cls = nets.load_net(stage, config, "cpu")
    if not has_cls:
        raise SystemExit(f"bench_psl_plus: {stage}'s final net is not a PSL net (no classification branch)")
    rows = {"stage-2 pseudo-masks": score_targets(pseudo, train, ids, args.workers)}
    with tempfile.TemporaryDirectory() as tmp:
        options = PredictOptions(scales=config["self_train_scales"], flip=config["self_train_flip"], restrict=True,
                                 crf=True, crf_params=stage2_crf(stage2.path),
                                 ignore_below=config["self_train_confidence"])
        predicted = predict_split(model, train, ids, Path(tmp) / "net", device="cpu", options=options,
                                  workers=args.workers, checkpoint=checkpoint, desc="PSL+ masks")
        for rule in MERGES:
            merged = merge_folder(predicted, pseudo, Path(tmp) / rule, ids, rule)
            rows[f"PSL+ targets, --psl-plus-merge {rule}"] = score_targets(merged, train, ids, args.workers)
    return {"stage": str(stage), "images": len(ids), "rows": rows}


def table(result: dict) -> str:
    lines = ["| masks | mIoU | labelled | ignored % | object pixels labelled background % |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['miou']:.1f} | {r['labelled_miou']:.1f} | {r['ignored']:.1f} | "
              f"{r['object_as_background']:.1f} |" for name, r in result["rows"].items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None)
    p.add_argument("--tag", default="")
    p.add_argument("--outputs", type=Path, default=Path("outputs"))
    p.add_argument("--workers", type=int, default=ev.default_workers())
    p.add_argument("--out", type=Path, default=None, help="default bench/results/psl-plus-RUN.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.run is None:
        default = RunLayout.of(args.outputs, DEFAULT_RUN).stage3().path
        if not (default / io.MANIFEST).is_file():
            print(f"bench_psl_plus: skipped: no --run and no finished {default} "
                  "(make demo)", file=sys.stderr)
            return 0
        args.run = DEFAULT_RUN
    result = measure(args)
    publish(f"psl-plus-{args.run}", result, table(result), ("numpy", "torch", "pydensecrf2"), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
