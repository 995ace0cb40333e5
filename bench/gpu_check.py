"""GPU check (`make gpu-check`): is CUDA the fast path? On one GPU, in at most 8 minutes.

1. **The demo at full size** on CUDA: stages 1-3 with their defaults on the embedded dataset, the wall
   time of each stage and the val mIoU, against `DEMO_TARGET_S` and the CPU run's figure.
2. **Each VOC preset at its real crop, batch and scales** (random initial weights: no download) on
   `--images` synthetic photos of about 500x375 (`--size 440`): one epoch a net, two erasing steps.
   Every stage times its phases (`wsss.run.phase`: training, CAMs, saliency, fusion + CRF,
   self-training targets, val predictions); this check reads them from the manifests and reports
   images/s per phase, the GPU's utilisation sampled every 0.5 s (nvidia-smi) during each phase, the
   peak GPU memory of each stage, and a projection of a full VOC run (train_aug 10,582 images, val
   1,449, the preset's epochs and steps) per phase, against `PRESET_TARGET_MIN`.
3. It fails on a non-finite loss in any metrics.jsonl, on a CPU/GPU CAM disagreement over
   `CAM_TOLERANCE` (the step-1 classifier's CAMs of the first images, float32 on the CPU, the run's
   precision on the GPU; a choice, not a measurement: bf16 keeps 8 bits of mantissa), and on a stage
   that fails. Missed speed targets are reported, not failed: they are what this check measures.

Without a working CUDA it says why and exits 0 (skipped). On a GPU machine without internet whose
Python has torch, see README ("GPU check on a machine without internet") for the one command.
Figures go to bench/results/gpu_check.json.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import machine_info, write_result

CAM_TOLERANCE = {"mean_abs": 0.02, "max_abs": 0.25}
CAM_IMAGES = 4
BUDGET_S = 480
STAGES = ("stage1", "stage2", "stage3")
DEMO_TARGET_S = 120
PRESET_TARGET_MIN = {"voc-r101": 60, "voc-vgg16": 45}
UTILISATION_TARGET = 60  # percent, during training and CAM phases
VOC_TRAIN, VOC_VAL = 10582, 1449  # images of train_aug and val
CPU_DEMO_MIOU = 68.2  # the README's fresh-clone demo on 2 CPU cores: the figure CUDA must stay within 1 point of


# ---------------------------------------------------------------- verdicts (tested on the CPU)

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


def full_run_images(stage: str, name: str, config: dict) -> int | None:
    """Images a phase processes in a full VOC run with `config` (the stage's config), or None when
    the phase does not scale with the dataset (per-epoch val: a fixed sample)."""
    epochs = config.get("epochs", 1)
    if stage == "stage1":
        steps = config.get("ae_steps", 1)
        head = config.get("rw_epochs", 0) if config.get("rw") else 0  # the affinity head trains in "train" too
        return {"train": (steps * epochs + head) * VOC_TRAIN, "cams": steps * VOC_TRAIN,
                "affinity-labels": VOC_TRAIN, "random-walk": VOC_TRAIN}.get(name)
    if stage == "stage2":
        return {"saliency": VOC_TRAIN, "fusion-crf": VOC_TRAIN}.get(name)
    nets = 2 if config.get("psl_plus") else 3 if config.get("method") == "stc" else 1
    return {"train": nets * epochs * VOC_TRAIN, "targets": (nets - 1) * VOC_TRAIN, "predict-val": VOC_VAL}.get(name)


def projection(stage: str, phases: dict, config: dict, runs: int = 1) -> dict:
    """{phase: {"images_per_s", "projected_s"}} for a full VOC run, from a stage's measured phases.
    A phase that does not scale with the images (per-epoch val) is projected per run of it:
    `runs` = how many times the full run repeats it over the times this check did."""
    out = {}
    for name, p in phases.items():
        rate = p["images"] / p["seconds"] if p["seconds"] > 0 and p["images"] else None
        images = full_run_images(stage, name, config)
        projected = images / rate if rate and images is not None else p["seconds"] * runs
        out[name] = {"images_per_s": round(rate, 2) if rate else None, "seconds": p["seconds"],
                     "projected_s": round(projected, 1)}
    return out


def utilisation(samples: list[tuple[float, float]], spans: list[tuple[str, float, float]]) -> dict:
    """Mean GPU utilisation (percent) of the samples inside each phase name's spans."""
    out: dict[str, list[float]] = {}
    for name, start, end in spans:
        out.setdefault(name, []).extend(u for t, u in samples if start <= t <= end)
    return {k: round(float(np.mean(v)), 1) if v else None for k, v in out.items()}


# ---------------------------------------------------------------- measuring (needs CUDA)

class Sampler(threading.Thread):
    """GPU utilisation every `every` seconds, from nvidia-smi (none where it is missing)."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.samples, self.stopped = every, [], threading.Event()

    def run(self):
        exe = shutil.which("nvidia-smi")
        while exe and not self.stopped.is_set():
            try:
                out = subprocess.run([exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append((time.time(), float(out.splitlines()[0])))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return
            self.stopped.wait(self.every)


def run_stages(argv: list[str], stage_argv: dict, outputs: Path, run: str) -> dict:
    """Stages 1-3 in this process: per stage its wall seconds, peak GPU memory, manifest, or the failure."""
    import torch

    cuda = torch.cuda.is_available()

    from wsss import io
    from wsss.cli import stage1, stage2, stage3
    from wsss.layout import RunLayout

    result: dict = {"stages": {}, "problems": []}
    for name, main in zip(STAGES, (stage1, stage2, stage3), strict=True):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            main([*argv, *stage_argv.get(name, [])])
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a failed stage is this check's finding
            result["problems"].append(f"{name}: {type(e).__name__}: {e}")
            return result
        manifest = io.read_manifest(RunLayout.of(outputs, run).stage(name))
        result["stages"][name] = {"seconds": round(time.time() - t0, 1),
                                  "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
                                  "phases": manifest["outputs"].get("phases", {}), "config": manifest["config"]}
    result["problems"] += non_finite_losses(sorted((outputs / run).rglob("metrics.jsonl")))
    return result


def check_cams(run_dir: Path, amp: str) -> dict:
    """CPU float32 vs GPU `amp` CAMs of step 1's classifier on the first CAM_IMAGES training images."""
    import torch

    from wsss import io
    from wsss.cam import multiscale_cams
    from wsss.data.voc import VOCDataset
    from wsss.layout import CONFIG, RunLayout
    from wsss.models.classifier import build_classifier

    config = json.loads((RunLayout(run_dir).stage1.path / CONFIG).read_text())
    dataset = VOCDataset(config["data"], config["train_split"], limit=config.get("limit") or 0)
    model = build_classifier(config["backbone"], dataset.num_classes - 1, output_stride=config["output_stride"],
                             weights=None)
    state = io.load_checkpoint(RunLayout(run_dir).stage1.checkpoint(1))["model"]
    model.load_state_dict({k: v.float() for k, v in state.items()})
    ids = [i for i in dataset.ids if dataset.labels(i).any()][:CAM_IMAGES]
    scales = [float(s) for s in config["cam_scales"]]
    cpu = [multiscale_cams(model, dataset.image(i), dataset.label_ids(i), scales, True, "cpu") for i in ids]
    gpu = [multiscale_cams(model, dataset.image(i), dataset.label_ids(i), scales, True, torch.device("cuda"), amp)
           for i in ids]
    return cam_disagreement(cpu, gpu)


def check_demo(tmp: Path, amp: str, device: str = "cuda") -> dict:
    from wsss import io
    from wsss.data.synthetic import generate
    from wsss.layout import RunLayout

    data, outputs = tmp / "synthetic", tmp / "outputs"
    generate(data)  # the embedded dataset, as `make data` writes it
    argv = ["--data", str(data), "--outputs", str(outputs), "--run", "demo", "--device", device, "--amp", amp]
    result = run_stages(argv, {}, outputs, "demo")
    if not result["problems"]:
        result["seconds"] = round(sum(s["seconds"] for s in result["stages"].values()), 1)
        miou = io.read_manifest(RunLayout.of(outputs, "demo").stage3().path)["outputs"].get("val_miou")
        result["val_miou"] = None if miou is None else round(miou, 2)
    result["device"] = device
    return result


def check_preset(preset: str, tmp: Path, images: int, size: int, amp: str, device: str = "cuda",
                 smoke: bool = False) -> dict:
    from wsss.data.synthetic import generate

    data, outputs = tmp / f"voc-res-{images}-{size}", tmp / "outputs"
    generate(data, 0, images, max(16, images // 4), size)
    argv = ["--preset", preset, "--data", str(data), "--outputs", str(outputs), "--run", preset, "--device", device,
            "--amp", amp, "--train-split", "train", "--val-split", "val", *(["--smoke"] if smoke else [])]
    short = {"stage1": ["--weights", "none", "--epochs", "1", "--iterations", "0", "--ae-steps", "2",
                        "--ae-stop-loss", "1000", "--ae-init", "previous"],
             "stage3": ["--weights", "none", "--epochs", "1", "--no-collapse-check"]}
    result = run_stages(argv, short, outputs, preset)
    if result["problems"]:
        return result
    from wsss import preset as presets

    data_ = presets.load(preset)
    full = {s: {k.replace("-", "_"): v for k, v in {**data_.get("common", {}), **data_.get(s, {})}.items()}
            for s in STAGES}
    result["projection"] = {}
    for stage, r in result["stages"].items():
        config = {**r["config"], **full[stage]}  # the preset's epochs and steps, not this check's short ones
        runs = config.get("epochs", 1) * (config.get("ae_steps", 1) if stage == "stage1" else 1)
        result["projection"][stage] = projection(stage, r["phases"], config, runs)
    result["projected_min"] = round(sum(p["projected_s"] for s in result["projection"].values()
                                        for p in s.values()) / 60, 1)
    if device == "cuda":
        result["cam_disagreement"] = check_cams(outputs / preset, amp)
        result["problems"] += cam_problems(result["cam_disagreement"])
    return result


def report(results: dict, spans, samples) -> list[str]:
    util = utilisation(samples, spans)
    lines = []
    demo = results.get("demo")
    if demo and not demo["problems"]:
        per = ", ".join(f"{k} {v['seconds']} s" for k, v in demo["stages"].items())
        lines.append(f"demo on {demo.get('device', 'cuda')}: {demo['seconds']} s ({per}; target <= {DEMO_TARGET_S} s); "
                     f"val mIoU {demo.get('val_miou')} (CPU {CPU_DEMO_MIOU}, within 1 point wanted)")
    for name, r in results.items():
        if name == "demo" or r["problems"]:
            continue
        lines.append(f"{name}: projected full VOC run {r['projected_min']} min (target <= "
                     f"{PRESET_TARGET_MIN.get(name, '-')} min); peak GPU MiB "
                     + ", ".join(f"{s} {v['peak_memory_mib']}" for s, v in r["stages"].items()))
        lines.append("| stage | phase | images/s | seconds here | projected s |")
        lines.append("|---|---|---|---|---|")
        for stage, phases in r["projection"].items():
            for phase, p in phases.items():
                lines.append(f"| {stage} | {phase} | {p['images_per_s']} | {p['seconds']} | {p['projected_s']} |")
    lines.append("GPU utilisation by phase (percent of 0.5-s samples; target >= "
                 f"{UTILISATION_TARGET} in train and cams): {util or 'no nvidia-smi samples'}")
    for name, r in results.items():
        lines += [f"FAIL {name}: {m}" for m in r["problems"]]
    return lines


def main(argv=None) -> int:
    from wsss import preset
    from wsss.run import cuda_problem, phase_spans

    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="*", default=[n for n in preset.names() if n in PRESET_TARGET_MIN])
    p.add_argument("--images", type=int, default=256, help="training images of each preset's run (val: a quarter)")
    p.add_argument("--size", type=int, default=440, help="synthetic image side (440: about 500x375, VOC's)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--no-demo", action="store_true", help="skip the demo at full size")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: the same measurements on this CPU (with --smoke: the check's own test)")
    p.add_argument("--smoke", action="store_true", help="the presets in smoke size (tiny crops, 8 images)")
    args = p.parse_args(argv)
    problem = cuda_problem() if args.device == "cuda" else None
    if problem:
        print(f"gpu-check: SKIPPED, no CUDA here: {problem}")
        return 0
    import torch

    t0 = time.time()
    sampler = Sampler()
    sampler.start()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if not args.no_demo:
            results["demo"] = check_demo(Path(tmp), args.amp, args.device)
        for name in args.presets:
            results[name] = check_preset(name, Path(tmp), args.images, args.size, args.amp, args.device, args.smoke)
    sampler.stopped.set()
    seconds = round(time.time() - t0, 1)
    lines = report(results, phase_spans(), sampler.samples)
    failed = any(r["problems"] for r in results.values())
    if seconds > BUDGET_S:
        lines.append(f"gpu-check took {seconds} s, over its {BUDGET_S} s budget")
    print("\n".join(lines))
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    write_result("gpu_check" if args.device == "cuda" else "gpu_check-cpu",
                 {"machine": machine_info(("torch",), gpu=gpu, cuda=torch.version.cuda,
                                          cudnn=torch.backends.cudnn.version()),
                               "seconds": seconds, "results": results, "report": lines,
                               "utilisation": utilisation(sampler.samples, phase_spans()),
                               "samples": sampler.samples, "passed": not failed})
    print("gpu-check:", "FAILED" if failed else f"passed in {seconds} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
