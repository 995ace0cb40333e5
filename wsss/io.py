"""Artifacts on disk: atomic writes, palette PNGs, stage manifests.

Every artifact is written to a temporary file in the same folder and renamed into
place, so a killed process never leaves a half-written file under the final name;
a stage's manifest is written last, so a stage without one is unfinished.
"""
from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.errors import WsssError
from wsss.labels import IGNORE, PALETTE  # noqa: F401 - IGNORE: io.IGNORE is the mask convention beside its reader
from wsss.layout import JOURNAL, MANIFEST

_UMASK = os.umask(0)
os.umask(_UMASK)


# ---------------------------------------------------------------- what a folder's owner wrote

_JOURNALED = "WSSS_JOURNALED"  # os.pathsep-separated folders journaled now; spawned workers inherit it


def journal(folder, on: bool = True) -> None:
    """Start (or stop) recording every file written under `folder` through this module, in this
    process and the processes it starts from now on, in folder/.written: what a stage (or the report)
    wrote, so that --force removes exactly that and never a user's file of a similar name."""
    folder = os.path.realpath(folder)
    folders = [f for f in os.environ.get(_JOURNALED, "").split(os.pathsep) if f and f != folder]
    if on:
        folders.append(folder)
    if folders:
        os.environ[_JOURNALED] = os.pathsep.join(folders)
    else:
        os.environ.pop(_JOURNALED, None)


def _record(path: Path) -> None:
    """Add `path` to the journal of the innermost journaled folder holding it (before it is written:
    a kill between the two leaves a line for a file that is not there, never a file without its line)."""
    folders = os.environ.get(_JOURNALED)
    if not folders:
        return
    target = os.path.join(os.path.realpath(path.parent), path.name)
    holders = [f for f in folders.split(os.pathsep) if f and target.startswith(f + os.sep)]
    if not holders:
        return
    folder = max(holders, key=len)
    line = json.dumps(os.path.relpath(target, folder)) + "\n"
    fd = os.open(os.path.join(folder, JOURNAL), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        os.write(fd, line.encode())  # one write in append mode: lines of concurrent writers never interleave
    finally:
        os.close(fd)


def journaled(folder) -> list[str] | None:
    """The relative paths folder/.written records (each once, in order; only plain paths inside the
    folder); None when the folder has no journal (written before journals, or never journaled)."""
    path = Path(folder) / JOURNAL
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    seen: dict[str, None] = {}
    for line in text.splitlines():
        try:
            rel = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(rel, str) and rel and not os.path.isabs(rel) and ".." not in Path(rel).parts:
            seen[rel] = None
    return list(seen)


def record_existing(folder, entries) -> None:
    """Start folder/.written with the files now under `entries` (paths inside `folder`)."""
    folder = Path(folder)
    rels = []
    for entry in entries:
        entry = Path(entry)
        files = [entry] if entry.is_file() else sorted(p for p in entry.rglob("*") if p.is_file())
        rels += [p.relative_to(folder).as_posix() for p in files if p.name != JOURNAL]
    write_bytes(folder / JOURNAL, "".join(json.dumps(rel) + "\n" for rel in rels).encode())


def remove_journaled(folder, keep=()) -> list[str]:
    """Remove the files folder/.written records (but those in `keep`), then the folders they leave
    empty; the journal then records only the kept files that exist. Returns the removed paths."""
    folder = Path(folder)
    entries = journaled(folder) or []
    keep = set(keep)
    removed = []
    for rel in entries:
        path = folder / rel
        if rel not in keep and (path.is_file() or path.is_symlink()):
            path.unlink()
            removed.append(rel)
    parents = {parent for rel in removed for parent in Path(rel).parents if parent != Path(".")}
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: it holds something else
            (folder / parent).rmdir()
    left = [rel for rel in entries if rel in keep and (folder / rel).exists()]
    if left or (folder / JOURNAL).exists():
        write_bytes(folder / JOURNAL, "".join(json.dumps(rel) + "\n" for rel in left).encode())
    return removed


TEMP_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # atomic_path's temporary files (tempfile.mkstemp's names)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; an artifact gets the modes of any normal write
    os.close(fd)
    try:
        yield Path(tmp)
        if path.name != JOURNAL:
            _record(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path, data: bytes) -> None:
    """Write atomically; a failed write (a full disk...) raises OSError naming `path`, not the temp file."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        if e.filename == str(path):
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def write_json(path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_npy(path, array: np.ndarray) -> None:
    buf = _io.BytesIO()
    np.save(buf, array)
    write_bytes(path, buf.getvalue())


def write_npz(path, **arrays) -> None:
    buf = _io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes(path, buf.getvalue())


def write_png(path, image: np.ndarray | Image.Image, text: dict | None = None) -> None:
    """Write an RGB/grey uint8 array (or a PIL image) as PNG; `text` {key: str} goes into its tEXt
    chunks, written with the pixels in one atomic write (see png_text)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = _io.BytesIO()
    info = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, str(value))
    img.save(buf, format="PNG", pnginfo=info)
    write_bytes(path, buf.getvalue())


