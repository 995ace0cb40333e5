"""A plain (non-editable) install gives a working `wsss` command with its presets, away from the checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_an_installed_package_runs_a_preset_through_its_command(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "data", "build",
                                                                "*.egg-info", ".gpu-deps", ".opencv-contrib",
                                                                "__pycache__", ".*cache"))
    site = tmp_path / "site"  # the package alone; its dependencies come from this environment (no network)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--no-compile", "--target", str(site), str(source)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    command = site / "bin" / "wsss"
    assert command.is_file() and (site / "wsss" / "presets" / "voc-vgg16.json").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    def wsss(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(command), *argv], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)

    where = subprocess.run([sys.executable, "-c", "import wsss; print(wsss.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed copy, not the checkout
    assert "stage1" in wsss("--help").stdout
    assert wsss("synthetic", "--out", "data", "--train", "8", "--val", "4", "--size", "64",
                "--workers", "1").returncode == 0
    run = wsss("stage1", "--preset", "voc-vgg16", "--smoke", "--data", "data", "--train-split", "train",
               "--val-split", "val", "--device", "cpu", "--workers", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = work / "outputs" / "demo" / "stage1" / "manifest.json"
    assert manifest.is_file() and '"backbone": "vgg16"' in manifest.read_text()
