"""Build a dataset in the VOC layout (wsss/data/voc.py) from a folder of photos and their tags.

    python -m wsss.data.importer --images photos/ --labels tags.csv --out data/mine

--labels, in the forms people have:
  tags.csv, tags.tsv  rows `image,labels`: labels separated by ';' or '|' (or in further columns);
                      a first row whose first cell is `image`, `file`, `filename`, `path`, `id` or
                      `name` is a header
  tags.json           {"image": ["dog", "person"], ...} (a list, or one string separated as above)
  cls_labels.npy      IRN/PSA/SEAM: dict id -> multi-hot float[C-1], string or integer ids
                      (2007000032 is 2007_000032); ids without a photo are left out
  Annotations/        a folder of VOC XML files, ID.xml naming the objects of photo ID
  the --images folder one sub-folder per class, for single-label data (photos/cat/1.jpg is a cat)

A label is a class name or a mask id (1..C-1, needs --classes); `background` alone marks a photo
without objects. A photo is named by its path under --images with or without the extension, or by
its bare file name or stem when no other photo shares it.

Classes: --classes (a file with one name a line, a comma list, or `voc`; background first, added
when missing); otherwise the names found, sorted (cls_labels.npy of 20 classes: VOC's).

Out (--out, VOC layout): JPEGImages/ID.EXT (copied, or symlinked with --link), class_names.txt,
cls_labels.npy, ImageSets/Segmentation/{train,val,trainval}.txt, SegmentationClassAug/ID.png from
--masks (a mask is the photo's relative path with .png; photos without one just have none), and
import.json (the settings and counts). IDs are the relative paths without extension, made safe
(voc.safe_id: `cats/Tom 1.jpg` -> `cats_Tom_1`). The val split is a seeded shuffle of the sorted
ids, so the same photos and --seed give the same split.

Every photo is decoded and every label checked before anything is written; the dataset is built
in a hidden folder beside --out and renamed into place at the end, so bad input leaves nothing
behind, and an --out that exists and is not empty is never touched.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss import io
from wsss.data.voc import (
    IGNORE,
    IMAGE_EXTS,
    VOC_CLASSES,
    DatasetError,
    find_images,
    list_path,
    read_label_file,
    read_text,
    safe_id,
    xml_object_names,
)

HEADER_CELLS = {"image", "file", "filename", "path", "id", "name", "image_id"}
SEPARATORS = re.compile(r"[;|]")


@dataclass
class Photo:
    path: Path          # the file under --images
    rel: str            # its path under --images (posix)
    id: str
    tags: list | None = None  # class names or ids as written; None until a label source names the photo
    where: str = ""     # the row that labelled it (for errors)
    mask: Path | None = None


# ---------------------------------------------------------------- photos

def scan_photos(images: Path) -> list[Photo]:
    """Every photo under `images` with its safe id; duplicate ids are an error naming both files."""
    if not images.is_dir():
        raise DatasetError(f"{images}: image folder not found")
    photos, seen = [], {}
    for path in find_images(images):
        rel = path.relative_to(images).as_posix()
        id_ = safe_id(rel.rsplit(".", 1)[0])
        if not id_:
            raise DatasetError(f"{path}: no usable id in the file name")
        if id_ in seen:
            raise DatasetError(f"{path} and {seen[id_].path}: both become image id '{id_}' "
                               f"(ids keep only A-Za-z0-9_.-); rename one of them")
        seen[id_] = Photo(path, rel, id_)
        photos.append(seen[id_])
    if not photos:
        raise DatasetError(f"{images}: no images ({', '.join(IMAGE_EXTS)}) found")
    return photos


class PhotoIndex:
    """Find a photo by its relative path (with or without extension), file name or stem."""

    def __init__(self, photos: list[Photo]):
        self.keys: dict[str, list[Photo]] = {}
        for p in photos:
            stem_rel = p.rel.rsplit(".", 1)[0]
            for key in {p.rel, stem_rel, p.path.name, p.path.stem, p.id}:
                self.keys.setdefault(key, []).append(p)

    def find(self, name: str, where: str, missing_ok: bool = False) -> Photo | None:
        key = name.strip().replace("\\", "/").removeprefix("./")
        found = self.keys.get(key, [])
        if not found:
            if missing_ok:
                return None
            raise DatasetError(f"{where}: image '{name}' not found under --images")
        if len({p.id for p in found}) > 1:
            raise DatasetError(f"{where}: '{name}' matches several images ({', '.join(p.rel for p in found)}); "
                               f"give its path under --images")
        return found[0]


def check_photo(photo: Photo) -> tuple[int, int]:
    """(H, W) of a photo that decodes; DatasetError naming the file otherwise."""
    try:
        return io.read_image(photo.path).shape[:2]
    except (OSError, ValueError) as e:
        raise DatasetError(str(e)) from e


# ---------------------------------------------------------------- label sources

def split_tags(text) -> list:
    if isinstance(text, (list, tuple)):
        return [t for t in text if str(t).strip()]
    return [t.strip() for t in SEPARATORS.split(str(text)) if t.strip()]


def _label(photo: Photo, tags: list, where: str) -> None:
    if photo.tags is not None:
        raise DatasetError(f"{where}: image '{photo.rel}' is labelled again (first at {photo.where})")
    photo.tags, photo.where = tags, where


def read_table(path: Path, index: PhotoIndex) -> None:
    text = read_text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in text and "," not in text) else ","
    rows = csv.reader(text.splitlines(), delimiter=delimiter)
    for n, row in enumerate(rows, 1):
        row = [c.strip() for c in row]
        if not any(row) or row[0].startswith("#"):
            continue
        if n == 1 and row[0].lower() in HEADER_CELLS:
            continue
        where = f"{path} row {n}"
        _label(index.find(row[0], where), [t for cell in row[1:] for t in split_tags(cell)], where)


def read_json_labels(path: Path, index: PhotoIndex) -> None:
    try:
        data = json.loads(read_text(path))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected an object {{image: [labels]}}, got {type(data).__name__}")
    for name, tags in data.items():
        where = f"{path} entry '{name}'"
        # JSON's true/false are Python's bools, which are ints: never take `true` for class 1
        bad = [t for t in (tags if isinstance(tags, list) else [tags])
               if isinstance(t, bool) or not isinstance(t, (str, int))]
        if bad or not isinstance(tags, (list, str, int)):
            got = type(bad[0] if bad else tags).__name__
            raise DatasetError(f"{where}: labels must be a list or a string of class names or ids, got {got}")
        _label(index.find(name, where), split_tags(tags if not isinstance(tags, int) else [tags]), where)


def read_npy(path: Path, index: PhotoIndex) -> int:
    """Labels from IRN/PSA/SEAM's cls_labels.npy as tag lists of mask ids; returns the vector length."""
    size = None
    for id_, vector in read_label_file(path).items():
        where = f"{path} entry {id_}"
        photo = index.find(id_, where, missing_ok=True)
        if photo is None:
            continue  # cls_labels.npy usually covers a whole dataset (train_aug): keep the photos we have
        vector = np.asarray(vector).reshape(-1)
        if size is not None and vector.size != size:
            raise DatasetError(f"{where}: {vector.size} labels, earlier entries have {size}")
        size = vector.size
        _label(photo, [int(i) + 1 for i in np.flatnonzero(vector)] or ["background"], where)
    return size or 0


