"""Datasets in the PASCAL VOC 2012 (+ SBD) layout.

    ROOT/JPEGImages/ID.jpg            (or ID.jpeg, ID.png, ID.webp)
    ROOT/SegmentationClassAug/ID.png  (or SegmentationClass/) palette PNG, 0 = bg, 1..C-1, 255 = ignore
    ROOT/ImageSets/Segmentation/{train_aug,train,val}.txt
    ROOT/cls_labels.npy               dict id -> float[C-1] multi-hot, optional; SEAM's string ids or
                                      IRN/PSA's integer ones (2007000032 for 2007_000032)
    ROOT/class_names.txt              one name a line, background first, optional (VOC names otherwise)

Class ids are mask ids: 0 is background, 1..C-1 the object classes. Image labels are
multi-hot vectors over the C-1 object classes (label[i] is class i + 1).

`python -m wsss.data.voc check --root DIR --split train` scans a split for bad input;
`python -m wsss.data.voc prepare --voc DIR [--sbd DIR]` builds SegmentationClassAug,
train_aug.txt and cls_labels.npy from the two official downloads; `python -m wsss.data.importer`
builds the layout from any folder of photos and a file of tags.
"""
from __future__ import annotations

import argparse
import pickle
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss.errors import DatasetError
from wsss.io import IGNORE, PALETTE, image_size, read_image, read_mask, write_mask
from wsss.layout import is_safe_name

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")  # JPEGImages/ID.jpg first: VOC's own form
__all__ = ["VOC_CLASSES", "IGNORE", "IMAGE_EXTS", "PALETTE", "DatasetError", "VOCDataset", "class_names",
           "find_images", "read_ids", "safe_id"]


def read_text(path) -> str:
    """A text file people write by hand: UTF-8 (a byte-order mark allowed), or UTF-16 with its
    byte-order mark (what Windows editors save as "Unicode"); anything else is an error naming it."""
    path = Path(path)
    data = path.read_bytes()
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from e


def class_names(root) -> tuple[str, ...]:
    path = Path(root) / "class_names.txt"
    if not path.is_file():
        return VOC_CLASSES
    names, seen = [], {}
    for n, line in enumerate(read_text(path).splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name in seen:  # two ids of one name: labels and scores by name would mix them up
            raise DatasetError(f"{path}: line {n}: '{name}' is listed twice (first on line {seen[name]})")
        seen[name] = n
        names.append(name)
    if len(names) < 2:
        raise DatasetError(f"{path}: needs background plus at least one class, found {len(names)} names")
    return tuple(names)


def safe_id(name: str) -> str:
    """An image id that is safe as a file name and in a list file: [A-Za-z0-9_.-], every other
    character (path separators, spaces, accents) as '_', no leading '.' or '-' (hidden files, flags)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".-")


def label_key(key) -> str:
    """A cls_labels.npy key as an image id: IRN/PSA store 2007_000032 as the integer 2007000032."""
    if isinstance(key, (int, np.integer)):
        text = str(int(key))
        return f"{text[:4]}_{text[4:]}"
    return str(key)


def find_images(folder) -> list[Path]:
    """The images (IMAGE_EXTS, any case) under `folder`, nested, sorted; hidden files and folders skipped."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _numpy_globals() -> dict:
    """The only globals a pickled dict of numpy arrays needs: array and scalar reconstruction
    (under numpy 1's module name and numpy 2's), and `_codecs.encode`, with which pickle protocol 2
    (IRN's files) stores the arrays' bytes; it only converts text to bytes."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    allowed = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode` as protocol-2 pickles of bytes call it, and no other codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not part of a numpy array")
    return text.encode("latin1")


class _LabelUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numbers, strings, lists and dicts, and nothing else: a pickle may
    name any function to call, so a cls_labels.npy from elsewhere could otherwise run code."""

    allowed = _numpy_globals()

    def find_class(self, module, name):
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a numpy array; "
                                         f"only arrays, numbers and strings are read")
        return found


def _read_pickled_npy(path) -> object:
    """The object of an .npy file, through _LabelUnpickler when it holds Python objects."""
    from numpy.lib import format as npy

    with open(path, "rb") as f:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        array = _LabelUnpickler(f, encoding="latin1").load()
    if not isinstance(array, np.ndarray):
        raise ValueError(f"expected a pickled numpy array, got {type(array).__name__}")
    return array


