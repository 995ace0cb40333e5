"""Training-step throughput (images/s) of every backbone, for the stage-1 classifier and the stage-3
segmentation net, at 256 px on CPU, and with bf16 autocast on CUDA when a GPU is present.

    python -m bench.bench_train [--size 256] [--batch 8] [--steps 3] [--backbones ...]

One warm-up step, then the mean of --steps timed steps (forward, loss, backward, SGD step), the
same step `wsss.train.fit` runs. Backbones whose weights are not on this machine are timed with
random weights (the speed is the same). Writes bench/results/train.json with the machine.
"""
from __future__ import annotations

import argparse
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from bench.common import machine_info, write_result
from wsss.models.classifier import build_classifier
from wsss.models.segnet import build_segnet

BACKBONES = ("efficientnet-lite0", "vgg16", "resnet50", "resnet101")
NUM_CLASSES = 21


def build(kind: str, backbone: str):
    """The net with ImageNet weights when they can be had offline, else random ones."""
    make = ((lambda w: build_classifier(backbone, NUM_CLASSES - 1, output_stride=16, weights=w))
            if kind == "classifier"
            else (lambda w: build_segnet(backbone, NUM_CLASSES, output_stride=8, cls_branch=True, weights=w)))
    try:
        return make("imagenet"), "imagenet"
    except Exception:  # noqa: BLE001 - torchvision weights need a download this machine cannot make
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make(None), "random"


def loss_of(kind: str, out, labels, masks):
    if kind == "classifier":
        return F.multilabel_soft_margin_loss(out, labels)
    return F.cross_entropy(out["seg"], masks, ignore_index=255) + F.multilabel_soft_margin_loss(out["cls"], labels)


def time_steps(kind: str, backbone: str, device: str, size: int, batch: int, steps: int) -> dict:
    model, weights = build(kind, backbone)
    model = model.to(device).train()
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    labels = (torch.rand(batch, NUM_CLASSES - 1, device=device) > 0.8).float()
    masks = torch.randint(0, NUM_CLASSES, (batch, size, size), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    times = []
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = loss_of(kind, model(x), labels, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    return {"kind": kind, "backbone": backbone, "device": device, "weights": weights,
            "amp": device == "cuda", "batch": batch, "size": size,
            "seconds_per_step": round(step_s, 3), "images_per_s": round(batch / step_s, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for backbone in args.backbones:
            for kind in ("classifier", "segnet"):
                row = time_steps(kind, backbone, device, args.size, args.batch, args.steps)
                rows.append(row)
                print(f"{device:4s} {kind:10s} {backbone:18s} {row['images_per_s']:8.2f} images/s "
                      f"({row['seconds_per_step']:.2f} s/step, batch {args.batch}, {args.size} px"
                      f"{', bf16' if row['amp'] else ''}, {row['weights']} weights)")
    write_result("train", {"rows": rows, "machine": machine_info(("torch", "torchvision"), torch_threads=args.threads)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
