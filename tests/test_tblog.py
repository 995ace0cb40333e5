"""--tensorboard: the training loop's curves and a stage's val pictures as TensorBoard events."""
import builtins

import numpy as np
import pytest

from tests.test_train import train
from wsss import tblog
from wsss.errors import WsssError


def test_curves_and_pictures_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tblog.start(tmp_path)
    try:
        train(tmp_path / "net", epochs=2, evaluate=lambda model: {"val_score": 0.5})
        tblog.images("net/val", [np.zeros((8, 12, 3), np.uint8)])
    finally:
        tblog.stop()
    events = EventAccumulator(str(tmp_path / tblog.FOLDER))
    events.Reload()
    tags = events.Tags()
    assert {"train/epoch/loss", "train/epoch/val_score", "train/iter/loss", "train/iter/lr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/epoch/loss")] == [1, 2]
    assert "net/val/0" in tags["images"]


def test_without_tensorboard_the_flag_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(WsssError, match="pip install tensorboard"):
        tblog.start(tmp_path)
    assert not tblog.active()
