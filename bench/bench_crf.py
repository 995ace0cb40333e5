"""Time the dense CRF on the 48 real VOC photos two ways in one run, and compare the 255 rules.

    python -m bench.bench_crf [--voc VOC_ROOT] [--workers N] [--no-modes]

1. Speed. Unaries are 21-class softmax-like maps made from the ground truth, deterministically
   (seed = image index): the one-hot mask (255 -> uniform over the image's classes), blurred
   (sigma 6 px), times 4, plus gaussian noise (sigma 0.5), absent classes pushed down by 4, then
   a softmax; so the present classes dominate and every absent class keeps a small probability
   (about 3e-4). Then:
     - the reference way (DeepLab's test-time CRF, and PSA/IRN/SEAM's `crf_inference` when
       called with all 21 labels): all 21 labels, one process, images one after the other;
     - ours: `wsss.crf.dense_crf` over background + the classes present, the probabilities of
       those renormalised, images spread over a process pool (`wsss.workers.parallel_map`).
   Both from the same probability arrays to label maps; prints both times, the ratio, and how
   often the two label maps agree (all pixels; the 21-label run may pick an absent class, which
   ours cannot).
2. The 255 rule (`wsss.crf.crf_labels`), unless --no-modes. Fused masks are simulated from the
   ground truth the way stage 2 makes them (`simulate`: mined regions that spill over the object
   or are cut short, CAM-like scores, the built-in saliency of the real photo,
   `wsss.fusion.fuse_with_saliency` with its default threshold); then the CRF with the stage-2
   defaults (mode "agree", DeepLab v2 test-time kernels, no soft scores) and variants: with soft
   scores, with the PSA kernels, mode "fill".
   mIoU over labelled pixels and pixel accuracy (percent), and the ignored fraction.

Why the speed-up is smaller than 21 / 2.5: pydensecrf's mean-field iteration has a large part that
does not grow with the number of labels (the permutohedral lattices' index work over every pixel
and lattice vertex, for both kernels): on a 500x375 photo about 0.2 s of CPU for 10 iterations,
plus about 0.018 s per label. So restricting the labels gives about 2x of CPU on VOC, and the pool
at most the number of free cores on top. CPU seconds are reported beside the wall times because
the machine may be shared (wall times then depend on the other load).

Writes bench/results/crf.json with the machine's description. The photos carry drawn detector
boxes and captions: fine for timing, a harder case than clean photos for the CRF's quality.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from bench.common import RESULTS, machine_info, write_result
from wsss import eval as ev
from wsss.crf import CRF_DEFAULTS, crf_labels, dense_crf
from wsss.io import read_image, read_mask
from wsss.workers import parallel_map

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 21


def softmax_unaries(gt: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic 21-class softmax-like probabilities (21, H, W) from a ground-truth mask."""
    rng = np.random.default_rng(seed)
    present = np.unique(gt[gt != 255])
    onehot = np.zeros((NUM_CLASSES,) + gt.shape, np.float32)
    for c in present:
        onehot[c] = gt == c
    onehot[present] += (gt == 255) / len(present)
    logits = 4 * ndi.gaussian_filter(onehot, sigma=(0, 6, 6)) + rng.normal(0, 0.5, onehot.shape).astype(np.float32)
    absent = np.setdiff1d(np.arange(NUM_CLASSES), present)
    logits[absent] -= 4
    logits -= logits.max(0, keepdims=True)
    prob = np.exp(logits)
    return (prob / prob.sum(0, keepdims=True)).astype(np.float32)


def load(voc: Path, ids: list[str]):
    return [(read_image(voc / "JPEGImages" / f"{i}.jpg"), read_mask(voc / "SegmentationClassAug" / f"{i}.png"))
            for i in ids]


def crf_present(job):
    """Our way for one image: CRF over the present labels only; label map in mask ids."""
    index, image, prob, present = job
    t0 = time.process_time()
    p = prob / prob.sum(0, keepdims=True)
    labels = present[dense_crf(image, p).argmax(0)].astype(np.uint8)
    return index, labels, time.process_time() - t0