def read_xml_folder(folder: Path, index: PhotoIndex) -> None:
    for xml in sorted(folder.glob("*.xml")):
        photo = index.find(xml.stem, str(xml), missing_ok=True)
        if photo is not None:
            _label(photo, xml_object_names(xml) or ["background"], str(xml))


def read_class_folders(photos: list[Photo]) -> None:
    for p in photos:
        parts = p.rel.split("/")
        if len(parts) > 1:
            p.tags, p.where = [parts[0]], f"folder {parts[0]}/"


# ---------------------------------------------------------------- classes and label vectors

def parse_classes(spec: str | None) -> tuple[str, ...] | None:
    if spec is None:
        return None
    if spec == "voc":
        return VOC_CLASSES
    path = Path(spec)
    names = read_text(path).splitlines() if path.is_file() else spec.split(",")
    names = [n.strip() for n in names if n.strip()]
    if names and names[0].lower() != "background":
        names.insert(0, "background")
    if len(names) < 2 or len(set(names)) < len(names):
        raise DatasetError(f"--classes {spec}: needs distinct class names besides background, got {names}")
    return tuple(names)


def is_id(tag) -> bool:
    return isinstance(tag, (int, np.integer)) or (isinstance(tag, str) and tag.isdigit())


def class_list(photos: list[Photo], classes: tuple[str, ...] | None, npy_size: int = 0) -> tuple[str, ...]:
    if classes is not None:
        return classes
    if npy_size == len(VOC_CLASSES) - 1:
        return VOC_CLASSES
    for p in photos:
        for t in p.tags or ():
            if is_id(t):
                raise DatasetError(f"{p.where}: '{t}' is a class id; name the classes with --classes")
    names = sorted({str(t) for p in photos for t in p.tags or () if str(t).lower() != "background"})
    if not names:
        raise DatasetError("no class names in the labels")
    return ("background", *names)


