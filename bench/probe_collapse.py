"""Probe the stage-3 optimiser on a dataset: train the fully supervised net for N steps with a given
learning rate, warm-up and clipping, and print, every 10 steps, the loss, the gradient norm, the
fraction of the head's reduction-layer units that fire and the fraction of pixels predicted as
foreground; then val mIoU. This is how the collapse of docs/results.md was diagnosed.

    python -m bench.probe_collapse --data data/voclike --steps 200 --schedule 1464 [--lr 0.005] [--clip 5]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from wsss.losses import cross_entropy
from wsss.metrics import confusion_matrix, scores
from wsss.nets import build_net, open_dataset
from wsss.predict import label_map, labels_at, predict_masks
from wsss.segtrain import SegmentationTrainSet
from wsss.train import EpochSeeded, scheduled_lr


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/voclike")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--schedule", type=int, default=0, help="length of the poly schedule (default: --steps)")
    p.add_argument("--lr", type=float, default=0.0025)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--val", type=int, default=100, help="val images scored at the end")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    train, val = open_dataset(a.data, "train"), open_dataset(a.data, "val")
    model = build_net({"weights": "imagenet", "backbone": "efficientnet-lite0", "head": "auto", "output_stride": 16},
                      train.num_classes, cls_branch=False)
    groups = model.param_groups(a.lr)
    for g in groups:
        g["initial_lr"] = g["lr"]
    opt = torch.optim.SGD(groups, lr=a.lr, momentum=0.9, weight_decay=5e-4)
    data = EpochSeeded(SegmentationTrainSet(train, train.ids, 160), 0)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = {}
    if model.head.reduce is not None:
        model.head.reduce.register_forward_hook(lambda m, i, o: seen.__setitem__("reduce", o.detach()))
    step, t0 = 0, time.time()
    model.train()
    while step < a.steps:
        data.epoch += 1
        for batch in loader:
            if step >= a.steps:
                break
            for g in opt.param_groups:
                g["lr"] = scheduled_lr(g["initial_lr"], step, a.schedule or a.steps, a.warmup)
            logits = model(batch["image"])["seg"]
            loss = cross_entropy(logits, batch["target"])
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip if a.clip > 0 else float("inf"))
            opt.step()
            if step % 10 == 0 or step == a.steps - 1:
                alive = (seen["reduce"] > 0).float().mean().item() if "reduce" in seen else float("nan")
                print(f"step {step:4d} loss {loss.item():.3f} grad norm {norm.item():7.2f} units alive {alive:.3f} "
                      f"foreground predicted {(logits.argmax(1) > 0).float().mean().item():.3f}", flush=True)
            step += 1
    model.eval()
    conf = np.zeros((val.num_classes,) * 2, np.int64)
    for id_, image, probs in predict_masks(model, val, val.ids[:a.val], device=torch.device("cpu"), gate=False,
                                           desc="val"):
        conf += confusion_matrix(val.mask(id_), labels_at(label_map(probs), image.shape[:2]), val.num_classes)
    print(json.dumps({**vars(a), "val_miou": round(scores(conf)["miou"], 2), "seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
