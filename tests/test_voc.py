from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss import io
from wsss.data.voc import VOC_CLASSES, DatasetError, VOCDataset, main, prepare

SHARED_VOC = Path(__file__).resolve().parents[2] / "shared" / "voc12"


def make_dataset(root: Path, n=4, names=("background", "disc", "square"), labels_file=True):
    """A tiny VOC-layout dataset: image i holds class (i % 2) + 1."""
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "class_names.txt").write_text("\n".join(names) + "\n")
    ids, labels = [], {}
    for i in range(n):
        id_ = f"img{i}"
        image = np.full((24, 32, 3), 90, np.uint8)
        mask = np.zeros((24, 32), np.uint8)
        mask[5:15, 8:20] = i % 2 + 1
        mask[4, 8:20] = 255
        image[mask == i % 2 + 1] = (200, 30, 30)
        Image.fromarray(image).save(_mkdir(root / "JPEGImages") / f"{id_}.jpg", quality=95)
        io.write_mask(root / "SegmentationClassAug" / f"{id_}.png", mask)
        label = np.zeros(len(names) - 1, np.float32)
        label[i % 2] = 1
        labels[id_] = label
        ids.append(id_)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    if labels_file:
        np.save(root / "cls_labels.npy", labels)
    return ids


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_loads_images_masks_labels_and_class_names(tmp_path):
    ids = make_dataset(tmp_path)
    ds = VOCDataset(tmp_path, "train")
    assert ds.ids == ids and len(ds) == 4
    assert ds.class_names == ("background", "disc", "square") and ds.num_classes == 3
    item = ds[1]
    assert item["image"].shape == (24, 32, 3) and item["image"].dtype == np.uint8
    assert set(np.unique(item["mask"])) == {0, 2, 255}
    assert item["label"].tolist() == [0, 1]
    assert ds.label_ids("img1").tolist() == [2]
    ds.check(need_mask=True)


def test_labels_from_masks_when_no_label_file(tmp_path):
    make_dataset(tmp_path, labels_file=False)
    ds = VOCDataset(tmp_path, "train")
    assert ds.labels("img0").tolist() == [1, 0]
    assert ds.labels("img3").tolist() == [0, 1]


def test_labels_from_xml_annotations(tmp_path):
    make_dataset(tmp_path, labels_file=False)
    (tmp_path / "SegmentationClassAug" / "img0.png").unlink()
    ann = _mkdir(tmp_path / "Annotations")
    (ann / "img0.xml").write_text("<annotation><object><name>square</name></object>"
                                  "<object><name>disc</name></object></annotation>")
    assert VOCDataset(tmp_path, "train").labels("img0").tolist() == [1, 1]


def test_voc_class_names_by_default(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "class_names.txt").unlink()
    assert VOCDataset(tmp_path, "train").class_names == VOC_CLASSES


@pytest.mark.parametrize("breakage, message", [
    (lambda r: (r / "JPEGImages" / "img2.jpg").unlink(), "img2.jpg: image not found"),
    (lambda r: (r / "JPEGImages" / "img2.jpg").write_bytes(b"garbage"), "img2.jpg: cannot decode"),
    (lambda r: (r / "SegmentationClassAug" / "img2.png").write_bytes(b"garbage"), "img2.png: cannot read mask"),
    (lambda r: io.write_mask(r / "SegmentationClassAug" / "img2.png", np.zeros((10, 10), np.uint8)),
     "img2.png: mask size 10x10 differs from image size 32x24"),
    (lambda r: io.write_mask(r / "SegmentationClassAug" / "img2.png", np.full((24, 32), 7, np.uint8)),
     r"img2.png: label ids \[7\] outside 0..2"),
    (lambda r: (r / "ImageSets" / "Segmentation" / "train.txt").write_text("\n"), "train.txt: the list is empty"),
])
def test_bad_input_names_the_file(tmp_path, breakage, message):
    make_dataset(tmp_path)
    breakage(tmp_path)
    with pytest.raises(DatasetError, match=message):
        VOCDataset(tmp_path, "train").check(need_mask=True)