def label_vector(photo: Photo, names: tuple[str, ...]) -> np.ndarray:
    lookup = {n.lower(): i for i, n in enumerate(names)}
    vector = np.zeros(len(names) - 1, np.float32)
    for tag in photo.tags:
        if is_id(tag):
            i = int(tag)
            if not 1 <= i < len(names):
                raise DatasetError(f"{photo.where} ({photo.rel}): unknown class id {i} (1..{len(names) - 1})")
        else:
            i = lookup.get(str(tag).strip().lower())
            if i is None:
                raise DatasetError(f"{photo.where} ({photo.rel}): unknown class '{tag}' "
                                   f"(classes: {', '.join(names[1:])})")
        if i:
            vector[i - 1] = 1
    return vector


# ---------------------------------------------------------------- the import

def read_labels(labels: Path, images: Path, photos: list[Photo]) -> int:
    """Attach each photo's tags from `labels`; returns the npy vector length (0 for other forms)."""
    index = PhotoIndex(photos)
    if labels.is_dir():
        if labels.resolve() == images.resolve():
            read_class_folders(photos)
        elif any(labels.glob("*.xml")):
            read_xml_folder(labels, index)
        else:
            raise DatasetError(f"{labels}: a label folder must be --images itself (one sub-folder per class) "
                               f"or a folder of VOC .xml annotations")
        return 0
    if not labels.is_file():
        raise DatasetError(f"{labels}: label file not found")
    suffix = labels.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        read_table(labels, index)
    elif suffix == ".json":
        read_json_labels(labels, index)
    elif suffix == ".npy":
        return read_npy(labels, index)
    else:
        raise DatasetError(f"{labels}: unknown label format (expected .csv, .tsv, .json, .npy or a folder)")
    return 0


def find_masks(masks: Path, photos: list[Photo], sizes: dict, num_classes: int) -> None:
    if not masks.is_dir():
        raise DatasetError(f"{masks}: mask folder not found")
    for p in photos:
        path = masks / (p.rel.rsplit(".", 1)[0] + ".png")
        if not path.is_file():
            continue
        try:
            mask = io.read_mask(path)
        except ValueError as e:
            raise DatasetError(str(e)) from e
        if mask.shape != sizes[p.id]:
            raise DatasetError(f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                               f"{p.rel} ({sizes[p.id][1]}x{sizes[p.id][0]})")
        bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE)])
        if bad.size:
            raise DatasetError(f"{path}: label ids {bad.tolist()} outside 0..{num_classes - 1} and 255")
        p.mask = path


