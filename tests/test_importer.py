"""wsss.data.importer: a VOC-layout dataset from a photo folder and labels in the forms people have."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss import io
from wsss.data.importer import import_dataset, main
from wsss.data.voc import VOC_CLASSES, DatasetError, VOCDataset, safe_id

# photo (relative path) -> its tags
PHOTOS = {"cats/tom 1.jpg": ["cat"], "cats/felix.PNG": ["cat", "dog"], "dogs/rex.webp": ["dog"],
          "dogs/deep/fido.jpeg": ["dog", "person"], "walk.jpg": ["person"]}


def make_photos(folder: Path, photos=PHOTOS) -> Path:
    rng = np.random.default_rng(0)
    for i, rel in enumerate(photos):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
        fmt = {".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower(), "JPEG")
        Image.fromarray(image).save(path, format=fmt)
    return folder


def write_csv(path: Path, rows, header="image,labels") -> Path:
    path.write_text("\n".join(([header] if header else []) + rows) + "\n")
    return path


def csv_rows(photos=PHOTOS, sep=";"):
    return [f"{rel},{sep.join(tags)}" for rel, tags in photos.items()]


def assert_dataset(out: Path, names=("background", "cat", "dog", "person")):
    ds_train, ds_val = VOCDataset(out, "train"), VOCDataset(out, "val")
    assert ds_train.class_names == names
    ids = ds_train.ids + ds_val.ids
    assert sorted(ids) == sorted(safe_id(r.rsplit(".", 1)[0]) for r in PHOTOS)
    for rel, tags in PHOTOS.items():
        id_ = safe_id(rel.rsplit(".", 1)[0])
        ds = ds_train if id_ in ds_train.ids else ds_val
        assert [names[i] for i in ds.label_ids(id_)] == sorted(tags, key=names.index)
        ds.check_one(id_)
    return ds_train, ds_val


def test_safe_id():
    assert safe_id("cats/Tom 1") == "cats_Tom_1"
    assert safe_id("../x/été") == "_x__t_"
    assert safe_id(".hidden") == "hidden"


@pytest.mark.parametrize("sep", [";", "|"])
def test_csv_nested_mixed_types(tmp_path, sep):
    images = make_photos(tmp_path / "photos")
    out = tmp_path / "ds"
    assert main(["--images", str(images), "--labels", str(write_csv(tmp_path / "t.csv", csv_rows(sep=sep))),
                 "--out", str(out), "--val-fraction", "0.4"]) == 0
    train, val = assert_dataset(out)
    assert len(val) == 2 and len(train) == 3
    assert (out / "JPEGImages" / "cats_felix.png").is_file() and (out / "JPEGImages" / "dogs_rex.webp").is_file()
    assert not (out / "JPEGImages" / "cats_felix.png").is_symlink()
    assert json.loads((out / "import.json").read_text())["counts"]["images"] == 5


def test_split_is_deterministic_and_link_mode(tmp_path):
    images = make_photos(tmp_path / "photos")
    labels = write_csv(tmp_path / "t.csv", csv_rows())
    import_dataset(images, labels, tmp_path / "a", val_fraction=0.4)
    import_dataset(images, labels, tmp_path / "b", val_fraction=0.4, link=True)
    for split in ("train", "val"):
        assert (tmp_path / "a" / "ImageSets/Segmentation" / f"{split}.txt").read_text() == \
               (tmp_path / "b" / "ImageSets/Segmentation" / f"{split}.txt").read_text()
    linked = tmp_path / "b" / "JPEGImages" / "walk.jpg"
    assert linked.is_symlink() and linked.resolve() == (images / "walk.jpg").resolve()


def test_tsv_names_without_extension_ids_and_extra_columns(tmp_path):
    images = make_photos(tmp_path / "photos")
    rows = ["cats/tom 1\t1", "felix.PNG\t1|2", "rex\tdog", "dogs/deep/fido.jpeg\tdog\tperson", "walk\t3"]
    labels = write_csv(tmp_path / "t.tsv", rows, header=None)
    import_dataset(images, labels, tmp_path / "ds", classes="cat,dog,person")  # ids 1..3 are mask ids
    assert_dataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match=r"t\.tsv row 2: '1' is a class id.*--classes"):  # felix: first path
        import_dataset(images, labels, tmp_path / "ds2")


def test_json_labels_and_classes_file(tmp_path):
    images = make_photos(tmp_path / "photos")
    labels = tmp_path / "t.json"
    labels.write_text(json.dumps(PHOTOS))
    (tmp_path / "classes.txt").write_text("background\nperson\ndog\ncat\nbird\n")
    import_dataset(images, labels, tmp_path / "ds", classes=str(tmp_path / "classes.txt"))
    assert_dataset(tmp_path / "ds", names=("background", "person", "dog", "cat", "bird"))


def test_class_folders(tmp_path):
    photos = {"cat/a.jpg": ["cat"], "cat/b.png": ["cat"], "dog/sub/c.jpg": ["dog"]}
    images = make_photos(tmp_path / "photos", photos)
    import_dataset(images, images, tmp_path / "ds", val_fraction=0)
    ds = VOCDataset(tmp_path / "ds", "train")
    assert ds.class_names == ("background", "cat", "dog")
    assert {i: ds.label_ids(i).tolist() for i in ds.ids} == {"cat_a": [1], "cat_b": [1], "dog_sub_c": [2]}
    assert not (tmp_path / "ds" / "ImageSets/Segmentation/val.txt").exists()
    (images / "loose.jpg").write_bytes((images / "cat/a.jpg").read_bytes())
    with pytest.raises(DatasetError, match=r"loose\.jpg: image has no label"):
        import_dataset(images, images, tmp_path / "ds2")


def test_irn_integer_keyed_npy_and_masks(tmp_path):
    photos = {"2007_000032.jpg": [], "2007_000039.jpg": []}
    images = make_photos(tmp_path / "photos", photos)
    labels = {2007000032: np.eye(20, dtype=np.float32)[0], 2007000039: np.eye(20, dtype=np.float32)[14],
              2011000001: np.eye(20, dtype=np.float32)[3]}  # a photo we do not have: left out
    np.save(tmp_path / "cls_labels.npy", labels)
    masks = tmp_path / "masks"
    masks.mkdir()
    mask = np.zeros((20, 30), np.uint8)
    mask[2:8, 3:9] = 1
    mask[0] = 255
    Image.fromarray(mask).save(masks / "2007_000032.png")  # plain grey: re-written as a palette PNG
    import_dataset(images, tmp_path / "cls_labels.npy", tmp_path / "ds", masks=masks, val_fraction=0)
    ds = VOCDataset(tmp_path / "ds", "train")
    assert ds.class_names == VOC_CLASSES
    assert ds.label_ids("2007_000032").tolist() == [1] and ds.label_ids("2007_000039").tolist() == [15]
    assert np.array_equal(ds.mask("2007_000032"), mask) and not ds.has_mask("2007_000039")
    assert Image.open(ds.mask_path("2007_000032")).mode == "P"


def test_voc_dataset_reads_irn_integer_keys(tiny_voc):
    labels = np.load(tiny_voc / "cls_labels.npy", allow_pickle=True).item()
    np.save(tiny_voc / "cls_labels.npy", {int(k.replace("tiny_", "2007")): v for k, v in labels.items()})
    for name in (tiny_voc / "JPEGImages").iterdir():
        name.rename(name.with_name(name.name.replace("tiny_", "2007_")))
    for split in ("train", "val"):
        path = tiny_voc / "ImageSets/Segmentation" / f"{split}.txt"
        path.write_text(path.read_text().replace("tiny_", "2007_"))
    ds = VOCDataset(tiny_voc, "train")
    assert ds.labels("2007_000").tolist() == labels["tiny_000"].tolist()


def test_voc_annotations_folder(tmp_path):
    images = make_photos(tmp_path / "photos", {"a.jpg": [], "b.jpg": []})
    ann = tmp_path / "Annotations"
    ann.mkdir()
    for stem, objs in (("a", ["dog", "person"]), ("b", ["cat"]), ("zzz", ["cow"])):
        body = "".join(f"<object><name>{o}</name></object>" for o in objs)
        (ann / f"{stem}.xml").write_text(f"<annotation><filename>{stem}.jpg</filename>{body}</annotation>")
    import_dataset(images, ann, tmp_path / "ds", classes="voc", val_fraction=0)
    ds = VOCDataset(tmp_path / "ds", "train")
    assert [ds.class_names[i] for i in ds.label_ids("a")] == ["dog", "person"]
    assert [ds.class_names[i] for i in ds.label_ids("b")] == ["cat"]


BAD = [
    ("unknown class", csv_rows()[:-1] + ["walk.jpg,persn"], "cat,dog,person",
     r"t\.csv row 6 \(walk\.jpg\): unknown class 'persn'"),
    ("unknown id", csv_rows()[:-1] + ["walk.jpg,9"], "cat,dog,person", r"row 6 \(walk\.jpg\): unknown class id 9"),
    ("missing image", csv_rows() + ["nope.jpg,cat"], None, r"t\.csv row 7: image 'nope\.jpg' not found"),
    ("no label row", csv_rows()[:-1] + ["walk.jpg,"], None, r"walk\.jpg: image has no label"),
    ("unlisted image", csv_rows()[:-1], None, r"walk\.jpg: image has no label"),
    ("labelled twice", csv_rows() + ["walk,cat"], None, r"row 7: image 'walk\.jpg' is labelled again \(first at"),
    ("unreadable image", csv_rows(), None, r"walk\.jpg: cannot decode image"),
    ("duplicate ids", csv_rows(), None, r"tom_1\.jpg and .*tom 1\.jpg: both become image id 'cats_tom_1'"),
]


@pytest.mark.parametrize("case,rows,classes,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_row_and_file_and_writes_nothing(tmp_path, capsys, case, rows, classes, message):
    images = make_photos(tmp_path / "photos")
    if case == "unreadable image":
        (images / "walk.jpg").write_bytes(b"not a jpeg")
    if case == "duplicate ids":  # 'tom 1' and 'tom_1' are both made id cats_tom_1
        (images / "cats" / "tom_1.jpg").write_bytes((images / "walk.jpg").read_bytes())
    labels = write_csv(tmp_path / "t.csv", rows)
    argv = ["--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "out" / "ds")]
    assert main(argv + (["--classes", classes] if classes else [])) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_never_overwrites_a_non_empty_out(tmp_path, capsys):
    images = make_photos(tmp_path / "photos")
    out = tmp_path / "ds"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    assert main(["--images", str(images), "--labels", str(write_csv(tmp_path / "t.csv", csv_rows())),
                 "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    out.joinpath("mine.txt").unlink()  # an empty folder is fine
    assert main(["--images", str(images), "--labels", str(tmp_path / "t.csv"), "--out", str(out)]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_bad_masks_are_rejected(tmp_path):
    images = make_photos(tmp_path / "photos")
    labels = write_csv(tmp_path / "t.csv", csv_rows())
    masks = tmp_path / "masks"
    (masks / "cats").mkdir(parents=True)
    io.write_mask(masks / "cats" / "tom 1.png", np.full((20, 30), 7, np.uint8))
    with pytest.raises(DatasetError, match=r"tom 1\.png: label ids \[7\] outside 0\.\.3"):
        import_dataset(images, labels, tmp_path / "ds", masks=masks)
    io.write_mask(masks / "cats" / "tom 1.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match=r"tom 1\.png: mask size 5x5 differs"):
        import_dataset(images, labels, tmp_path / "ds", masks=masks)
    assert not (tmp_path / "ds").exists()


def test_json_true_is_not_class_1(tmp_path, capsys):
    images = make_photos(tmp_path / "photos")
    names = [p.relative_to(images).as_posix() for p in sorted(images.rglob("*.jpg"))]
    labels = tmp_path / "t.json"
    labels.write_text(json.dumps({name: (True if i == 0 else ["cat"]) for i, name in enumerate(names)}))
    assert main(["--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "ds"),
                 "--classes", "cat,dog,person"]) == 1
    assert re.search(r"t\.json entry .*: labels must be .*got bool", capsys.readouterr().err)
    labels.write_text(json.dumps({name: ["cat", False] for name in names}))
    assert main(["--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "ds"),
                 "--classes", "cat,dog,person"]) == 1
    assert "got bool" in capsys.readouterr().err


def test_a_latin1_csv_and_a_utf16_class_file_are_read_or_clear_errors(tmp_path, capsys):
    images = make_photos(tmp_path / "photos")
    labels = tmp_path / "t.csv"
    labels.write_bytes(("\n".join(["image,labels", *csv_rows()]) + "\n# caf\u00e9\n").encode("latin-1"))
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nperson\n", encoding="utf-16")
    code = main(["--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "ds"),
                 "--classes", str(classes)])
    err = capsys.readouterr().err
    assert code == 1 and "t.csv" in err and "UTF-8" in err and "Traceback" not in err
    labels.write_text("\n".join(["image,labels", *csv_rows()]) + "\n")
    assert main(["--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "ds"),
                 "--classes", str(classes)]) == 0  # a UTF-16 file with its byte-order mark is decoded
    assert_dataset(tmp_path / "ds")
