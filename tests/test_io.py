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


def test_16_bit_grey_png_is_scaled_to_8_bits(tmp_path):
    grey = np.array([[0, 257 * 100], [257 * 200, 65535]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image = io.read_image(tmp_path / "g16.png")
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    assert image[..., 0].tolist() == [[0, 100], [200, 255]] and (image[..., 0] == image[..., 2]).all()


def test_exif_orientation_is_applied_and_the_size_follows(tmp_path):
    from conftest import make_tiny_voc

    from wsss.data.voc import VOCDataset

    data = make_tiny_voc(tmp_path / "data", n_train=2, n_val=0)
    id_ = VOCDataset(data, "train").ids[0]
    path = data / "JPEGImages" / f"{id_}.jpg"
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # the left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = io.read_image(path)
    assert image.shape == (40, 20, 3)
    assert image[:20].mean() > 200 and image[20:].mean() < 50  # the stored left half is now on top
    assert VOCDataset(data, "train").image_size(id_) == (20, 40)  # (W, H) as shown


def test_a_decompression_bomb_is_a_clean_error_naming_the_file(tmp_path, monkeypatch):
    import torch

    from wsss.data.voc import DatasetError
    from wsss.predict import predict_folder

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels: over twice the limit
    with pytest.raises(ValueError, match=r"bomb\.png: cannot decode image"):
        io.read_image(tmp_path / "bomb.png")
    (tmp_path / "photos").mkdir()
    (tmp_path / "bomb.png").rename(tmp_path / "photos" / "bomb.png")
    with pytest.raises(DatasetError, match=r"photos/bomb\.png: cannot read image .*decompression bomb"):
        predict_folder(torch.nn.Identity(), tmp_path / "photos", tmp_path / "out", ("background", "x"), device="cpu")