def speed(photos, workers: int) -> dict:
    probs = [softmax_unaries(gt, seed=i) for i, (_, gt) in enumerate(photos)]
    presents = [np.unique(gt[gt != 255]).astype(np.int64) for _, gt in photos]

    t0, c0 = time.perf_counter(), time.process_time()
    full = [dense_crf(image, prob).argmax(0).astype(np.uint8) for (image, _), prob in zip(photos, probs, strict=True)]
    t_full, cpu_full = time.perf_counter() - t0, time.process_time() - c0

    jobs = [(i, image, probs[i][presents[i]], presents[i]) for i, (image, _) in enumerate(photos)]
    t0 = time.perf_counter()
    ours: list = [None] * len(jobs)
    cpu_ours = 0.0
    for _, result, error in parallel_map(crf_present, jobs, workers, desc="crf present labels"):
        if error is not None:
            raise error
        ours[result[0]] = result[1]
        cpu_ours += result[2]
    t_ours = time.perf_counter() - t0

    same = [(f == o).mean() for f, o in zip(full, ours, strict=True)]
    pixels = sum(f.size for f in full)
    agree = sum((f == o).sum() for f, o in zip(full, ours, strict=True)) / pixels
    absent = sum((~np.isin(f, p)).sum() for f, p in zip(full, presents, strict=True)) / pixels
    return {
        "images": len(photos),
        "labels_per_image_mean": round(float(np.mean([len(p) for p in presents])), 2),
        "all_21_labels_one_process_s": round(t_full, 2),
        "present_labels_pool_s": round(t_ours, 2),
        "speedup": round(t_full / t_ours, 2),
        "all_21_labels_cpu_s": round(cpu_full, 2),
        "present_labels_cpu_s": round(cpu_ours, 2),
        "cpu_speedup_from_fewer_labels": round(cpu_full / cpu_ours, 2),
        "workers": workers,
        "pixel_agreement": float(agree),
        "images_identical": int(sum(s == 1.0 for s in same)),
        "worst_image_agreement": float(min(same)),
        "full_run_absent_class_pixels": float(absent),
    }


# ---------------------------------------------------------------- the 255 rule

KINDS = ("dilated", "cam-like")
VARIANTS = {  # name -> crf_labels arguments beyond the stage-2 defaults; soft: CAM/saliency evidence
    "agree (stage 2)": {"soft": False},
    "agree, soft scores": {"soft": True},
    "agree, PSA kernels": {"soft": False, **CRF_DEFAULTS},
    "fill": {"soft": False, "mode": "fill"},
    "fill, soft scores": {"soft": True, "mode": "fill"},
    "fill, PSA kernels": {"soft": False, "mode": "fill", **CRF_DEFAULTS},
}


def simulate(gt: np.ndarray, saliency: np.ndarray, seed: int, kind: str):
    """(fused mask, keys, score): stage 2's fusion of simulated mined regions and real saliency.

    Per object, a CAM-like score (its mask blurred) and a mined region: "dilated", the object
    grown by 6 px; "cam-like", the score (blurred more, sigma 16) above 0.35. In 7 of 10 objects
    only the part above a random height is mined, as when erasing stops before the whole object.
    """
    from wsss.fusion import fuse_with_saliency

    rng = np.random.default_rng(seed)
    keys = np.unique(gt[(gt > 0) & (gt < 255)]).astype(np.int64)
    rows = np.arange(gt.shape[0])[:, None]
    regions, score = [], []
    for k in keys:
        obj = gt == k
        sc = ndi.gaussian_filter(obj.astype(np.float32), 8 if kind == "dilated" else 16)
        sc /= max(float(sc.max()), 1e-6)
        region = ndi.binary_dilation(obj, iterations=6) if kind == "dilated" else sc > 0.35
        if rng.random() < 0.7:
            region &= rows < np.percentile(np.nonzero(obj)[0], rng.uniform(30, 70))
        regions.append(region)
        score.append(sc)
    regions, score = np.array(regions).reshape((-1,) + gt.shape), np.array(score).reshape((-1,) + gt.shape)
    return fuse_with_saliency(regions, keys, score, saliency), keys, score