def split_ids(ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    ids = sorted(ids)
    n_val = round(len(ids) * val_fraction)
    if val_fraction > 0 and len(ids) > 1:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = {ids[i] for i in order[:n_val]}
    return [i for i in ids if i not in val], [i for i in ids if i in val]


def build(photos: list[Photo], names, labels: dict, train, val, folder: Path, link: bool) -> None:
    images = folder / "JPEGImages"
    images.mkdir(parents=True)
    for p in tqdm(photos, desc="write images", leave=False):
        target = images / f"{p.id}{p.path.suffix.lower()}"
        if link:
            os.symlink(p.path.resolve(), target)
        else:
            shutil.copyfile(p.path, target)
        if p.mask is not None:
            io.write_mask(folder / "SegmentationClassAug" / f"{p.id}.png", io.read_mask(p.mask))
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    np.save(folder / "cls_labels.npy", labels)
    for split, ids in (("train", train), ("val", val), ("trainval", sorted(train + val))):
        if ids:
            path = list_path(folder, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(ids) + "\n")


def import_dataset(images, labels, out, *, classes=None, masks=None, val_fraction=0.1, seed=0,
                   link=False, workers=8) -> dict:
    """Check everything, then build `out`; returns the summary written to out/import.json."""
    images, labels, out = Path(images), Path(labels), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: already exists and is not empty; choose a new --out (nothing was written)")
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"--val-fraction {val_fraction}: must lie in [0, 1)")
    names = parse_classes(classes)
    photos = scan_photos(images)
    npy_size = read_labels(labels, images, photos)
    for p in photos:
        if not p.tags:
            raise DatasetError(f"{p.path}: image has no label in {labels}" +
                               (" (label it 'background' if it shows no object)" if p.tags is not None else ""))
    names = class_list(photos, names, npy_size)
    if npy_size and npy_size != len(names) - 1:
        raise DatasetError(f"{labels}: {npy_size} labels per image, but {len(names) - 1} classes")
    vectors = {p.id: label_vector(p, names) for p in photos}
    with ThreadPoolExecutor(workers) as pool:
        shapes = list(tqdm(pool.map(check_photo, photos), total=len(photos), desc="check images", leave=False))
    sizes = {p.id: s for p, s in zip(photos, shapes, strict=True)}
    if masks is not None:
        find_masks(Path(masks), photos, sizes, len(names))
    train, val = split_ids([p.id for p in photos], val_fraction, seed)
    summary = {"images": str(images), "labels": str(labels), "masks": None if masks is None else str(masks),
               "classes": list(names), "val_fraction": val_fraction, "seed": seed, "link": link,
               "counts": {"images": len(photos), "train": len(train), "val": len(val),
                          "masks": sum(p.mask is not None for p in photos)}}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        build(photos, names, vectors, train, val, tmp, link)
        io.write_json(tmp / "import.json", summary)
        if out.is_dir():
            out.rmdir()  # empty (checked above); rmdir refuses if something appeared since
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wsss.data.importer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, help="folder of photos (nested folders allowed)")
    p.add_argument("--labels", required=True, type=Path,
                   help="CSV/TSV, JSON, cls_labels.npy, a folder of VOC .xml files, or --images (class folders)")
    p.add_argument("--out", required=True, type=Path, help="new dataset folder (must not exist, or be empty)")
    p.add_argument("--classes", help="class names: a file (one a line), a comma list, or 'voc'")
    p.add_argument("--masks", type=Path, help="optional ground-truth masks: MASKS/<photo's relative path>.png")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the photos in the val split")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--copy", dest="link", action="store_false", help="copy the photos (default)")
    mode.add_argument("--link", dest="link", action="store_true", help="symlink the photos instead")
    p.set_defaults(link=False)  # store_false would make --copy's default (True) the default
    args = p.parse_args(argv)
    try:
        summary = import_dataset(args.images, args.labels, args.out, classes=args.classes, masks=args.masks,
                                 val_fraction=args.val_fraction, seed=args.seed, link=args.link)
    except (DatasetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    c = summary["counts"]
    print(f"wrote {args.out}: {c['images']} images ({c['train']} train, {c['val']} val, {c['masks']} masks), "
          f"{len(summary['classes']) - 1} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
