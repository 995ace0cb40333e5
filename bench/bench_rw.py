"""Random-walk seeds of a finished `--rw` run, walked again with other settings and scored.

    python -m bench.bench_rw --run R [--outputs outputs] [--beta 10] [--steps 16,32,64,128]
        [--thresholds 0.3,0.4,...] [--images N] [--out FILE]

The run's trained affinity head (stage1/rw/checkpoint.pt) gives every image's affinity features once;
the union's CAMs (stage1/regions/ID.npz) are walked with each `--beta` x `--steps`, and the walked
maps (each class divided by its maximum) are scored at every background threshold against the
ground truth of the images `python -m wsss.eval --run R --stage stage1` scores (IRN's protocol: a
pixel below the threshold is background, none is ignored). Beside them, the union's CAMs themselves
at their best threshold (the walk's starting point). Answers which walk settings the defaults of
wsss.affinity should be, without training anything again. Writes bench/results/rw-RUN.json (--out).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.common import publish
from wsss import eval as ev
from wsss import io
from wsss.affinity import BETA, WALK_BG_THRESHOLD, WALK_STEPS, walk_labels
from wsss.data.voc import VOCDataset
from wsss.layout import CHECKPOINT, CONFIG, RunLayout, item
from wsss.metrics import confusion_matrix, scores
from wsss.run import scale_list
from wsss.rw import affinity_net, grid_features, walk
from wsss.scoremaps import read_seeds

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


def label_map(score: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """Background where no class's score exceeds `threshold`, else the highest class: the rule of
    `python -m wsss.eval`'s threshold sweep (a tie goes to background), so the union's row here
    reproduces its sweep."""
    if len(keys) == 0:
        return np.zeros(score.shape[1:], np.uint8)
    top = np.argmax(score, axis=0)
    return np.where(score.max(axis=0) > threshold, keys[top], 0).astype(np.uint8)


def measure(args) -> dict:
    run = RunLayout.of(args.outputs, args.run)
    config = io.read_json(run.stage1.path / CONFIG)
    data = Path(config["data"])
    dataset = VOCDataset(data, config["train_split"])
    ids, split, why = ev.protocol_ids(data, config["train_split"])
    ids = [i for i in ids if dataset.labels(i).any()][:args.images or None]
    model = affinity_net(argparse.Namespace(**config), dataset.num_classes, run.stage1)
    model.load_state_dict(io.load_checkpoint(run.stage1.rw / CHECKPOINT)["model"])
    model.eval()
    settings = [(b, s) for b in args.beta for s in args.steps]
    c = dataset.num_classes
    conf = {k: {t: np.zeros((c, c), np.int64) for t in args.thresholds} for k in [("union", 0)] + settings}
    for n, id_ in enumerate(ids):
        image, gt = dataset.image(id_), dataset.mask(id_)
        keys, _, score = read_seeds(item(run.stage1.regions, id_, ".npz"), dataset.label_ids(id_), image.shape[:2])
        maps = {("union", 0): score}
        features = grid_features(model, image, torch.device("cpu"))
        for beta, steps in settings:
            maps[(beta, steps)] = walk_labels(walk(features, score, beta=beta, steps=steps))[1]  # per-class max
        for k, m in maps.items():
            for t in args.thresholds:
                conf[k][t] += confusion_matrix(gt, label_map(m, keys, t), c)
        if (n + 1) % 50 == 0:
            print(f"{n + 1}/{len(ids)} images")
    rows = []
    for k, by_t in conf.items():
        miou = {t: scores(m)["miou"] for t, m in by_t.items()}
        best = max(miou, key=miou.get)
        rows.append({"seeds": "union CAM" if k[0] == "union" else f"walk beta {k[0]:g}, {k[1]} steps",
                     "best_threshold": best, "best_miou": round(miou[best], 2),
                     "miou_at_default": round(miou.get(WALK_BG_THRESHOLD, float("nan")), 2),
                     "miou_by_threshold": {str(t): round(v, 2) for t, v in miou.items()}})
    return {"run": args.run, "split": split, "why": why, "images": len(ids), "rows": rows,
            "default_threshold": WALK_BG_THRESHOLD}


def table(result: dict) -> str:
    lines = [f"{result['images']} images ({result['why']}); mIoU, none ignored",
             f"{'seeds':34s} {'best t':>7s} {'mIoU':>6s} {'at ' + str(result['default_threshold']):>8s}"]
    for r in result["rows"]:
        lines.append(f"{r['seeds']:34s} {r['best_threshold']:7.2f} {r['best_miou']:6.2f} {r['miou_at_default']:8.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--outputs", type=Path, default=Path("outputs"))
    p.add_argument("--beta", type=scale_list, default=(BETA,), help="powers of the affinities, e.g. 6,10")
    p.add_argument("--steps", type=lambda t: tuple(int(float(x)) for x in scale_list(t)),
                   default=(16, 32, WALK_STEPS, 128), help="walk steps, e.g. 16,32,64,128")
    p.add_argument("--thresholds", type=scale_list, default=THRESHOLDS)
    p.add_argument("--images", type=int, default=0, help="at most this many images (0: all)")
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args)
    publish(f"rw-{args.run}", result, table(result), packages=("numpy", "torch", "scipy"), path=args.out)


if __name__ == "__main__":
    main()
