"""Training never fails silently, and the stage-3 defaults learn on more than one dataset.

The defaults test trains the fully supervised bound (`--masks gt`, every stage-3 default but the
budget) on two small datasets: the embedded one and a VOC-like one painted on real VOC layouts (20
classes, small objects; `wsss.data.voclike`, needs ../shared/voc12). With the defaults of before
(lr 0.005, head 0.05, no warm-up, no clipping) the VOC-like net died in its first epoch: every pixel
background, the loss at the constant predictor's level.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss import segment
from wsss.data import synthetic, voclike
from wsss.data.voc import IGNORE, VOCDataset
from wsss.run import common_parser
from wsss.segtrain import collapse_check
from wsss.train import TrainConfig, TrainingCollapsed, fit, read_metrics

torch.set_num_threads(2)
SHARED_VOC = Path(__file__).resolve().parents[2] / "shared" / "voc12"


class Constant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


class Items:
    def __len__(self):
        return 8

    def item(self, index, rng):
        return {"x": torch.ones(1)}


def test_health_problem_stops_training_after_writing_the_epoch(tmp_path):
    def step(model, batch, epoch):
        return (model.w - 1).pow(2).sum(), {}

    with pytest.raises(TrainingCollapsed, match="dead net.*after epoch 2"):
        config = TrainConfig(epochs=3, batch_size=2, lr=0.1, device="cpu", seed=0, log_every=1)
        fit(Constant(), Items(), step, tmp_path, config, health=lambda r: "dead net" if r["epoch"] == 2 else None)
    epochs = read_metrics(tmp_path)
    assert [r["epoch"] for r in epochs] == [1, 2]  # the failing epoch is on record ...
    assert torch.load(tmp_path / "checkpoint.pt")["epoch"] == 1  # ... but not resumed from
    iterations = [r for r in read_metrics(tmp_path, iterations=True) if "iter" in r]
    assert [r["iter"] for r in iterations] == list(range(1, 9))
    assert all({"loss", "lr", "grad_norm"} <= set(r) for r in iterations)


def test_non_finite_gradient_stops_training(tmp_path):
    def step(model, batch, epoch):
        return model.w.sum() * 0 + torch.sqrt(model.w - model.w.detach()).sum(), {}  # finite loss, infinite gradient

    with pytest.raises(FloatingPointError, match="gradient norm became (nan|inf) at epoch 1, iteration 1 of 4"):
        fit(Constant(), Items(), step, tmp_path, TrainConfig(epochs=1, batch_size=2, lr=0.1, device="cpu", seed=0))


def test_deferred_checks_catch_a_non_finite_loss_at_the_next_read(tmp_path, monkeypatch):
    """On CUDA the loss and gradient norm stay on the device and are read every log_every iterations
    (train.Loop.check_every): a non-finite one is caught at the next read, which the message names."""
    from wsss import train

    monkeypatch.setattr(train.Loop, "check_every", property(lambda loop: loop.config.log_every))
    calls = []

    def step(model, batch, epoch):
        calls.append(epoch)
        loss = (model.w - 1).pow(2).sum()
        return (loss * math.inf if len(calls) == 2 else loss), {}

    config = TrainConfig(epochs=1, batch_size=2, lr=0.1, device="cpu", seed=0, log_every=2)
    with pytest.raises(FloatingPointError, match=r"non-finite by epoch 1, iteration 3 of 4 \(checked every 2 "):
        fit(Constant(), Items(), step, tmp_path, config)
    assert len(calls) == 3


def test_warmup_and_poly_schedule():
    from wsss.train import scheduled_lr

    assert scheduled_lr(1.0, 0, 100, warmup=10) == pytest.approx(0.1)
    assert scheduled_lr(1.0, 9, 100, warmup=10) == pytest.approx((1 - 0.09) ** 0.9)
    assert scheduled_lr(1.0, 50, 100) == pytest.approx(0.5 ** 0.9)


def test_collapse_check_needs_both_one_class_and_a_constant_loss():
    health = collapse_check(1.5, min_steps=100, class_names=("background", "cat"))
    dead = {"steps": 100, "loss": 1.45, "val_classes": 1, "val_class": 0}
    message = health(dead)
    assert "'background' for every pixel" in message and "--lr" in message and "--warmup" in message
    assert health({**dead, "val_classes": 2}) is None
    assert health({**dead, "loss": 0.6}) is None  # learning, not yet on val
    assert health({**dead, "steps": 99, "loss": 3.0}) is None  # still warming up
    assert collapse_check(None, min_steps=100)(dead) is None  # soft targets


def gt_bound(data: Path, outputs: Path, epochs: int) -> dict:
    """Stage 3 `--masks gt` with the default net and optimiser; only the budget is small."""
    parser = common_parser("test")
    segment.add_args(parser)
    args = parser.parse_args(["--data", str(data), "--run", "bound", "--outputs", str(outputs), "--device", "cpu",
                              "--workers", "0", "--masks", "gt", "--epochs", str(epochs), "--crop", "96"])
    result = segment.run(args)
    lines = [json.loads(x) for x in (outputs / "bound" / "stage3" / "gt" / "metrics.jsonl").read_text().splitlines()]
    return {"miou": result["miou"], "classes": [r["val_classes"] for r in lines if "iter" not in r]}


def all_background_miou(data: Path) -> float:
    """val mIoU of a net that says background everywhere: background IoU over the classes in val."""
    val = VOCDataset(data, "val")
    counts = np.bincount(np.concatenate([val.mask(i).ravel() for i in val.ids]), minlength=256)[:IGNORE]
    return 100 * counts[0] / counts.sum() / (counts > 0).sum()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dataset", ["embedded", "voclike"])
def test_default_gt_bound_learns(dataset, tmp_path):
    if dataset == "voclike":
        if not (SHARED_VOC / "SegmentationClassAug").is_dir():
            pytest.skip("../shared/voc12 is not here")
        data = tmp_path / "voclike"
        voclike.generate(SHARED_VOC, data, n_train=96, n_val=48, scale=0.4, workers=1)
    else:
        data = tmp_path / "synthetic"
        synthetic.generate(data, n_train=96, n_val=48, size=128, workers=1)
    bound = gt_bound(data, tmp_path / "outputs", epochs=16)  # 16 x 12 = 192 SGD steps
    assert bound["classes"][-1] > 1, bound
    assert bound["miou"] > 2 * all_background_miou(data), bound
