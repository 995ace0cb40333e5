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
