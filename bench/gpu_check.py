"""GPU check (`make gpu-check`): every preset in smoke size on a VOC-resolution dataset, under bf16
and fp16, on one CUDA GPU, in at most 8 minutes.

For each preset and precision it runs stages 1-3 in this process (`--preset P --smoke --amp A
--device cuda`) on the synthetic generator's images at about 500x375 (`--size 440`) and reports
each stage's images/s (the stage's images over its manifest's seconds, model building and CRFs
included) and its peak GPU memory (torch.cuda.max_memory_allocated). It fails on:

- a non-finite loss anywhere in a training's metrics.jsonl (training itself stops at the first one);
- a CPU/GPU CAM disagreement: stage 1's step-1 classifier's CAMs of the first images, computed on
  the CPU in float32 and on the GPU under the precision checked, differ by more than
  `CAM_TOLERANCE` (mean and max absolute difference of the normalised CAMs, which lie in [0, 1]).
  The tolerance is a choice, not a measurement: bf16 keeps 8 bits of mantissa (a relative error
  of 0.4 % per rounding), and a mined region moves only where a CAM crosses the 0.7 threshold.

Without a working CUDA it says why and exits 0 (skipped): there is nothing to check on a CPU,
where the tests run every preset in smoke size already (tests/test_presets.py). The figures go
to bench/results/gpu_check.json; none has been measured by the project yet.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine_info, write_result

PRECISIONS = ("bf16", "fp16")
CAM_TOLERANCE = {"mean_abs": 0.02, "max_abs": 0.25}
CAM_IMAGES = 4
BUDGET_S = 480  # the check's promise: at most 8 minutes on one GPU
STAGES = ("stage1", "stage2", "stage3")


def cam_disagreement(cpu: list[np.ndarray], gpu: list[np.ndarray]) -> dict:
    """Mean and max absolute difference of two lists of CAMs (n, H, W) of the same images."""
    if len(cpu) != len(gpu):
        raise ValueError(f"{len(cpu)} CPU CAMs but {len(gpu)} GPU CAMs")
    diffs = []
    for a, b in zip(cpu, gpu, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"CAM shapes differ: {a.shape} on the CPU, {b.shape} on the GPU")
        diffs.append(np.abs(a.astype(np.float32) - b.astype(np.float32)).ravel())
    d = np.concatenate(diffs) if diffs else np.zeros(1, np.float32)
    d = d if d.size else np.zeros(1, np.float32)
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max())}


def cam_problems(disagreement: dict, tolerance: dict = CAM_TOLERANCE) -> list[str]:
    return [f"CPU/GPU CAM {k} difference {disagreement[k]:.4f} > {tolerance[k]}"
            for k in tolerance if not disagreement[k] <= tolerance[k]]


def non_finite_losses(metrics_files) -> list[str]:
    """Lines of metrics.jsonl files whose loss figures are not finite, as 'file: epoch E iter I key=value'."""
    found = []
    for path in metrics_files:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            for key, value in record.items():
                if "loss" in key and isinstance(value, int | float) and not math.isfinite(value):
                    found.append(f"{path}: epoch {record.get('epoch')} iter {record.get('iter', '-')} {key}={value}")
    return found


def throughput(run_dir: Path) -> dict:
    """{stage: training-split images per second of the whole stage} from the stage manifests."""
    from wsss.data.voc import VOCDataset

    out = {}
    for stage in STAGES:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        config = manifest["config"]
        images = len(VOCDataset(config["data"], config["train_split"], limit=config.get("limit") or 0))
        out[stage] = round(images / max(manifest["seconds"], 1e-3), 2)
    return out


def check_cams(run_dir: Path, amp: str) -> dict:
    """CPU float32 vs GPU `amp` CAMs of step 1's classifier on the first CAM_IMAGES training images."""
    import torch

    from wsss import io
    from wsss.cam import multiscale_cams
    from wsss.data.voc import VOCDataset
    from wsss.models.classifier import build_classifier

    config = json.loads((run_dir / "stage1" / "config.json").read_text())
    dataset = VOCDataset(config["data"], config["train_split"], limit=config.get("limit") or 0)
    model = build_classifier(config["backbone"], dataset.num_classes - 1, output_stride=config["output_stride"],
                             weights=None)
    model.load_state_dict(io.load_checkpoint(run_dir / "stage1" / "step1" / "checkpoint.pt")["model"])
    ids = [i for i in dataset.ids if dataset.labels(i).any()][:CAM_IMAGES]
    scales = [float(s) for s in config["cam_scales"]]
    cpu = [multiscale_cams(model, dataset.image(i), dataset.label_ids(i), scales, True, "cpu") for i in ids]
    gpu = [multiscale_cams(model, dataset.image(i), dataset.label_ids(i), scales, True, torch.device("cuda"), amp)
           for i in ids]
    return cam_disagreement(cpu, gpu)


