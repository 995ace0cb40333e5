"""CAM extraction speed: wsss.cam against a plain per-scale loop, same model and images, one run.

    python -m bench.bench_cam [--images 20] [--size 256] [--backbone efficientnet-lite0] [--threads 2]

- ours: `wsss.cam.multiscale_cams` (`torch.inference_mode`, `channels_last`; on a GPU each scale's
  image and its mirror in one batch, see wsss/cam.py), one image at a
  time as on VOC's mixed sizes; and `multiscale_cams_batch` with a chunk of same-size images
  (one forward per scale for all of them on a GPU).
- baseline: the loop of IRN's make_cam without its dataset machinery: one forward per scale and
  another for the mirror image, `torch.no_grad`, default (contiguous) memory format.

The three are timed alternately, a chunk of `--batch` images at a time, so that the load of a
shared machine falls on all alike; their CAMs must agree. Random weights are fine (speed does not depend on them).
Writes bench/results/cam.json with the figures and the machine. On a machine whose cores are busy
with other work, run it with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads then make every
torch op many times slower (an efficientnet-lite0 forward went from 48 ms to 0.9 s on 2 shared cores).
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import RESULTS, machine_info, write_result
from wsss.cam import SCALES, multiscale_cams, multiscale_cams_batch, to_input
from wsss.models.classifier import build_classifier


def plain_loop_cams(model, image: np.ndarray, keys, scales=SCALES) -> np.ndarray:
    """One forward per scale and per flip (IRN make_cam style); same maths as wsss.cam."""
    keys = np.asarray(keys) - 1
    size = image.shape[:2]
    with torch.no_grad():
        x = to_input(image[None], torch.device("cpu")).contiguous()
        total = 0
        for scale in scales:
            xs = F.interpolate(x, (round(size[0] * scale), round(size[1] * scale)), mode="bilinear",
                               align_corners=False)
            for flip in (False, True):
                cam = model.cams(xs.flip(-1) if flip else xs)
                cam = cam.flip(-1) if flip else cam
                total = total + F.interpolate(cam[:, keys], size, mode="bilinear", align_corners=False)[0]
        cam = F.relu(total)
        cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-5)
    return cam.numpy()


def synthetic_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Coloured discs and boxes on noisy grounds (content does not change the speed)."""
    rng = np.random.default_rng(seed)
    images = []
    yy, xx = np.mgrid[:size, :size]
    for _ in range(n):
        image = rng.integers(60, 200, 3) + rng.normal(0, 12, (size, size, 3))
        for _ in range(3):
            cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 10, size // 4))]
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--num-classes", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="same-size images per forward for the batched figure")
    p.add_argument("--out", type=Path, default=RESULTS / "cam.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_classifier(args.backbone, args.num_classes, output_stride=16, weights=None).eval()
    baseline_model = copy.deepcopy(model)
    images = synthetic_images(args.images, args.size)
    keys = [np.array([1 + i % args.num_classes, 1 + (i * 7 + 3) % args.num_classes]) for i in range(len(images))]
    load_before = os.getloadavg()

    for image, k in zip(images[:2], keys[:2], strict=True):  # warm-up (allocator, oneDNN kernels)
        multiscale_cams(model, image, k)
        plain_loop_cams(baseline_model, image, k)
    multiscale_cams_batch(model, images[:args.batch], keys[:args.batch])
    ours = baseline = batched = 0.0
    max_diff = 0.0
    for i in range(0, len(images), args.batch):  # the three methods alternate chunk by chunk
        chunk, chunk_keys = images[i:i + args.batch], keys[i:i + args.batch]
        t0 = time.perf_counter()
        a = [multiscale_cams(model, image, k) for image, k in zip(chunk, chunk_keys, strict=True)]
        t1 = time.perf_counter()
        b = [plain_loop_cams(baseline_model, image, k) for image, k in zip(chunk, chunk_keys, strict=True)]
        t2 = time.perf_counter()
        c = multiscale_cams_batch(model, chunk, chunk_keys)
        t3 = time.perf_counter()
        ours, baseline, batched = ours + t1 - t0, baseline + t2 - t1, batched + t3 - t2
        max_diff = max(max_diff, *(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)),
                       *(float(np.abs(x - y).max()) for x, y in zip(a, c, strict=True)))
    n = len(images)
    result = {
        "what": "multi-scale + flip CAM extraction, images/s",
        "scales": list(SCALES), "flip": True, "forwards_per_image": {"ours": len(SCALES), "baseline": 2 * len(SCALES)},
        "images": n, "size": args.size, "backbone": args.backbone, "output_stride": 16, "device": "cpu",
        "ours_images_per_s": round(n / ours, 3),
        f"ours_batched_{args.batch}_images_per_s": round(n / batched, 3),
        "baseline_images_per_s": round(n / baseline, 3),
        "speedup": round(baseline / ours, 3),
        f"speedup_batched_{args.batch}": round(baseline / batched, 3),
        "max_abs_difference": max_diff,
        "machine": machine_info(
            ("numpy", "torch", "torchvision"), torch_threads=torch.get_num_threads(),
            omp_env={k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ},
            load_average_before=[round(x, 2) for x in load_before]),
    }
    print(f"{n} images, {args.size} px, scales {list(SCALES)} x flip, CPU, {torch.get_num_threads()} threads")
    print(f"  IRN-style loop (one forward per scale and mirror)  {result['baseline_images_per_s']:.2f} images/s")
    print(f"  wsss.cam.multiscale_cams                          {result['ours_images_per_s']:.2f} images/s "
          f"({result['speedup']:.2f}x the loop)")
    print(f"  multiscale_cams_batch, {args.batch} images a call            "
          f"{result[f'ours_batched_{args.batch}_images_per_s']:.2f} images/s "
          f"({result[f'speedup_batched_{args.batch}']:.2f}x); largest difference {max_diff:.1e}")
    write_result("cam", result, args.out)
    return result


if __name__ == "__main__":
    main()
