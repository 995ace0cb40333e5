"""Data files and checkpoints are data, never code: a crafted cls_labels.npy or checkpoint.pt is
refused with an error naming the file, and what it would have run does not run."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from wsss import io, predict
from wsss.data.importer import main as import_main
from wsss.data.voc import DatasetError, VOCDataset, read_label_file


class Payload:
    """Unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def crafted_labels(path, marker) -> None:
    labels = {"tiny_000": np.array([1, 0, 0], np.float32), "tiny_001": Payload(marker)}
    np.save(path, labels, allow_pickle=True)


def test_crafted_cls_labels_is_refused_and_runs_nothing(tiny_voc, tmp_path):
    marker = tmp_path / "pwned"
    crafted_labels(tiny_voc / "cls_labels.npy", marker)
    with pytest.raises(DatasetError, match=r"cls_labels\.npy: .*(posix|os)\.system"):
        VOCDataset(tiny_voc, "train")
    assert not marker.exists()


def test_crafted_cls_labels_in_the_importer_is_refused(tiny_voc, tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted_labels(tmp_path / "cls_labels.npy", marker)
    assert import_main(["--images", str(tiny_voc / "JPEGImages"), "--labels", str(tmp_path / "cls_labels.npy"),
                        "--out", str(tmp_path / "ds")]) == 1
    assert "cls_labels.npy" in capsys.readouterr().err
    assert not marker.exists()


def test_cls_labels_of_every_known_form_still_load(tmp_path):
    labels = {"a": np.array([1, 0], np.float32), 2007000032: np.array([0.0, 1.0]), "c": [np.float32(1), 0]}
    np.save(tmp_path / "cls_labels.npy", labels, allow_pickle=True)
    got = read_label_file(tmp_path / "cls_labels.npy")
    assert set(got) == {"a", "2007_000032", "c"}
    assert got["a"].tolist() == [1, 0] and got["2007_000032"].tolist() == [0, 1] and list(got["c"]) == [1, 0]
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(DatasetError, match=r"plain\.npy: expected a dict"):
        read_label_file(tmp_path / "plain.npy")


def test_crafted_checkpoint_is_refused_by_predict(tmp_path, tiny_voc, capsys):
    marker = tmp_path / "pwned"
    stage = tmp_path / "o" / "r" / "stage3"
    io.write_json(stage / "config.json", {"val_split": "val", "data": str(tiny_voc)})
    io.write_manifest(stage, {}, outputs={"final_net": "net"})
    (stage / "net").mkdir()
    torch.save({"model": {}, "epoch": 1, "x": Payload(marker)}, stage / "net" / "checkpoint.pt")
    assert predict.main(["--outputs", str(tmp_path / "o"), "--run", "r", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "net/checkpoint.pt" in err and "Traceback" not in err
    assert not marker.exists()


def test_every_checkpoint_the_project_writes_loads_without_pickle(tmp_path):
    from test_train import Interrupted, train

    with pytest.raises(Interrupted):  # killed in epoch 2: epoch 1's checkpoint holds the optimizer state
        train(tmp_path / "mid", epochs=3, stop_at=(1, 0))
    mid = torch.load(tmp_path / "mid" / "checkpoint.pt", weights_only=True)
    assert mid["epoch"] == 1 and "optimizer" in mid
    train(tmp_path / "done", epochs=1)
    assert torch.load(tmp_path / "done" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert io.load_checkpoint(tmp_path / "mid" / "checkpoint.pt")["epoch"] == 1