def png_text(path) -> dict:
    """The tEXt chunks of a PNG ({} for none, or a file that cannot be read)."""
    try:
        with Image.open(path) as img:
            return dict(getattr(img, "text", {}) or {})
    except (OSError, ValueError):
        return {}


def file_hash(path) -> str:
    """A short hash of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def write_mask(path, mask: np.ndarray, text: dict | None = None) -> None:
    """Write a label mask (uint8, 0 = background, 255 = ignore) as a VOC palette PNG."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{path}: a mask must be 2-D, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"{path}: mask values must lie in 0..255")
        mask = mask.astype(np.uint8)
    img = Image.fromarray(mask, mode="P")
    img.putpalette(PALETTE.reshape(-1).tolist())
    write_png(path, img, text)


def read_mask(path) -> np.ndarray:
    """Read a label PNG, palette or plain grey, as uint8 label ids (HxW)."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read mask ({e})") from e
    if img.mode not in ("P", "L", "I", "I;16"):
        raise ValueError(f"{path}: a mask must be a palette or greyscale PNG, got mode {img.mode}")
    mask = np.asarray(img)
    if mask.dtype != np.uint8 and mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"{path}: mask values must lie in 0..255, found {mask.min()}..{mask.max()}")
    return mask.astype(np.uint8, copy=False)


def read_image(path) -> np.ndarray:
    """Read an image as RGB uint8 (HxWx3) as it is shown: EXIF orientation applied, any bit depth
    scaled to 8 bits; a clear error names a corrupt, missing or oversized file.

    The one reader of photos (training, CAMs, saliency, predictions, the importer), so that every
    stage sees the same pixels; `image_size` gives its size from the header."""
    try:
        img = Image.open(path)
        img.load()
        img = _oriented(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from e
    return _rgb8(img)


def _oriented(img: Image.Image) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.exif_transpose(img) if _orientation(img) not in (None, 1) else img


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except (OSError, ValueError, SyntaxError, TypeError):  # a broken EXIF block: shown as stored
        return None


def _rgb8(img: Image.Image) -> np.ndarray:
    """RGB uint8 of any mode: 16-bit (and 32-bit integer holding 16-bit values) grey scaled by 1/257,
    float grey in [0, 1] by 255; PIL's own conversion clips those to white."""
    if img.mode.startswith("I") or img.mode == "F":
        grey = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            grey = grey * 255 if grey.size and grey.max() <= 1 else grey
        elif img.mode.startswith("I;16") or (grey.size and grey.max() > 255):
            grey = grey / 257
        grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def image_size(path) -> tuple[int, int]:
    """(W, H) of an image as read_image returns it (EXIF orientation applied), from its header."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if _orientation(img) in (5, 6, 7, 8) else (w, h)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e


def save_checkpoint(path, state: dict) -> None:
    """Serialised in memory first, so that a full disk fails in write_bytes with a clear OSError
    (torch.save writing to a file says only "file write failed")."""
    import torch

    buf = _io.BytesIO()
    torch.save(state, buf)
    write_bytes(path, buf.getvalue())


class UnsafeFileError(WsssError, ValueError):
    """A data file or checkpoint that is not plain data (it would run code, or cannot be read as
    data); the message names the file."""


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint is tensors and plain types (dict, list, str, int, float, None): torch's
    `weights_only` loader refuses anything else, so a checkpoint from elsewhere cannot run code."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's message opens with advice to load it unsafely; the line naming the culprit is the one to show
        why = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(e).__name__)
        raise UnsafeFileError(f"{path}: not a checkpoint of plain tensors and numbers, refused ({why})") from e


# ---------------------------------------------------------------- manifests

def fingerprint(path) -> str:
    """A short hash that changes when an input changes: file contents, or for a folder its
    manifest if it has one, else the sorted names, sizes and mtimes of its files."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif (path / MANIFEST).is_file():
        h.update((path / MANIFEST).read_bytes())
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.name != JOURNAL:
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        h.update(b"missing")
    return h.hexdigest()[:16]


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("numpy", "torch", "torchvision"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def write_manifest(stage_dir, config: dict, inputs: dict | None = None, outputs: dict | None = None,
                   started: float | None = None, fingerprints: dict | None = None,
                   environment: dict | None = None) -> dict:
    """Mark a stage complete: its config, input fingerprints (given, or of the `inputs` paths),
    summary figures, versions and `environment` (wsss.run.environment: device, GPU, commit)."""
    now = time.time()
    manifest = {
        "config": config,
        "inputs": fingerprints if fingerprints is not None else {k: fingerprint(v) for k, v in (inputs or {}).items()},
        "outputs": outputs or {},
        "versions": _versions(),
        "environment": environment,
        "started": started,
        "finished": now,
        "seconds": None if started is None else round(now - started, 1),
        "complete": True,
    }
    write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(stage_dir) -> dict:
    """The manifest `write_manifest` wrote in a stage folder (FileNotFoundError: the stage has not finished)."""
    return read_json(Path(stage_dir) / MANIFEST)