def run_one(preset: str, amp: str, data: Path, outputs: Path) -> dict:
    """Stages 1-3 of one preset in smoke size under `amp`: images/s, peak memory, problems."""
    import torch

    from stages import stage1, stage2, stage3

    run = f"{preset}-{amp}"
    argv = ["--preset", preset, "--smoke", "--amp", amp, "--device", "cuda", "--data", str(data),
            "--run", run, "--outputs", str(outputs), "--train-split", "train", "--val-split", "val"]
    result: dict = {"peak_memory_mib": {}, "problems": []}
    for name, main in zip(STAGES, (stage1.main, stage2.main, stage3.main), strict=True):
        torch.cuda.reset_peak_memory_stats()
        try:
            main(argv)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a failed stage is this check's finding
            result["problems"].append(f"{name}: {type(e).__name__}: {e}")
            return result
        result["peak_memory_mib"][name] = round(torch.cuda.max_memory_allocated() / 2**20)
    run_dir = outputs / run
    result["images_per_s"] = throughput(run_dir)
    result["problems"] += non_finite_losses(sorted(run_dir.rglob("metrics.jsonl")))
    result["cam_disagreement"] = check_cams(run_dir, amp)
    result["problems"] += cam_problems(result["cam_disagreement"])
    return result


def main(argv=None) -> int:
    from wsss import preset
    from wsss.run import cuda_problem

    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=preset.names())
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--size", type=int, default=440, help="synthetic image side (440: about 500x375, VOC's)")
    args = p.parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(f"gpu-check: SKIPPED, no CUDA here: {problem}")
        return 0
    import torch

    from wsss.data.synthetic import generate

    t0 = time.time()
    results: dict = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        data = Path(tmp) / "voc-res"
        generate(data, 0, 16, 8, args.size, None, False)
        for name in args.presets:
            for amp in args.precisions:
                if amp == "bf16" and not torch.cuda.is_bf16_supported():
                    results[f"{name}/{amp}"] = {"skipped": "this GPU has no bfloat16"}
                    continue
                t = time.time()
                r = run_one(name, amp, data, Path(tmp) / "outputs")
                r["seconds"] = round(time.time() - t, 1)
                results[f"{name}/{amp}"] = r
                failed |= bool(r["problems"])
                print(f"{name:12s} {amp}: images/s {r.get('images_per_s')}, peak MiB {r['peak_memory_mib']}, "
                      f"CAM diff {r.get('cam_disagreement')}, {r['seconds']} s"
                      + "".join(f"\n  FAIL {m}" for m in r["problems"]))
    seconds = round(time.time() - t0, 1)
    if seconds > BUDGET_S:
        print(f"gpu-check: took {seconds} s, over its {BUDGET_S} s budget")
        failed = True
    write_result("gpu_check", {"machine": machine_info(("torch",), gpu=torch.cuda.get_device_name(),
                                                       cuda=torch.version.cuda,
                                                       cudnn=torch.backends.cudnn.version()),
                               "cam_tolerance": CAM_TOLERANCE, "seconds": seconds, "results": results,
                               "passed": not failed})
    print("gpu-check:", "FAILED" if failed else f"passed in {seconds} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