def read_label_file(path) -> dict:
    """cls_labels.npy as a dict image id -> multi-hot vector, whichever form of ids it uses (label_key).

    IRN/PSA/SEAM's format is a pickled dict; it is read without running anything a pickle names
    (_LabelUnpickler): a file that names anything but numpy's array reconstruction is refused."""
    try:
        array = _read_pickled_npy(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same bad input
        raise DatasetError(f"{path}: cannot read image labels ({e})") from e
    labels = array.item() if array.shape == () else array
    if not isinstance(labels, dict):
        raise DatasetError(f"{path}: expected a dict id -> multi-hot labels, got {type(labels).__name__}")
    return {label_key(k): v for k, v in labels.items()}


def list_path(root, split: str) -> Path:
    return Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"


def read_ids(root, split: str) -> list[str]:
    """The ids of a split, one a line. Each must be a plain file name (wsss.layout.is_safe_name), so
    that ROOT/JPEGImages/ID.jpg and the artifacts OUTPUTS/RUN/STAGE/.../ID.png never leave their
    folders, and appear once (a duplicate would be trained on twice)."""
    path = list_path(root, split)
    if not path.is_file():
        raise DatasetError(f"{path}: list file for split '{split}' not found")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        raise DatasetError(f"{path}: starts with a UTF-8 byte-order mark (BOM); save it as plain UTF-8 without one")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from e
    ids, seen = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        id_ = line.strip()
        if not id_:
            continue
        if not is_safe_name(id_):
            raise DatasetError(f"{path}: line {n}: {id_!r} is not a plain image id (letters, digits and -_. "
                               f"only: no spaces, no '/', no '..')")
        if id_ in seen:
            raise DatasetError(f"{path}: line {n}: '{id_}' is listed twice (first on line {seen[id_]})")
        seen[id_] = n
        ids.append(id_)
    if not ids:
        raise DatasetError(f"{path}: the list is empty")
    return ids


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    present = np.unique(mask)
    present = present[(present > 0) & (present < num_classes)]
    label = np.zeros(num_classes - 1, dtype=np.float32)
    label[present - 1] = 1
    return label


def xml_object_names(path) -> list[str]:
    """The class names of the objects in a VOC annotation (Annotations/ID.xml)."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as e:
        raise DatasetError(f"{path}: cannot parse annotation ({e})") from e
    return [obj.findtext("name", "").strip() for obj in tree.iter("object")]


def labels_from_xml(path, names: tuple[str, ...]) -> np.ndarray:
    label = np.zeros(len(names) - 1, dtype=np.float32)
    for name in xml_object_names(path):
        if name not in names[1:]:
            raise DatasetError(f"{path}: unknown class name '{name}'")
        label[names.index(name) - 1] = 1
    return label


class VOCDataset:
    """Images, masks and image-level labels of one split; plain numpy, no torch.

    Labels come from ROOT/cls_labels.npy when it exists, else from the masks, else from
    ROOT/Annotations/ID.xml. `mask_dir` overrides where masks are read (e.g. pseudo-masks).
    """

    def __init__(self, root, split: str = "train", mask_dir=None, limit: int = 0):
        """`limit` > 0: only the first `limit` ids of the list (the --limit of smoke runs)."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset folder not found")
        self.split = split
        self.list_path = list_path(root, split)
        self.ids = read_ids(root, split)[:limit] if limit > 0 else read_ids(root, split)
        self.class_names = class_names(root)
        self.num_classes = len(self.class_names)
        self.mask_dir = Path(mask_dir) if mask_dir else next(
            (self.root / d for d in MASK_DIRS if (self.root / d).is_dir()), None)
        self._labels = self._load_label_file()

    def _load_label_file(self):
        path = self.root / "cls_labels.npy"
        return read_label_file(path) if path.is_file() else None

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, id_: str) -> Path:
        folder = self.root / "JPEGImages"
        for ext in IMAGE_EXTS:
            path = folder / f"{id_}{ext}"
            if path.is_file():
                return path
        return folder / f"{id_}{IMAGE_EXTS[0]}"  # missing: the error names VOC's form

    def mask_path(self, id_: str) -> Path | None:
        return None if self.mask_dir is None else self.mask_dir / f"{id_}.png"

    def image(self, id_: str) -> np.ndarray:
        path = self.image_path(id_)
        if not path.is_file():
            raise DatasetError(f"{path}: image not found")
        try:
            return read_image(path)
        except ValueError as e:
            raise DatasetError(f"{e} (python -m wsss.data.voc check --root {self.root} --split {self.split} "
                               f"lists every bad file)") from e

    def image_size(self, id_: str) -> tuple[int, int]:
        """(W, H) from the image header, without decoding it (as shown: io.image_size)."""
        try:
            return image_size(self.image_path(id_))
        except (OSError, ValueError) as e:
            raise DatasetError(str(e)) from e

    def has_mask(self, id_: str) -> bool:
        path = self.mask_path(id_)
        return path is not None and path.is_file()

    def mask(self, id_: str) -> np.ndarray:
        path = self.mask_path(id_)
        if path is None or not path.is_file():
            raise DatasetError(f"{path or self.root / MASK_DIRS[0] / (id_ + '.png')}: mask not found")
        try:
            mask = read_mask(path)
        except ValueError as e:
            raise DatasetError(str(e)) from e
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != IGNORE)])
        if bad.size:
            raise DatasetError(f"{path}: label ids {bad.tolist()} outside 0..{self.num_classes - 1} and 255")
        return mask

    def labels(self, id_: str) -> np.ndarray:
        """Multi-hot float32[C-1] over the object classes."""
        if self._labels is not None:
            if id_ not in self._labels:
                raise DatasetError(f"{self.root / 'cls_labels.npy'}: no labels for image '{id_}'")
            label = np.asarray(self._labels[id_], dtype=np.float32).reshape(-1)
            if label.size != self.num_classes - 1:
                raise DatasetError(f"{self.root / 'cls_labels.npy'}: labels of '{id_}' have {label.size} "
                                   f"entries, expected {self.num_classes - 1}")
            bad = sorted(set(label.tolist()) - {0.0, 1.0})
            if bad:
                raise DatasetError(f"{self.root / 'cls_labels.npy'}: labels of '{id_}' hold {bad}; "
                                   f"a label is 0 or 1")
            return label
        if self.has_mask(id_):
            return labels_from_mask(self.mask(id_), self.num_classes)
        xml = self.root / "Annotations" / f"{id_}.xml"
        if xml.is_file():
            return labels_from_xml(xml, self.class_names)
        raise DatasetError(f"{self.root}: no image labels for '{id_}' (no cls_labels.npy, mask or annotation)")

    def label_ids(self, id_: str) -> np.ndarray:
        """Mask ids (1..C-1) of the classes the image is labelled with."""
        return np.flatnonzero(self.labels(id_)) + 1

    def __getitem__(self, index: int) -> dict:
        id_ = self.ids[index]
        item = {"id": id_, "image": self.image(id_), "label": self.labels(id_)}
        if self.has_mask(id_):
            item["mask"] = self.mask(id_)
        return item

    def check_one(self, id_: str, need_mask: bool = False) -> None:
        """Raise DatasetError if the image, its mask or its labels are unusable."""
        image = self.image(id_)
        if self.has_mask(id_):
            mask = self.mask(id_)
            if mask.shape != image.shape[:2]:
                raise DatasetError(f"{self.mask_path(id_)}: mask size {mask.shape[1]}x{mask.shape[0]} differs "
                                   f"from image size {image.shape[1]}x{image.shape[0]}")
        elif need_mask:
            self.mask(id_)  # raises "mask not found"
        self.labels(id_)

    def validate(self, need_mask: bool = False) -> None:
        """The fast part of `check`, run by every stage before any work: ids (read_ids), every
        image's labels, every image (and mask) present. Decoding them stays in `check`."""
        for id_ in self.ids:
            self.labels(id_)
            if not self.image_path(id_).is_file():
                raise DatasetError(f"{self.image_path(id_)}: image not found (listed in {self.list_path})")
            if need_mask and not self.has_mask(id_):
                self.mask(id_)  # raises "mask not found"

    def check(self, need_mask: bool = False, workers: int = 8) -> None:
        """Scan the whole split; raise the first problem found (in list order)."""
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self.check_one, i, need_mask) for i in self.ids]
            for f in tqdm(futures, desc=f"check {self.split}", leave=False):
                f.result()