def mode_job(job):
    """Confusion matrices and ignored pixel counts of every kind x variant for one photo."""
    from wsss.fusion import soft_scores
    from wsss.saliency import compute_saliency

    index, image, gt = job
    saliency = compute_saliency(image)
    masks = {}
    for kind in KINDS:
        fused, keys, score = simulate(gt, saliency, seed=index, kind=kind)
        masks[kind, "fused (no CRF)"] = fused
        for name, variant in VARIANTS.items():
            params = dict(variant)
            soft = soft_scores(score, saliency) if params.pop("soft") else None
            masks[kind, name] = crf_labels(image, fused, keys, soft=soft, **params)
    return {key: (ev.confusion_matrix(gt, mask, NUM_CLASSES, ignore_pred=True), int((mask == 255).sum()), mask.size)
            for key, mask in masks.items()}


def modes(photos, workers: int) -> dict:
    jobs = [(i, image, gt) for i, (image, gt) in enumerate(photos)]
    confusion, ignored, pixels = {}, {}, {}
    for _, result, error in parallel_map(mode_job, jobs, workers, desc="255 rule"):
        if error is not None:
            raise error
        for key, (conf, ign, size) in result.items():
            confusion[key] = confusion.get(key, 0) + conf
            ignored[key] = ignored.get(key, 0) + ign
            pixels[key] = pixels.get(key, 0) + size
    out = {kind: {} for kind in KINDS}
    for (kind, name), conf in confusion.items():
        s = ev.scores(conf)
        out[kind][name] = {"miou_labelled": round(s["miou"], 2), "pixel_acc_labelled": round(s["pixel_acc"], 2),
                           "ignored_fraction": round(ignored[kind, name] / pixels[kind, name], 4)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc", type=Path, default=REPO.parent / "shared" / "voc12")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--modes", action=argparse.BooleanOptionalAction, default=True, help="also part 2")
    p.add_argument("--out", type=Path, default=RESULTS / "crf.json")
    args = p.parse_args(argv)
    ids_path = args.voc / "ImageSets" / "Segmentation" / "photos.txt"
    if not ids_path.is_file():
        raise SystemExit(f"error: {ids_path}: not found (the 48 real VOC photos)")
    ids = ids_path.read_text().split()
    load_before = os.getloadavg()
    photos = load(args.voc, ids)
    result = {"speed": speed(photos, args.workers)}
    s = result["speed"]
    print(f"{s['images']} photos, {s['labels_per_image_mean']} labels an image on average")
    print(f"all 21 labels, one process:     {s['all_21_labels_one_process_s']:7.2f} s")
    print(f"present labels, {args.workers} processes:  {s['present_labels_pool_s']:7.2f} s")
    print(f"CPU time {s['all_21_labels_cpu_s']:.2f} s vs {s['present_labels_cpu_s']:.2f} s: "
          f"{s['cpu_speedup_from_fewer_labels']:.2f}x from the labels alone")
    print(f"speed-up {s['speedup']:.2f}x; labels agree on {100 * s['pixel_agreement']:.4f}% of pixels "
          f"({s['images_identical']}/{s['images']} images identical, worst {100 * s['worst_image_agreement']:.3f}%)")
    if args.modes:
        result["modes"] = modes(photos, args.workers)
        print("255 rule on simulated fused masks (mIoU on labelled pixels, ignored fraction):")
        for kind, rows in result["modes"].items():
            print(f" mined regions {kind}:")
            for name, r in rows.items():
                print(f"  {name:24s} mIoU {r['miou_labelled']:6.2f}  acc {r['pixel_acc_labelled']:6.2f}  "
                      f"ignored {100 * r['ignored_fraction']:5.1f}%")
    result["machine"] = machine_info(("numpy", "scipy", "pydensecrf2"),
                                     load_average_before=[round(x, 2) for x in load_before])
    write_result("crf", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
