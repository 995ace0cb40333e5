"""What every benchmark records beside its figures: the machine, the load, the library versions."""
from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from wsss.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info(packages=("numpy",), **extra) -> dict:
    """CPU, core counts, load average and versions of `packages` (distribution names)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
        **extra,
    }


def write_result(name: str, result: dict, path: Path | None = None) -> Path:
    """bench/results/<name>.json (or `path`), stamped with the date."""
    path = Path(path) if path else RESULTS / f"{name}.json"
    write_json(path, {**result, "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"wrote {path}")
    return path


def publish(name: str, result: dict, text: str, packages=("numpy",), path: Path | None = None) -> Path:
    """Print a benchmark's table and write its result with the machine it ran on."""
    print(text)
    return write_result(name, {**result, "machine": machine_info(packages)}, path)
