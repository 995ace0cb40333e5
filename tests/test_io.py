import os

import numpy as np
import pytest
from PIL import Image

from wsss import io


def test_mask_roundtrip_is_a_palette_png(tmp_path):
    mask = np.array([[0, 1, 2], [20, 255, 7]], dtype=np.uint8)
    path = tmp_path / "m.png"
    io.write_mask(path, mask)
    img = Image.open(path)
    assert img.mode == "P"
    assert np.array_equal(np.asarray(img.getpalette()[:9]), [0, 0, 0, 128, 0, 0, 0, 128, 0])
    assert np.array_equal(io.read_mask(path), mask)


def test_plain_grey_mask_reads_the_same(tmp_path):
    mask = np.array([[0, 3], [255, 1]], dtype=np.uint8)
    Image.fromarray(mask, mode="L").save(tmp_path / "g.png")
    assert np.array_equal(io.read_mask(tmp_path / "g.png"), mask)


def test_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "out.npy"

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise Boom
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_interrupted_write_keeps_the_previous_version(tmp_path):
    target = tmp_path / "a.json"
    io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("{broken")
            raise RuntimeError
    assert io.read_json(target) == {"v": 1}


def test_corrupt_image_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        io.read_image(bad)


def test_checkpoint_roundtrip(tmp_path):
    torch = pytest.importorskip("torch")
    io.save_checkpoint(tmp_path / "c.pt", {"w": torch.arange(3), "epoch": 2})
    state = io.load_checkpoint(tmp_path / "c.pt")
    assert state["epoch"] == 2 and state["w"].tolist() == [0, 1, 2]
