"""The CPU side of bench/gpu_check.py: its verdicts, and its skip without CUDA."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import gpu_check


def test_cam_disagreement_is_measured_and_judged_against_the_tolerance():
    a = [np.zeros((1, 4, 4), np.float32), np.ones((2, 3, 3), np.float32)]
    same = gpu_check.cam_disagreement(a, [x.copy() for x in a])
    assert same == {"mean_abs": 0.0, "max_abs": 0.0} and gpu_check.cam_problems(same) == []
    b = [a[0] + 0.5, a[1]]
    off = gpu_check.cam_disagreement(a, b)
    assert off["max_abs"] == pytest.approx(0.5)
    assert any("max_abs" in p for p in gpu_check.cam_problems(off))
    assert gpu_check.cam_problems({"mean_abs": float("nan"), "max_abs": 0.0})  # NaN never passes
    with pytest.raises(ValueError, match="shapes differ"):
        gpu_check.cam_disagreement(a, [a[0][:, :2], a[1]])


def test_non_finite_losses_are_found_in_metrics(tmp_path):
    good, bad = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    good.write_text(json.dumps({"epoch": 1, "iter": 1, "loss": 0.5}) + "\n")
    bad.write_text(json.dumps({"epoch": 1, "loss": 0.5}) + "\n" + '{"epoch": 2, "iter": 11, "seg_loss": NaN}\n')
    assert gpu_check.non_finite_losses([good]) == []
    found = gpu_check.non_finite_losses([good, bad])
    assert len(found) == 1 and "seg_loss=nan" in found[0] and "iter 11" in found[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without CUDA")
def test_without_cuda_the_check_skips_and_says_why(capsys):
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert "SKIPPED" in out and "CUDA" in out


def test_projection_scales_each_phase_to_a_full_voc_run():
    phases = {"train": {"seconds": 2.0, "images": 100}, "cams": {"seconds": 4.0, "images": 100},
              "epoch-val": {"seconds": 1.0, "images": 0}}
    out = gpu_check.projection("stage1", phases, {"epochs": 5, "ae_steps": 3}, runs=15)
    assert out["train"]["images_per_s"] == 50 and out["train"]["projected_s"] == pytest.approx(15 * 10582 / 50, 0.01)
    assert out["cams"]["projected_s"] == pytest.approx(3 * 10582 / 25, 0.01)
    assert out["epoch-val"]["projected_s"] == 15.0
    psl_plus = gpu_check.projection("stage3", {"targets": {"seconds": 1.0, "images": 10}}, {"psl_plus": True})
    assert psl_plus["targets"]["projected_s"] == pytest.approx(10582 / 10, 0.01)
    samples = [(1.0, 10.0), (2.0, 90.0), (3.0, 50.0)]
    assert gpu_check.utilisation(samples, [("train", 1.5, 3.5), ("cams", 0.0, 1.0)]) == {"train": 70.0, "cams": 10.0}


@pytest.mark.slow
def test_the_check_runs_end_to_end_on_a_cpu_in_smoke_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "write_result", lambda name, result: tmp_path.joinpath("r.json").write_text(
        json.dumps(result, default=str)))
    assert gpu_check.main(["--device", "cpu", "--smoke", "--no-demo", "--presets", "voc-vgg16", "--images", "8",
                           "--size", "64"]) == 0
    out = capsys.readouterr().out
    result = json.loads(tmp_path.joinpath("r.json").read_text())["results"]["voc-vgg16"]
    assert result["problems"] == [] and result["projected_min"] > 0
    assert {"train", "cams"} <= set(result["projection"]["stage1"])
    assert {"saliency", "fusion-crf"} <= set(result["projection"]["stage2"])
    assert {"train", "targets", "predict-val"} <= set(result["projection"]["stage3"])
    assert "projected full VOC run" in out