# ---------------------------------------------------------------- prepare from VOC + SBD

def _sbd_mask(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        return loadmat(path)["GTcls"][0]["Segmentation"][0].astype(np.uint8)
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"{path}: cannot read SBD annotation ({e})") from e


def prepare(voc: Path, sbd: Path | None = None) -> None:
    """Build SegmentationClassAug, train_aug.txt and cls_labels.npy inside the VOC folder."""
    voc = Path(voc)
    seg = voc / "ImageSets" / "Segmentation"
    val = read_ids(voc, "val")
    train = read_ids(voc, "train")
    out = voc / "SegmentationClassAug"
    out.mkdir(exist_ok=True)
    sources: dict[str, Path] = {}
    if sbd is not None:
        sbd = Path(sbd)
        for name in ("train.txt", "val.txt"):
            path = sbd / name
            if not path.is_file():
                raise DatasetError(f"{path}: SBD list not found (expected the benchmark_RELEASE/dataset folder)")
            for id_ in path.read_text().split():
                sources[id_] = sbd / "cls" / f"{id_}.mat"
    for id_ in train + val:  # VOC's own masks win over SBD's (they carry the 255 borders)
        sources[id_] = voc / "SegmentationClass" / f"{id_}.png"
    val_set = set(val)
    train_aug = sorted(i for i in sources if i not in val_set)

    labels = {}
    for id_, src in tqdm(sorted(sources.items()), desc="SegmentationClassAug"):
        if not src.is_file():
            raise DatasetError(f"{src}: annotation not found")
        mask = _sbd_mask(src) if src.suffix == ".mat" else read_mask(src)
        write_mask(out / f"{id_}.png", mask)
        labels[id_] = labels_from_mask(mask, len(VOC_CLASSES))
    (seg / "train_aug.txt").write_text("\n".join(train_aug) + "\n")
    np.save(voc / "cls_labels.npy", labels)
    print(f"wrote {len(sources)} masks to {out}, {len(train_aug)} ids to {seg / 'train_aug.txt'}, "
          f"labels to {voc / 'cls_labels.npy'}")