def test_missing_mask_is_reported_when_masks_are_needed(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "SegmentationClassAug" / "img3.png").unlink()
    with pytest.raises(DatasetError, match="img3.png: mask not found"):
        VOCDataset(tmp_path, "train").check(need_mask=True)


def test_check_command_exit_codes(tmp_path, capsys):
    make_dataset(tmp_path)
    assert main(["check", "--root", str(tmp_path), "--split", "train", "--need-mask"]) == 0
    (tmp_path / "JPEGImages" / "img0.jpg").unlink()
    assert main(["check", "--root", str(tmp_path), "--split", "train"]) == 1
    assert "img0.jpg" in capsys.readouterr().err


def test_prepare_builds_train_aug_from_voc_and_sbd(tmp_path):
    from scipy.io import savemat

    voc, sbd = tmp_path / "VOC2012", tmp_path / "sbd"
    seg = _mkdir(voc / "ImageSets" / "Segmentation")
    seg.joinpath("train.txt").write_text("a\n")
    seg.joinpath("val.txt").write_text("v\n")
    for id_, cls in (("a", 3), ("v", 5)):
        m = np.zeros((8, 8), np.uint8)
        m[2:5, 2:5] = cls
        io.write_mask(voc / "SegmentationClass" / f"{id_}.png", m)
    _mkdir(sbd / "cls")
    for id_, cls in (("s1", 12), ("v", 1), ("a", 9)):  # SBD's copies of a and v must not win / leak
        m = np.zeros((8, 8), np.uint8)
        m[1:3, 1:3] = cls
        savemat(sbd / "cls" / f"{id_}.mat", {"GTcls": {"Segmentation": m}})
    (sbd / "train.txt").write_text("s1\na\n")
    (sbd / "val.txt").write_text("v\n")
    prepare(voc, sbd)
    assert seg.joinpath("train_aug.txt").read_text().split() == ["a", "s1"]
    labels = np.load(voc / "cls_labels.npy", allow_pickle=True).item()
    assert np.flatnonzero(labels["s1"]).tolist() == [11]
    assert np.flatnonzero(labels["a"]).tolist() == [2]
    assert io.read_mask(voc / "SegmentationClassAug" / "s1.png")[1, 1] == 12


@pytest.mark.skipif(not SHARED_VOC.is_dir(), reason="../shared/voc12 not present")
def test_real_voc_layout():
    ds = VOCDataset(SHARED_VOC, "photos")
    assert ds.num_classes == 21 and len(ds) == 48
    for id_ in ds.ids[:6]:
        ds.check_one(id_, need_mask=True)
        mask = ds.mask(id_)
        present = set(np.unique(mask).tolist()) - {0, 255}
        assert set(ds.label_ids(id_).tolist()) == present
    val = VOCDataset(SHARED_VOC, "val")
    assert len(val) == 1449 and val.has_mask(val.ids[0])


@pytest.mark.parametrize("content, message", [
    (b"background\ndisc\nsquare\ndisc\n", r"class_names\.txt: line 4: 'disc' is listed twice"),
    (b"background\ndisc\n\xff\xfe\n", r"class_names\.txt: not UTF-8"),
])
def test_bad_class_names_are_clear_errors(tiny_voc, content, message):
    (tiny_voc / "class_names.txt").write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        VOCDataset(tiny_voc, "train")


def test_a_utf16_class_names_file_is_decoded(tiny_voc):
    names = (tiny_voc / "class_names.txt").read_text()
    (tiny_voc / "class_names.txt").write_text(names, encoding="utf-16")
    assert VOCDataset(tiny_voc, "train").class_names == tuple(names.split())


def test_a_dataset_error_keeps_its_one_line_message_from_a_worker():
    """torch rebuilds a DataLoader worker's error from its traceback text; a process pool pickles it."""
    import pickle

    from wsss.stage import error_line

    text = ("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "wsss/data/voc.py", line 1, in image\nwsss.errors.DatasetError: a.png: cannot read image')
    assert DatasetError(text).message == "a.png: cannot read image" == error_line(DatasetError(text))
    sent = pickle.loads(pickle.dumps(DatasetError("b.png: cannot read mask")))
    assert isinstance(sent, DatasetError) and sent.message == "b.png: cannot read mask"
