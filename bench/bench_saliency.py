"""Built-in saliency (`wsss.saliency.compute_saliency`) against OpenCV's spectral residual on the
48 real VOC photos, with the standard salient-object metrics, in one run.

    pip install --no-deps --target /tmp/opencv-contrib opencv-contrib-python-headless==<the venv's cv2 version>
    python -m bench.bench_saliency --contrib /tmp/opencv-contrib      (or WSSS_OPENCV_CONTRIB=/tmp/opencv-contrib)

The baseline is OpenCV's own `cv2.saliency.StaticSaliencySpectralResidual`, which only the
opencv-contrib build has. That build and the project's opencv-python-headless both provide the
module `cv2`, so they cannot share a venv: contrib goes to a folder of its own, and the baseline
runs in a child process that finds `cv2` there first. Ours runs in this process with the
project's own cv2, exactly as the pipeline runs it.

Ground truth: SegmentationClassAug; foreground = classes 1..20, 255 pixels left out of every score.
- MAE: mean |map - foreground| over an image's scored pixels, averaged over the images. Maps are
  in [0, 1]; spectral-residual maps are min-max normalised per image (their scale is arbitrary).
- max F: each map binarised at thresholds 0..255 (map * 255 >= t); precision and recall per image,
  averaged over the images at each threshold; F = 1.3 P R / (0.3 P + R); the best threshold counts.
- seconds per image: wall and CPU time of the saliency call alone (image already decoded), one
  thread (cv2.setNumThreads(1), BLAS / OpenMP limited to 1 thread), on the photos at full size.

The photos carry detector boxes and captions drawn on them. Closed box outlines are barriers for
border-based methods (like ours) and sit right around the objects, which flatters such methods.
So every figure is also given on a second version of the photos whose thin box lines were
detected and inpainted (cv2.inpaint; captions stay): `boxes_inpainted`. An all-black map's MAE (the
foreground fraction) is given for reference. Writes bench/results/saliency.json with the machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads: one core, as the figures say

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LINE_OFFSET = 3  # px: a drawn box line is this much thinner than a natural edge region
LINE_CONTRAST = 60  # summed RGB difference to both sides
LINE_LENGTH = 25  # px: shortest straight run counted as a drawn line


def read_photos(voc: Path) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    from wsss.io import read_image, read_mask

    ids = (voc / "ImageSets" / "Segmentation" / "photos.txt").read_text().split()
    images = [read_image(voc / "JPEGImages" / f"{i}.jpg") for i in ids]
    masks = [read_mask(voc / "SegmentationClassAug" / f"{i}.png") for i in ids]
    return ids, images, masks


def inpaint_drawn_boxes(image: np.ndarray) -> np.ndarray:
    """Remove thin straight horizontal / vertical lines (the drawn detector boxes) by inpainting."""
    import cv2

    pixels = image.astype(np.int16)

    def thin(axis: int) -> np.ndarray:
        before = np.abs(pixels - np.roll(pixels, LINE_OFFSET, axis)).sum(2)
        after = np.abs(pixels - np.roll(pixels, -LINE_OFFSET, axis)).sum(2)
        return (np.minimum(before, after) > LINE_CONTRAST).astype(np.uint8)

    rows = cv2.morphologyEx(thin(0), cv2.MORPH_OPEN, np.ones((1, LINE_LENGTH), np.uint8))
    cols = cv2.morphologyEx(thin(1), cv2.MORPH_OPEN, np.ones((LINE_LENGTH, 1), np.uint8))
    lines = cv2.dilate(rows | cols, np.ones((3, 3), np.uint8))
    return cv2.inpaint(image, lines, 3, cv2.INPAINT_TELEA)


def scores(maps: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    """MAE and max F-measure (beta^2 = 0.3) over thresholds 0..255, 255 pixels excluded."""
    precision, recall, errors = np.zeros(256), np.zeros(256), []
    for saliency, mask in zip(maps, masks, strict=True):
        valid = mask != 255
        s = saliency[valid].astype(np.float64)
        fg = mask[valid] > 0
        errors.append(np.abs(s - fg).mean())
        level = np.clip(np.round(s * 255), 0, 255).astype(np.int64)
        above = np.bincount(level, minlength=256)[::-1].cumsum()[::-1]  # pixels with level >= t
        hits = np.bincount(level[fg], minlength=256)[::-1].cumsum()[::-1]
        precision += np.where(above > 0, hits / np.maximum(above, 1), 0)
        recall += hits / max(int(fg.sum()), 1)
    precision /= len(maps)
    recall /= len(maps)
    f = 1.3 * precision * recall / np.maximum(0.3 * precision + recall, 1e-12)
    best = int(f.argmax())
    return {"mae": round(float(np.mean(errors)), 4), "max_f": round(float(f[best]), 4), "best_threshold": best}


def timed_maps(fn, images: list[np.ndarray]) -> tuple[list[np.ndarray], float, float]:
    maps, wall, cpu = [], 0.0, 0.0
    for image in images:
        w0, c0 = time.perf_counter(), time.process_time()
        maps.append(fn(image))
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
    return maps, wall / len(images), cpu / len(images)


def spectral_residual_maps(images: list[np.ndarray]) -> tuple[list[np.ndarray], float, float]:
    """Child-process side: needs the opencv-contrib cv2 first on sys.path."""
    import cv2

    cv2.setNumThreads(1)
    detector = cv2.saliency.StaticSaliencySpectralResidual_create()

    def one(image: np.ndarray) -> np.ndarray:
        ok, saliency = detector.computeSaliency(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError("StaticSaliencySpectralResidual failed")
        saliency = saliency.astype(np.float32)
        span = float(saliency.max() - saliency.min())
        return (saliency - saliency.min()) / span if span > 0 else np.zeros_like(saliency)

    one(images[0])  # warm-up, as for ours
    return timed_maps(one, images)


def run_child(path: Path) -> int:
    """Compute spectral-residual maps for the images in `path` (npz) and store them beside."""
    import cv2

    if not hasattr(cv2, "saliency"):
        print(f"error: {cv2.__file__} is not an opencv-contrib build (no cv2.saliency)", file=sys.stderr)
        return 1
    data = np.load(path)
    images = [data[k] for k in sorted(data.files, key=int)]
    maps, wall, cpu = spectral_residual_maps(images)
    np.savez(path.with_suffix(".out.npz"), wall=wall, cpu=cpu, version=cv2.__version__,
             **{str(i): m.astype(np.float32) for i, m in enumerate(maps)})
    return 0


def spectral_residual(images: list[np.ndarray], contrib: Path) -> tuple[list[np.ndarray], float, float, str]:
    """Run the baseline in a child process whose cv2 is the contrib build in `contrib`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.npz"
        np.savez(path, **{str(i): im for i, im in enumerate(images)})
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(contrib), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(path)], env=env, check=True)
        out = np.load(path.with_suffix(".out.npz"))
        maps = [out[str(i)] for i in range(len(images))]
        return maps, float(out["wall"]), float(out["cpu"]), str(out["version"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc", type=Path, default=REPO.parent / "shared" / "voc12", help="VOC root with photos.txt")
    p.add_argument("--contrib", type=Path, default=os.environ.get("WSSS_OPENCV_CONTRIB"),
                   help="folder holding the opencv-contrib-python-headless package (pip install --target)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "saliency.json")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return run_child(args.child)
    if args.contrib is None or not (args.contrib / "cv2").is_dir():
        print(f"error: no opencv-contrib build at {args.contrib} (--contrib or WSSS_OPENCV_CONTRIB); install one "
              "with: pip install --no-deps --target /tmp/opencv-contrib opencv-contrib-python-headless",
              file=sys.stderr)
        return 1
    if not (args.voc / "ImageSets" / "Segmentation" / "photos.txt").is_file():
        print(f"error: {args.voc}: no ImageSets/Segmentation/photos.txt (the real VOC photos)", file=sys.stderr)
        return 1

    import cv2

    from bench.common import machine_info, write_result
    from wsss.saliency import compute_saliency

    cv2.setNumThreads(1)
    ids, photos, masks = read_photos(args.voc)
    load_before = os.getloadavg()
    figures = {"photos": len(ids)}
    for variant, images in (("as_given", photos), ("boxes_inpainted", [inpaint_drawn_boxes(im) for im in photos])):
        compute_saliency(images[0])  # warm-up: imports and first-call costs are not per-image costs
        ours, ours_wall, ours_cpu = timed_maps(compute_saliency, images)
        base, base_wall, base_cpu, contrib_version = spectral_residual(images, args.contrib)
        figures[variant] = {
            "ours": {**scores(ours, masks), "seconds_per_image": round(ours_wall, 4),
                     "cpu_seconds_per_image": round(ours_cpu, 4)},
            "spectral_residual": {**scores(base, masks), "seconds_per_image": round(base_wall, 4),
                                  "cpu_seconds_per_image": round(base_cpu, 4)},
            "all_black_map_mae": round(float(np.mean([(m[m != 255] > 0).mean() for m in masks])), 4),
        }
    figures["machine"] = machine_info(
        ("numpy", "scipy", "scikit-image", "opencv-python-headless"), threads=1,
        load_average_before=[round(x, 2) for x in load_before],
        **{"opencv (ours)": cv2.__version__, "opencv-contrib (baseline)": contrib_version})
    print(f"{len(ids)} real VOC photos, foreground = classes 1..20, 255 excluded; one thread")
    for variant in ("as_given", "boxes_inpainted"):
        row = figures[variant]
        print(f"  {variant} (all-black map MAE {row['all_black_map_mae']:.3f})")
        for name in ("ours", "spectral_residual"):
            r = row[name]
            print(f"    {name:18s} MAE {r['mae']:.3f}  max F {r['max_f']:.3f}  "
                  f"{r['seconds_per_image']:.3f} s/image ({r['cpu_seconds_per_image']:.3f} s CPU)")
    write_result("saliency", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
