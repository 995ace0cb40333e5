"""Every step of every stage-3 method, over seeds: the masks each net trains on and its val mIoU.

    python -m bench.bench_methods --run R [--outputs outputs] [--stc TAG ...] [--psl-plus TAG ...]
        [--psl-off TAG ...] [--gt TAG ...] [--workers N] [--out FILE]

Each TAG names a finished stage-3 variant of run R (outputs/R/stage3-TAG; '' for outputs/R/stage3),
one per seed: `--stc` runs of `--method stc`, `--psl-plus` runs of `--psl-plus` (they give the PSL
row too: their `psl` net is the PSL net of that seed), `--psl-off` runs of `--psl-online off`,
`--gt` runs of `--method gt`. The seed of each is read from its config.json.

A method's step is meant to improve on the one before because the masks it trains on are better,
so each row has two figures:
* targets: the masks the net trains on, scored against the training ground truth over the images
  it trains on, as pseudo-masks are (ignore counted as background: the headline; over labelled
  pixels; the ignored share) and the share of the objects' pixels they label background (what
  teaches a net to under-segment, which the mIoU alone hides: ignore and background cost the
  same there, but a net learns nothing from an ignored pixel). The I-DCNN trains on soft saliency
  targets (`wsss.fusion.stc_soft_target`): their argmax is scored. The gt bound's targets are the
  ground truth.
* val: the net's val predictions (stage 3's test-time defaults: one scale, no flip, no CRF). The
  nets before a method's last (STC's I and E, PSL before PSL+) are predicted here with
  `python -m wsss.predict --net NET` into their stage folder (pred-stc-i, ...) when not yet there.

Prints the table (mean and sample standard deviation over seeds, then each seed) and writes
bench/results/methods-RUN.json (--out). Without --run and tags, says it skipped (the runs take
hours of CPU; `make bench` on a fresh clone has none): the commands are in docs/results.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import publish
from wsss import eval as ev
from wsss import io
from wsss.data.voc import VOCDataset
from wsss.fusion import stc_soft_target
from wsss.layout import CONFIG, PRED, RunLayout, Stage3Folder
from wsss.methods.psl import plus_targets
from wsss.saliency_maps import read_saliency

# (row, the flag whose runs hold it, net folder, what it trains on); in the order of the table
ROWS = [
    ("STC I-DCNN", "stc", "stc/i", "saliency of the simple images"),
    ("STC E-DCNN", "stc", "stc/e", "I-DCNN's predictions of the simple images"),
    ("STC P-DCNN", "stc", "stc/p", "E-DCNN's predictions of every training image"),
    ("PSL without the online term", "psl_off", "psl", "stage-2 pseudo-masks"),
    ("PSL", "psl_plus", "psl", "stage-2 pseudo-masks (+ online masks)"),
    ("PSL+", "psl_plus", "psl-plus", "PSL's CRF-refined predictions of the training images"),
    ("gt bound", "gt", "gt", "ground truth"),
]


def stage_dir(run: Path, tag: str) -> Path:
    return RunLayout(run).stage3(tag).path


def target_folder(stage: Path, net: str, tmp: Path, train: VOCDataset, config: dict) -> tuple[Path, list[str]]:
    """(the folder of the masks `net` trained on, the ids it trained on)."""
    stage2 = RunLayout(stage.parent).stage2
    simple = (stage / "stc" / "simple.txt").read_text().split() if net.startswith("stc/") else None
    if net == "stc/i":
        out = tmp / f"{stage.name}-saliency"
        out.mkdir()
        for id_ in simple:
            soft = stc_soft_target(read_saliency(stage2.saliency, id_), int(train.label_ids(id_)[0]),
                                   train.num_classes)
            io.write_mask(out / f"{id_}.png", soft.argmax(0).astype(np.uint8))
        return out, simple
    folder = {"stc/e": stage / "stc" / "i" / PRED, "stc/p": stage / "stc" / "e" / PRED,
              "psl": stage2.pseudo, "psl-plus": plus_targets(stage, config.get("psl_plus_merge", "none"))}[net]
    ids = simple if net == "stc/e" else [i for i in train.ids if (folder / f"{i}.png").is_file()]
    return folder, ids


def object_fates(folder: Path, gt_dir: Path, ids) -> dict:
    """Of the ground truth's object pixels, the percentage a mask folder labels background and the
    percentage it ignores: a net learns to under-segment from the first, nothing from the second."""
    counts = np.zeros(3, np.int64)  # object pixels, labelled background, ignored
    for id_ in ids:
        gt, mask = io.read_mask(gt_dir / f"{id_}.png"), io.read_mask(folder / f"{id_}.png")
        obj = (gt != 0) & (gt != io.IGNORE)
        counts += [obj.sum(), (obj & (mask == 0)).sum(), (obj & (mask == io.IGNORE)).sum()]
    return {"object_as_background": 100 * counts[1] / max(counts[0], 1),
            "object_ignored": 100 * counts[2] / max(counts[0], 1)}


def score_targets(folder: Path, train: VOCDataset, ids, workers: int) -> dict:
    t = ev.evaluate(folder, train.mask_dir, ids, train.num_classes, ignore_pred=True, workers=workers)
    return {"miou": t["miou"], "labelled_miou": t["labelled"]["miou"], "ignored": t["ignored"],
            "images": len(ids), **object_fates(folder, train.mask_dir, ids)}


def val_predictions(run: Path, tag: str, net: str, workers: int) -> Path:
    """The val predictions of `net` (stage 3's own for its final net, else made with wsss.predict --net)."""
    from wsss import predict
    from wsss.nets import trained_nets

    stage = stage_dir(run, tag)
    final, _ = trained_nets(stage)
    if net == final:
        return Stage3Folder(stage).pred(ev.stage3_predictions(stage))
    folder = stage / predict.pred_folder([1.0], False, False, predict.GATE_DEFAULT, net=net)
    argv = ["--run", run.name, "--outputs", str(run.parent), "--net", net, "--workers", str(workers),
            "--gate", predict.GATE_DEFAULT]
    if predict.main(argv + (["--tag", tag] if tag else [])) != 0:
        raise SystemExit(f"bench_methods: predicting {net} of {stage} failed")
    return folder


def measure_row(run: Path, tag: str, net: str, workers: int, tmp: Path) -> dict:
    stage = stage_dir(run, tag)
    config = io.read_json(stage / CONFIG)
    train = VOCDataset(config["data"], config["train_split"])
    val = VOCDataset(config["data"], config["val_split"])
    n = train.num_classes
    row = {"tag": tag, "seed": config["seed"]}
    if net != "gt":
        folder, ids = target_folder(stage, net, tmp, train, config)
        row["targets"] = score_targets(folder, train, ids, workers)
    pred = val_predictions(run, tag, net, workers)
    row["val_miou"] = ev.evaluate(pred, val.mask_dir, val.ids, n, workers=workers)["miou"]
    return row


def summary(values: list[float | None]) -> dict:
    """Mean and sample standard deviation over the seeds that have a figure (None: 0/0, as in wsss.eval)."""
    have = [v for v in values if v is not None]
    return {"mean": statistics.fmean(have) if have else None,
            "sd": statistics.stdev(have) if len(have) > 1 else 0.0, "values": values}


def measure(args) -> dict:
    run = args.outputs / args.run
    tags = {"stc": args.stc, "psl_off": args.psl_off, "psl_plus": args.psl_plus, "gt": args.gt}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, flag, net, trains_on in ROWS:
            if not tags[flag]:
                continue
            runs = [measure_row(run, tag, net, args.workers, Path(tmp)) for tag in tags[flag]]
            if net == "psl-plus":  # the rule that made its masks, from the first run's config
                rule = io.read_json(stage_dir(run, tags[flag][0]) / CONFIG).get("psl_plus_merge", "none")
                name, trains_on = f"{name} (--psl-plus-merge {rule})", f"{trains_on}, merged: {rule}"
            row = {"net": name, "folder": net, "trains_on": trains_on, "runs": runs,
                   "val_miou": summary([r["val_miou"] for r in runs])}
            if "targets" in runs[0]:
                row["targets"] = {k: summary([r["targets"][k] for r in runs])
                                  for k in ("miou", "labelled_miou", "ignored", "object_as_background")}
            rows.append(row)
    return {"run": str(run), "rows": rows}


def _ms(s: dict) -> str:
    return "n/a" if s["mean"] is None else f"{s['mean']:.1f} ± {s['sd']:.1f}"


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def table(result: dict) -> str:
    lines = ["| net | trains on | targets: mIoU (labelled, ignored %) | targets: object pixels labelled "
             "background % | val mIoU | val, each seed |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = r.get("targets")
        targets = f"{_ms(t['miou'])} ({_f(t['labelled_miou']['mean'])}, {_f(t['ignored']['mean'])} %)" if t \
            else "100 (the ground truth)"
        lost = _f(t["object_as_background"]["mean"]) if t else "0"
        seeds = ", ".join(f"{_f(run['val_miou'])} (seed {run['seed']})" for run in r["runs"])
        lines.append(f"| {r['net']} | {r['trains_on']} | {targets} | {lost} | {_ms(r['val_miou'])} | {seeds} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None)
    p.add_argument("--outputs", type=Path, default=Path("outputs"))
    for flag in ("stc", "psl-plus", "psl-off", "gt"):
        p.add_argument(f"--{flag}", nargs="+", default=[], metavar="TAG", help="stage-3 tags, one a seed")
    p.add_argument("--workers", type=int, default=ev.default_workers())
    p.add_argument("--out", type=Path, default=None, help="default bench/results/methods-RUN.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.run is None or not (args.stc or args.psl_plus or args.psl_off or args.gt):
        print("bench_methods: skipped: needs --run and the stage-3 tags to compare (see docs/results.md)",
              file=sys.stderr)
        return 0
    result = measure(args)
    publish(f"methods-{args.run}", result, table(result), ("numpy", "torch"), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
