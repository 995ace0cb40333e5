"""The shared training loop (wsss.train.fit): resume, metrics, determinism."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsss.train import CHECKPOINT, METRICS, TrainConfig, fit, read_metrics

torch.set_num_threads(2)


class NoiseSet:
    """Eight items whose inputs come from the per-item rng (as augmentation does)."""

    def __len__(self):
        return 8

    def item(self, index, rng):
        x = rng.normal(size=4).astype(np.float32)
        return {"x": x, "y": np.float32(x.sum() + index)}


class Interrupted(Exception):
    pass


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def train(out_dir, epochs=4, seed=0, stop_at=None, seen=None, evaluate=None):
    """fit() a linear model; stop_at=(epoch, iteration), both 0-based, raises there as a kill would.
    `seen` collects the epoch of every iteration."""
    seen = [] if seen is None else seen

    def step(model, batch, epoch):
        if stop_at == (epoch, seen.count(epoch)):
            raise Interrupted
        seen.append(epoch)
        loss = ((model(batch["x"]).squeeze(1) - batch["y"]) ** 2).mean()
        return loss, {"half_loss": loss.item() / 2}

    config = TrainConfig(epochs=epochs, batch_size=2, lr=0.01, device="cpu", seed=seed)
    return fit(make_model(), NoiseSet(), step, out_dir, config, evaluate=evaluate)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = state(train(tmp_path / "a", epochs=2))
    b = state(train(tmp_path / "b", epochs=2))
    c = state(train(tmp_path / "c", epochs=2, seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_after_interruption_continues_at_the_right_epoch(tmp_path):
    reference = state(train(tmp_path / "ref", epochs=4))
    seen: list[int] = []
    with pytest.raises(Interrupted):  # killed during the third epoch (0-based 2), after 2 iterations of it
        train(tmp_path / "run", epochs=4, stop_at=(2, 2), seen=seen)
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)["epoch"] == 2
    seen = []
    resumed = state(train(tmp_path / "run", epochs=4, seen=seen))
    assert seen[0] == 2 and sorted(set(seen)) == [2, 3]  # the interrupted epoch is redone, not the first two
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)  # as if never interrupted


def test_metrics_one_line_per_epoch_after_resume(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(out, epochs=4, stop_at=(3, 0))
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]
    # a line of an epoch the checkpoint does not hold (e.g. written by an older, longer run) is replaced
    state_ = torch.load(out / CHECKPOINT, weights_only=False)
    state_["epoch"] = 2
    torch.save(state_, out / CHECKPOINT)
    train(out, epochs=4, evaluate=lambda model: {"score": 1.0})
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    records = [r for r in lines if "iter" not in r]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    iterations = [r["iter"] for r in lines if "iter" in r]  # the "iter" lines of redone epochs are replaced too
    assert iterations == sorted(set(iterations)) and iterations[0] == 1
    assert "score" not in records[1] and records[2]["score"] == 1.0 and records[3]["score"] == 1.0
    assert {"loss", "half_loss", "seconds"} <= set(records[3])


def test_finished_training_returns_at_once(tmp_path):
    train(tmp_path / "run", epochs=2)
    seen: list[int] = []
    train(tmp_path / "run", epochs=2, seen=seen)
    assert seen == []


@pytest.mark.parametrize("cls_branch", [False, True])
def test_every_parameter_gets_a_gradient_so_ddp_needs_no_unused_parameter_search(cls_branch):
    """wsss.train runs DDP with find_unused_parameters=False: a net whose loss leaves a parameter
    out would hang DDP's gradient reduction."""
    import warnings

    from wsss.models.classifier import build_classifier
    from wsss.models.segnet import build_segnet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nets = [build_segnet("efficientnet-lite0", 4, cls_branch=cls_branch, weights=None)]
        if not cls_branch:
            nets.append(build_classifier("efficientnet-lite0", 3, weights=None))
    for net in nets:
        out = net(torch.randn(2, 3, 64, 64))
        loss = out.sum() if torch.is_tensor(out) else sum(v.float().sum() for v in out.values())
        loss.backward()
        assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []


def kill_between_the_writes_of(monkeypatch, epoch: int) -> None:
    """Kill fit() right after the first of the two writes that end `epoch` (its metrics line and its
    checkpoint), whichever comes first."""
    from wsss import io
    from wsss import train as train_module

    real_save, real_append = io.save_checkpoint, train_module._append_metrics

    def then_kill(real, is_epoch):
        def write(*args, **kwargs):
            real(*args, **kwargs)
            if is_epoch(*args):
                raise Interrupted
        return write

    monkeypatch.setattr(io, "save_checkpoint", then_kill(real_save, lambda path, state: state["epoch"] == epoch))
    monkeypatch.setattr(train_module, "_append_metrics",
                        then_kill(real_append, lambda path, records: records[-1]["epoch"] == epoch))


@pytest.mark.parametrize("epochs, killed", [(1, 1), (2, 2), (3, 2)])
def test_kill_between_checkpoint_and_metrics_line_resumes_to_the_same_result(tmp_path, monkeypatch, epochs, killed):
    from wsss.train import epoch_metrics

    reference = state(train(tmp_path / "ref", epochs=epochs))
    with monkeypatch.context() as m:
        kill_between_the_writes_of(m, killed)
        with pytest.raises(Interrupted):
            train(tmp_path / "run", epochs=epochs)
    resumed = state(train(tmp_path / "run", epochs=epochs))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == (tmp_path / "ref" / CHECKPOINT).read_bytes()
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert (strip(read_metrics(tmp_path / "run", iterations=True))
            == strip(read_metrics(tmp_path / "ref", iterations=True)))
    assert epoch_metrics(tmp_path / "run", epochs)["loss"] == read_metrics(tmp_path / "ref")[-1]["loss"]


def test_a_checkpoint_whose_epoch_has_no_metrics_line_is_refused(tmp_path):
    from wsss.stage import StageError
    from wsss.train import epoch_metrics

    train(tmp_path / "run", epochs=2)
    lines = (tmp_path / "run" / METRICS).read_text().splitlines()
    (tmp_path / "run" / METRICS).write_text("".join(f"{line}\n" for line in lines if json.loads(line)["epoch"] < 2))
    with pytest.raises(StageError, match=r"checkpoint\.pt.* epoch 2 .*metrics\.jsonl.*--force"):
        train(tmp_path / "run", epochs=2)
    with pytest.raises(StageError, match=r"metrics\.jsonl: no line for epoch 2"):
        epoch_metrics(tmp_path / "run", 2)