def subset(src: Path, out: Path, split: str) -> None:
    """A small VOC-layout copy of the images of `src`'s `split` that have a JPEG: every list of
    `src` restricted to them (train_aug included, so a VOC preset runs on it unchanged), their
    masks, labels and class names. For smoke runs of the presets on real photos."""
    src, out = Path(src), Path(out)
    ids = [i for i in read_ids(src, split) if (src / "JPEGImages" / f"{i}.jpg").is_file()]
    if not ids:
        raise DatasetError(f"{list_path(src, split)}: none of its images is in {src / 'JPEGImages'}")
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: exists and is not empty; choose a new folder")
    masks = next((src / d for d in MASK_DIRS if (src / d).is_dir()), None)
    for sub_dir in ("JPEGImages", "ImageSets/Segmentation", *([masks.name] if masks else [])):
        (out / sub_dir).mkdir(parents=True, exist_ok=True)
    keep = set(ids)
    for id_ in ids:
        shutil.copyfile(src / "JPEGImages" / f"{id_}.jpg", out / "JPEGImages" / f"{id_}.jpg")
        if masks is not None and (masks / f"{id_}.png").is_file():
            shutil.copyfile(masks / f"{id_}.png", out / masks.name / f"{id_}.png")
    for path in sorted((src / "ImageSets" / "Segmentation").glob("*.txt")):
        kept = [i for i in read_ids(src, path.stem) if i in keep]
        if kept:
            (out / "ImageSets" / "Segmentation" / path.name).write_text("\n".join(kept) + "\n")
    if (src / "cls_labels.npy").is_file():
        labels = VOCDataset(src, split)._labels
        np.save(out / "cls_labels.npy", {i: labels[i] for i in ids if i in labels})
    if (src / "class_names.txt").is_file():
        shutil.copyfile(src / "class_names.txt", out / "class_names.txt")
    print(f"wrote {len(ids)} images of {src} ({split}) to {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.data.voc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build SegmentationClassAug, train_aug and cls_labels.npy")
    p.add_argument("--voc", required=True, type=Path, help="VOCdevkit/VOC2012")
    p.add_argument("--sbd", type=Path, help="benchmark_RELEASE/dataset (SBD)")
    s = sub.add_parser("subset", help="copy the images of a split that have a JPEG into a small VOC-layout folder")
    s.add_argument("--src", required=True, type=Path, help="dataset root (e.g. data/VOCdevkit/VOC2012)")
    s.add_argument("--split", default="train_aug", help="the images to copy: those of this list with a JPEG")
    s.add_argument("--out", required=True, type=Path, help="a new folder")
    c = sub.add_parser("check", help="scan a split for missing or corrupt files")
    c.add_argument("--root", required=True, type=Path)
    c.add_argument("--split", default="train")
    c.add_argument("--need-mask", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "prepare":
            prepare(args.voc, args.sbd)
        elif args.cmd == "subset":
            subset(args.src, args.out, args.split)
        else:
            ds = VOCDataset(args.root, args.split)
            ds.check(need_mask=args.need_mask)
            print(f"{args.root} {args.split}: {len(ds)} images OK ({ds.num_classes} classes)")
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
