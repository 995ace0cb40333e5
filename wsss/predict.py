"""Predict label maps with a trained segmentation net: `python -m wsss.predict --run RUN --split val`,
or of any folder of photos with `--images DIR --out OUT` (`predict_folder`), with a run's net or a
model file (`--model FILE`, `wsss.modelfile`: no run folder or dataset needed; its test-time settings
are the defaults).

One path serves every use: val predictions at the end of stage 3 (`stage3/pred/ID.png`), the
per-epoch val mIoU, and the training-set predictions that STC and PSL+ retrain on (restricted to
each image's labels). For one image:

1. the net runs at each scale (and its horizontal flip); the logits are resized to the image size
   and turned into softmax probabilities, which are averaged (and the PSL classification
   branch's sigmoid probabilities likewise);
2. gate (PSL, test time, as in AE-PSL): each object class's map is multiplied by the image-level
   probability of that class; background is kept as is;
3. restrict (training images, whose labels are known): classes absent from the image's labels get
   probability 0 (the same as setting their logits to -inf before the argmax); background stays;
4. optional dense CRF (`wsss.crf.dense_crf`) over background + the classes still present, unary
   from those (renormalised) probabilities, with the kernels published for the net
   (`wsss.crf.net_crf_params`: DeepLab v1's for VGG16 LargeFOV, DeepLab v2's otherwise);
5. argmax -> uint8 mask ids, written as a VOC palette PNG at the image's size; for self-training
   targets (`ignore_below`), 255 where the net is unsure (its largest probability, renormalised over
   the image's classes, is below the threshold) or the CRF changed the net's label.

Defaults: one scale (1.0), no flip, no CRF: fast, and what the per-epoch val mIoU measures; pass
`--scales 0.5 1 1.5 --flip --crf` for the slower, usually better, test-time setting.

The test-time flags name the folder (`pred_folder`: `pred` for the defaults, e.g.
`pred-s0.5_1_1.5-flip-crf` otherwise), so predictions with other settings never replace each other.
A prediction folder remembers its settings (`settings.json`: scales, flip, gate, restrict, CRF and
the checkpoint's fingerprint). Rerun with the same settings, it skips the images already written
(resume after a kill); with other settings, it removes the predictions it wrote and starts over.
A CRF that fails is an error, never a silent fallback to the argmax.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsss import io
from wsss.cam import crop_to_view, pad_to, scaled_views, to_input
from wsss.crf import TEST_CRF
from wsss.data.voc import DatasetError, find_images
from wsss.errors import WsssError
from wsss.layout import PRED
from wsss.nets import net_crf
from wsss.run import count_images, inference_kernels, rank_world
from wsss.shapes import MAX_SIDE, batches, bucket, scaled_size, shard_batches, size_divisor
from wsss.stage import stage_folders
from wsss.viz import overlay_with_legend, resize

log = logging.getLogger("wsss")
SETTINGS = "settings.json"
PREDICT_BATCH = {"cuda": 8, "cpu": 1}  # images of one bucket per forward (wsss.shapes); a CPU gains nothing
GATE_DEFAULT = "off"  # test-time gate of PSL nets (see add_predict_args)


def _forward(model, x: torch.Tensor, valid=None):
    out = model(x) if valid is None else model(x, valid=valid)
    return out["seg"].float(), out["cls"].float() if "cls" in out else None


@torch.inference_mode()
def predict_probs_batch(model, images, device, scales=(1.0,), flip: bool = False, gate: bool = False,
                        divisor: int = 1) -> list[torch.Tensor]:
    """Class probabilities (C, H, W) float32 on `device` of RGB uint8 images of one bucket
    (`wsss.shapes.bucket` at `divisor`; 1: images of one size), one forward per scale for all of
    them (steps 1-2 above). A padded view's logits are cropped to the view (`wsss.cam.crop_to_view`)
    before they are resized to the image."""
    sizes = [image.shape[:2] for image in images]
    if len({bucket(size, scales, divisor) for size in sizes}) > 1:
        raise ValueError(f"images of sizes {sorted(set(sizes))} pad to different shapes at divisor {divisor}")
    n = len(images)
    xs = [to_input(image[None], torch.device(device)) for image in images]  # uint8 to the device, normalised there
    probs, cls_probs = [0.0] * n, [0.0] * n
    views = 0
    for scale, padded in zip(scales, bucket(sizes[0], scales, divisor), strict=True):
        scaled = scaled_views(xs, sizes, scale, flip)
        valid = [tuple(v.shape[-2:]) for v in scaled]
        with inference_kernels(model, torch.device(device).type):
            seg, cls = _forward(model, torch.cat([pad_to(v, padded) for v in scaled]),
                                None if all(v == tuple(padded) for v in valid) else valid)
        for i, size in enumerate(sizes):
            rows = [i, n + i] if flip else [i]
            probs[i] = probs[i] + _view_logits(seg[rows], size, scaled_size(size, scale), padded).softmax(1).sum(0)
            if cls is not None:
                cls_probs[i] = cls_probs[i] + torch.sigmoid(cls[rows]).sum(0)
        views += 2 if flip else 1
    out = []
    for p, c in zip(probs, cls_probs, strict=True):
        p = p / views
        if gate:
            if not torch.is_tensor(c):
                raise ValueError("gate: the net has no classification branch (only PSL nets have one)")
            p = p * torch.cat([p.new_ones(1), c / views])[:, None, None]
        out.append(p)
    return out


def _view_logits(seg: torch.Tensor, size, view, padded) -> torch.Tensor:
    """One image's logits at one scale (its mirror's row flipped back) at the image `size`."""
    seg = crop_to_view(seg, view, padded)
    if seg.shape[0] == 2:
        seg = torch.cat([seg[:1], seg[1:].flip(-1)])
    if seg.shape[-2:] != tuple(size):
        seg = F.interpolate(seg, size=size, mode="bilinear", align_corners=False)
    return seg


def predict_probs(model, image: np.ndarray, device, scales=(1.0,), flip: bool = False,
                  gate: bool = False, divisor: int = 1) -> torch.Tensor:
    """Class probabilities (C, H, W) float32 on `device` of one RGB uint8 image (steps 1-2 above)."""
    return predict_probs_batch(model, [image], device, scales, flip, gate, divisor)[0]


def restrict_probs(probs: torch.Tensor, label_ids) -> torch.Tensor:
    """Zero the probabilities of the object classes not in `label_ids` (mask ids); background stays."""
    keep = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
    keep[0] = True
    keep[torch.as_tensor(np.asarray(label_ids, dtype=np.int64), device=probs.device)] = True
    return probs * keep[:, None, None]


def predict_masks(model, dataset, ids, *, device, scales=(1.0,), flip=False, gate=False, restrict=False,
                  desc="predict"):
    """Yield (id, RGB image, probs: (C, h, w) float32 tensor on `device`) for `ids` of a VOCDataset
    (steps 1-3), in batches of one bucket (`wsss.shapes`; on a CPU one image at a time, in order).
    An image larger than MAX_SIDE is predicted at that size, so `probs` may be smaller than the
    image: `labels_at` gives the label map at the image's size."""
    from wsss.train import unwrap

    model = unwrap(model).eval()
    device = torch.device(device)
    divisor = size_divisor(device.type)
    batch_size = PREDICT_BATCH.get(device.type, 1)
    planned = bucket_batches(dataset, ids, scales, divisor, batch_size) if batch_size > 1 else [[i] for i in ids]
    with tqdm(total=len(ids), desc=desc, leave=False) as bar:
        for batch in planned:
            fulls = [dataset.image(id_) for id_ in batch]
            images = [bounded(image, MAX_SIDE) for image in fulls]  # a huge photo: memory stays bounded
            shapes = [bucket(image.shape[:2], scales, divisor) for image in images]
            for group in batches(range(len(batch)), shapes.__getitem__, len(batch)):  # a header that lied
                probs = predict_probs_batch(model, [images[k] for k in group], device, scales, flip, gate, divisor)
                for k, p in zip(group, probs, strict=True):
                    yield batch[k], fulls[k], restrict_probs(p, dataset.label_ids(batch[k])) if restrict else p
            bar.update(len(batch))


def bucket_batches(dataset, ids, scales, divisor: int, batch_size: int) -> list[list[str]]:
    """`ids` in batches of one bucket (`wsss.shapes`), from the image headers."""
    def key(id_):
        w, h = dataset.image_size(id_)
        return bucket((h, w), scales, divisor)

    return batches(ids, key, batch_size)


def rank_share(dataset, ids, scales, device) -> list[str]:
    """This rank's images under torchrun: a contiguous run of the bucket-ordered list, so each rank
    meets few shapes (all of `ids`, in order, in a plain process)."""
    rank, world = rank_world()
    if world == 1:
        return list(ids)
    device = torch.device(device)
    planned = bucket_batches(dataset, ids, scales, size_divisor(device.type), PREDICT_BATCH.get(device.type, 1))
    return [i for b in shard_batches(planned, rank, world) for i in b]


def label_map(probs) -> np.ndarray:
    return np.asarray(torch.as_tensor(probs).argmax(0).to(torch.uint8).cpu())


def labels_at(mask: np.ndarray, shape) -> np.ndarray:
    """A label map at `shape` (nearest neighbour when it was predicted smaller, see `predict_masks`)."""
    return mask if mask.shape == tuple(shape) else resize(mask, tuple(shape), nearest=True)


def unsure(probs: np.ndarray, ignore_below: float | None) -> np.ndarray | None:
    """Where a prediction is unsure: its largest probability (over the classes in `probs`,
    renormalised) is below `ignore_below`; None when `ignore_below` is None."""
    if ignore_below is None:
        return None
    probs = np.asarray(probs)
    return probs.max(0) < ignore_below * np.maximum(probs.sum(0), 1e-8)


def _crf_job(params: dict, job, ignore_below: float | None = None):
    """Dense CRF of one image over the labels `present` (picklable, for the process pool);
    `probs` holds those labels' probabilities only. With `ignore_below` (self-training targets),
    IGNORE where the CRF and the net disagree or the net is unsure."""
    from wsss.crf import dense_crf

    id_, image, probs, present = job[:4]
    probs = probs / np.maximum(probs.sum(0, keepdims=True), 1e-8)
    crf = dense_crf(image, probs, **params).argmax(0)
    mask = present[crf].astype(np.uint8)
    if ignore_below is not None:
        mask[(crf != probs.argmax(0)) | unsure(probs, ignore_below)] = io.IGNORE
    return mask


def _present(probs: torch.Tensor, restrict_ids=None) -> np.ndarray:
    """The labels a CRF runs over: the image's labels when known, else the classes the argmax shows."""
    if restrict_ids is not None:
        return np.concatenate([[0], np.asarray(restrict_ids, dtype=np.int64)])
    shown = torch.unique(probs.argmax(0)).cpu().numpy()
    return np.union1d([0], shown).astype(np.int64)


def _prepare_folder(out_dir: Path, settings: dict, ids) -> None:
    """Keep the predictions already in `out_dir` only if they were made with these settings; else
    remove those of `ids` (what this folder's predictions are), and nothing else."""
    path = out_dir / SETTINGS
    if out_dir.is_dir():
        try:
            same = io.read_json(path) == settings
        except (OSError, ValueError):
            same = False
        if not same:
            log.info("%s: predictions with other settings; starting over", out_dir)
            for id_ in ids:
                (out_dir / f"{id_}.png").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
    if not path.is_file():
        io.write_json(path, settings)


@dataclass(frozen=True)
class PredictOptions:
    """How a net's predictions are made (the steps of the module docstring); a prediction folder
    remembers them (`settings.json`).

    `scales` (probabilities averaged), `flip` (the mirror image too), `gate` (PSL: class maps times
    the classification branch's probabilities); `crf`: dense CRF over the classes present with
    `crf_params` (default DeepLab v2 ResNet-101's; `net_crf` gives a run's). Training images only
    (they need the dataset's labels, so `predict_folder` refuses them): `restrict` keeps only each
    image's labelled classes; `ignore_below` (self-training targets) writes IGNORE where the net's
    largest probability (renormalised over the classes present) is below it and, with `crf`, where
    the CRF changes the net's label."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    gate: bool = False
    crf: bool = False
    crf_params: dict | None = None
    restrict: bool = False
    ignore_below: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(self.scales))

    @classmethod
    def from_flags(cls, args, has_cls: bool, crf_params=None) -> PredictOptions:
        """The test-time flags of `add_predict_args` for a net with (`has_cls`) or without a
        classification branch (--gate needs one), the CRF with `crf_params`."""
        return cls(scales=args.scales, flip=args.flip, gate=has_cls and args.gate == "on", crf=args.crf,
                   crf_params=crf_params)

    @property
    def crf_kernels(self) -> dict | None:
        """The kernels the CRF runs with, None without one (`crf_settings`)."""
        return crf_settings(self.crf, self.crf_params)


def predict_split(model, dataset, ids, out_dir, *, device, options: PredictOptions = PredictOptions(),
                  workers=1, checkpoint=None, desc="predict") -> Path:
    """Write out_dir/ID.png (palette) for `ids` as `options` says, skipping those already there
    (see the module docstring). The CRFs run in a pool of `workers` processes. Under torchrun each
    rank predicts its share of the ids. Returns out_dir.
    """
    from wsss.run import barrier, is_main_process

    out_dir, t = Path(out_dir), options
    crf_params = t.crf_kernels
    settings = {"scales": [float(s) for s in t.scales], "flip": bool(t.flip), "gate": bool(t.gate),
                "restrict": bool(t.restrict), "crf": crf_params,
                "checkpoint": io.fingerprint(checkpoint) if checkpoint else None}
    if t.ignore_below is not None:  # only then: the folders written before the option stay valid
        settings["ignore_below"] = float(t.ignore_below)
    if is_main_process():
        _prepare_folder(out_dir, settings, ids)
    barrier()
    ids = rank_share(dataset, ids, t.scales, device)
    todo = [i for i in ids if not (out_dir / f"{i}.png").is_file()]
    count_images(len(todo))
    if len(todo) < len(ids):
        log.info("%s: %d of %d predictions already written", out_dir, len(ids) - len(todo), len(ids))
    stream = predict_masks(model, dataset, todo, device=device, scales=t.scales, flip=t.flip, gate=t.gate,
                           restrict=t.restrict, desc=desc)
    if crf_params is None:
        for id_, image, probs in stream:
            mask = label_map(probs)
            if t.ignore_below is not None:
                present = _present(probs, dataset.label_ids(id_) if t.restrict else None)
                mask[unsure(probs[torch.as_tensor(present, device=probs.device)].cpu().numpy(), t.ignore_below)] = \
                    io.IGNORE
            io.write_mask(out_dir / f"{id_}.png", labels_at(mask, image.shape[:2]))
    else:
        _run_crfs(_crf_jobs(stream, dataset, t.restrict), len(todo), crf_params, workers, out_dir, t.ignore_below)
    barrier()
    return out_dir


def _crf_jobs(stream, dataset, restrict: bool):
    """CRF jobs (id, image at the probabilities' size, probabilities of the labels present, those
    labels, the image's own size) of a prediction stream."""
    for id_, image, probs in stream:
        present = _present(probs, dataset.label_ids(id_) if restrict else None)
        small = image if probs.shape[1:] == image.shape[:2] else resize(image, tuple(probs.shape[1:]))
        yield (id_, small, probs[torch.as_tensor(present, device=probs.device)].cpu().numpy(), present,
               image.shape[:2])


def _run_crfs(jobs, total: int, params, workers, out_dir: Path, ignore_below=None) -> None:
    """CRF the predictions as the net makes them, in one process pool that runs beside it (the pass
    takes about the longer of the two, not their sum); a CRF that fails fails the prediction (the
    images already written are kept, a rerun resumes)."""
    from wsss.stage import StageError
    from wsss.workers import parallel_map

    crf = partial(_crf_job, params, ignore_below=ignore_below)
    for (id_, _, _, _, shape), mask, error in parallel_map(crf, jobs, workers, desc="crf", total=total):
        if error is not None:
            raise StageError(f"{out_dir}: the dense CRF failed on {id_} ({type(error).__name__}: {error}); "
                             f"rerun without --crf to predict without it")
        io.write_mask(out_dir / f"{id_}.png", labels_at(mask, shape))


def crf_settings(crf: bool, crf_params=None) -> dict | None:
    """The kernels a prediction's CRF runs with: None without `crf`; else `crf_params`, by default
    DeepLab v2 ResNet-101's (`net_crf` gives a run's)."""
    if not crf:
        return None
    return dict(TEST_CRF["deeplab-v2-aspp-resnet101"] if crf_params is None else crf_params)


# ---------------------------------------------------------------- any folder of photos

MASKS, OVERLAYS, INDEX = "masks", "overlays", "masks.json"  # the layout of OUT (see predict_folder)
PHOTO_KEY = "wsss-photo"  # a mask's (and overlay's) PNG text: the hash of the photo it was made from


def bounded(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image scaled down so that its longer side is at most `max_side` (unchanged if it is)."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    return resize(image, (max(1, round(h * scale)), max(1, round(w * scale))))


def predict_image(model, image: np.ndarray, device, *, scales=(1.0,), flip=False, gate=False,
                  crf_params=None, max_side: int = 1024) -> np.ndarray:
    """uint8 label mask (H, W) of one RGB photo of any size."""
    h, w = image.shape[:2]
    small = bounded(image, max_side)
    probs = predict_probs(model, small, device, scales, flip, gate, size_divisor(torch.device(device).type))
    if crf_params is None and small is image:
        return label_map(probs)
    present = _present(probs)
    sub = probs[torch.as_tensor(present, device=probs.device)]
    if crf_params is not None:
        from wsss.stage import StageError

        try:
            mask = _crf_job(crf_params, (None, small, sub.cpu().numpy(), present))
        except Exception as e:  # noqa: BLE001 - any failure of the CRF: a mask left unrefined would pass for a refined one
            raise StageError(f"the dense CRF failed ({type(e).__name__}: {e}); rerun without --crf to predict "
                             f"without it") from e
        return resize(mask, (h, w), nearest=True)
    full = F.interpolate(sub[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return present[label_map(full)].astype(np.uint8)


def mask_name(rel: Path) -> Path:
    return rel.with_suffix(".png")


def check_apart(out: Path, folders: dict[str, Path]) -> None:
    """Refuse an OUT that is, contains or lies inside one of `folders` ({what: folder}): writing
    there could overwrite a photo, the dataset, or a stage's artifacts."""
    b = Path(out).resolve()
    for what, folder in folders.items():
        a = Path(folder).resolve()
        if a == b or a in b.parents or b in a.parents:
            raise DatasetError(f"--out {out} and {what} {folder} overlap; write the masks to a separate folder")


def check_split_out(out: Path, run: Path, stage: Path, default: Path) -> None:
    """Refuse an --out of split predictions that could replace another stage's artifacts. It must lie
    inside the run's folder, and either outside every stage folder or be `default`, the stage's
    own prediction folder for these test-time flags (`pred_folder`): a prediction folder with other
    settings is emptied of its predictions, so no other folder of a stage qualifies, not even
    another pred* folder (its predictions belong to other flags)."""
    from wsss.stage import StageError

    o, r = Path(out).resolve(), Path(run).resolve()
    if not o.is_relative_to(r):
        raise StageError(f"--out {out}: outside the run's folder {run}")
    if o == r:
        raise StageError(f"--out {out}: the run's folder itself holds every stage folder; choose a folder inside it")
    if o == Path(default).resolve():
        return
    for folder in stage_folders(run):
        if o.is_relative_to(folder.resolve()):
            raise StageError(f"--out {out}: inside the stage folder {folder}, whose artifacts predictions there "
                             f"could replace; leave --out out (predictions go to {default}) or choose a folder "
                             f"of the run outside its stage folders")
    top = r / o.relative_to(r).parts[0]
    if top.name.startswith("stage"):  # a stage folder not made yet: it will be the stage's
        raise StageError(f"--out {out}: inside {top}, the name of a stage folder; choose a folder of the run "
                         f"outside its stage folders")


def plan(images: Path, out: Path) -> list[Path]:
    """The photos' relative paths; errors for a missing folder, overlapping folders, clashing names."""
    if not images.is_dir():
        raise DatasetError(f"{images}: image folder not found")
    check_apart(out, {"--images": images})
    rels = [p.relative_to(images) for p in find_images(images)]
    if not rels:
        raise DatasetError(f"{images}: no images (.jpg, .jpeg, .png, .webp) found")
    seen = {}
    for rel in rels:
        name = mask_name(rel)
        if name in seen:
            raise DatasetError(f"{images / seen[name]} and {images / rel}: both would write "
                               f"{out / MASKS / name}; rename one of them")
        seen[name] = rel
    for rel in rels:  # header only: a file that is not an image (or too large to decode) is reported up front
        try:
            io.image_size(images / rel)
        except (OSError, ValueError) as e:
            raise DatasetError(str(e)) from e
    return rels


def _prepare_out(out: Path, settings: dict) -> None:
    path = out / SETTINGS
    if out.is_dir() and any(out.iterdir()):
        try:
            same = io.read_json(path) == settings
        except (OSError, ValueError):
            same = False
        if not same:
            raise DatasetError(f"{out}: not empty and holds no predictions with these settings; choose another "
                               f"--out (nothing in it is deleted)")
        return
    io.write_json(path, settings)


def mask_summary(mask: np.ndarray, names) -> dict:
    ids, counts = np.unique(mask, return_counts=True)
    return {(names[c] if c < len(names) else "ignore" if c == 255 else str(c)): round(n / mask.size, 4)
            for c, n in zip(ids.tolist(), counts.tolist(), strict=True)}


def predict_folder(model, images, out, names, *, device, options: PredictOptions = PredictOptions(),
                   max_side: int = 1024, overlay=False, checkpoint=None) -> dict:
    """Masks for any folder of photos: `python -m wsss.predict --run RUN --images DIR --out OUT`.

    No image labels are needed: a PSL net's classification branch gates the class maps (`--gate`),
    as at val time. Every photo under DIR (jpg/jpeg/png/webp, nested) is predicted by the run's final
    stage-3 net (wsss.predict, steps 1, 2 and 4) and written with its relative path:

        OUT/masks/REL.png       palette PNG at the photo's full size (0 background, 1..C-1 the classes)
        OUT/overlays/REL.png    with --overlay: the photo (at most --max-side) blended with its mask,
                                a legend of the classes found below
        OUT/masks.json          each photo's mask, size, and its classes with their pixel fractions
        OUT/settings.json       the settings the masks were made with

    `options`: scales, flip, gate and CRF (`PredictOptions`; the CLI passes the run's `net_crf`); a CRF
    that fails is an error naming the photo (the masks already written are kept).

    A photo larger than --max-side is predicted at that size (the net was trained near the dataset's
    scale, and memory stays bounded); the probabilities of the classes found are then resized
    bilinearly to the full size before the argmax (after a CRF, the labels nearest-neighbour).

    Resume: rerun with the same settings and the photos already done are kept. Each mask and overlay
    carries the hash of the photo it was made from (in its PNG text, written with it in one atomic
    write), so the mask of a photo edited since, or of another folder's photo of the same name, is
    redone, never kept. OUT is never emptied:
    an OUT that is not empty and holds no predictions with these settings is an error, as is an OUT
    inside DIR (or DIR inside OUT), so no photo can be overwritten. The CLI also keeps OUT apart from
    the dataset and the stage folder, and holds the stage folder's lock while it predicts.

    Returns the masks.json index.
    """
    images, out, t = Path(images), Path(out), options
    if t.restrict or t.ignore_below is not None:
        raise ValueError("predict_folder: a folder of photos has no image labels (restrict, ignore_below)")
    rels = plan(images, out)
    settings = {"scales": [float(s) for s in t.scales], "flip": bool(t.flip), "gate": bool(t.gate),
                "crf": t.crf_kernels, "max_side": int(max_side),
                "checkpoint": io.fingerprint(checkpoint) if checkpoint else None}
    _prepare_out(out, settings)
    index = {}
    for rel in tqdm(rels, desc="predict", leave=False):
        overlay_path = out / OVERLAYS / mask_name(rel)
        try:
            photo = {PHOTO_KEY: io.file_hash(images / rel)}
        except OSError as e:
            raise DatasetError(f"{images / rel}: cannot read image ({e.strerror or e})") from e
        mask, image = _photo_mask(model, images / rel, out / MASKS / mask_name(rel), photo, device, t, max_side)
        if overlay and io.png_text(overlay_path).get(PHOTO_KEY) != photo[PHOTO_KEY]:
            image = io.read_image(images / rel) if image is None else image
            small = bounded(image, max_side)
            io.write_png(overlay_path, overlay_with_legend(small, resize(mask, small.shape[:2], nearest=True), names),
                         photo)
        index[rel.as_posix()] = {"mask": f"{MASKS}/{mask_name(rel).as_posix()}",
                                 "overlay": f"{OVERLAYS}/{mask_name(rel).as_posix()}" if overlay else None,
                                 "size": [int(mask.shape[1]), int(mask.shape[0])],
                                 "classes": mask_summary(mask, names)}
    result = {"classes": list(names), "images": index}
    io.write_json(out / INDEX, result)
    return result


def _photo_mask(model, path: Path, mask_path: Path, photo: dict, device, options: PredictOptions,
                max_side: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(the photo's mask, the photo if it was read): the mask at `mask_path` when it was made from
    this photo (its PNG text holds `photo`'s hash), else predicted and written there with it."""
    from wsss.stage import StageError

    if mask_path.is_file() and io.png_text(mask_path).get(PHOTO_KEY) == photo[PHOTO_KEY]:
        return io.read_mask(mask_path), None
    try:
        image = io.read_image(path)
    except (OSError, ValueError) as e:
        raise DatasetError(str(e)) from e
    try:
        mask = predict_image(model, image, device, scales=options.scales, flip=options.flip, gate=options.gate,
                             crf_params=options.crf_kernels, max_side=max_side)
    except StageError as e:
        raise StageError(f"{path}: {e}") from e
    io.write_mask(mask_path, mask, photo)
    return mask, image


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    from wsss.run import runtime_parser, safe_name

    p = runtime_parser("Predict label maps of a split with the final net of a stage-3 run, or of any folder "
                       "of photos with a run's net or a model file (--model: no run folder or dataset needed).")
    p.add_argument("--tag", default=None, type=safe_name,
                   help="stage-3 variant: reads outputs/RUN/stage3-TAG (default stage3)")
    p.add_argument("--split", default=None, type=safe_name, help="split to predict (default: the run's --val-split)")
    p.add_argument("--net", default=None,
                   help="another net the stage trained, by folder (stc/i, stc/e, psl before psl-plus; the "
                        "manifest's outputs.nets): predictions go to pred-NET... (default: the final net)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder inside OUTPUTS/RUN and outside its stage folders (default: "
                        "STAGE/pred_folder(), with the split's name after 'pred' for another split than val); "
                        "with --images, any folder outside the dataset, DIR and the run's stage folders (required)")
    g = p.add_argument_group("any folder of photos (see predict_folder in wsss/predict.py)")
    g.add_argument("--model", type=Path, default=None,
                   help="a model file (stage3/model.pt, or python -m wsss.modelfile) instead of --run: its "
                        "net, class names and test-time settings; needs --images and --out")
    g.add_argument("--images", type=Path, default=None,
                   help="predict every photo under this folder (nested; jpg/jpeg/png/webp) instead of a split; "
                        "needs --out")
    g.add_argument("--overlay", action="store_true", help="also write each photo blended with its mask, with a legend")
    g.add_argument("--max-side", type=int, default=None,
                   help="predict larger photos at this longer side (the mask is returned at full size); "
                        f"default {MAX_SIDE}, or the model file's")
    add_predict_args(p, from_model=True)
    return p


def add_predict_args(p: argparse.ArgumentParser, from_model: bool = False) -> None:
    """Test-time flags, shared with stages/stage3.py: they name the prediction folder (pred_folder)
    and are never part of stage 3's config. `from_model` (wsss.predict): each defaults to None, the
    model file's setting with --model and stage 3's default otherwise (`test_time_settings`), and
    --flip/--crf have --no-flip/--no-crf to turn off a model file's."""
    from wsss.run import add_scales, test_time

    switch = argparse.BooleanOptionalAction if from_model else "store_true"

    def default(run_default: str) -> str:
        return f"; default: the model file's with --model, else {run_default}" if from_model else ""

    test_time(add_scales(p, "--scales", default=None if from_model else [1.0],
                         help="test scales, 0.5 1 1.5 or 0.5,1,1.5 (probabilities averaged)" + default("1")))
    test_time(p.add_argument("--flip", action=switch, default=None if from_model else False,
                             help="also average the horizontally flipped image" + default("off")))
    test_time(p.add_argument("--crf", action=switch, default=None if from_model else False,
                             help="dense CRF on the predictions, with the kernels published for the net "
                                  "(DeepLab v1's for VGG16 LargeFOV, DeepLab v2's otherwise)"
                                  + default("off")))
    # Off by default, against AE-PSL's test-time rule: the gate can only take pixels from the objects, and a
    # branch unsure of a small object's class erases it; the PSL net on the VOC-like data scored 5.6
    # points more without it, the demo's the same (docs/results.md, "The PSL gates").
    test_time(p.add_argument("--gate", choices=["on", "off"], default=None if from_model else GATE_DEFAULT,
                             help="PSL nets: multiply the class maps by the classification branch's probabilities "
                                  "(as AE-PSL does at test time); nets without the branch ignore it"
                                  + default(GATE_DEFAULT)))


def test_time_settings(args, model_info: dict | None = None) -> None:
    """Fill in the test-time flags left out (None): the model file's settings, else stage 3's defaults."""
    tt = (model_info or {}).get("test_time")
    if args.scales is None:
        args.scales = list(tt["scales"]) if tt else [1.0]
    if args.flip is None:
        args.flip = bool(tt["flip"]) if tt else False
    if args.crf is None:
        args.crf = bool(tt["crf"]) if tt else False
    if args.gate is None:
        args.gate = ("on" if tt["gate"] else "off") if tt else GATE_DEFAULT
    if args.max_side is None:
        args.max_side = int(tt["max_side"]) if tt else MAX_SIDE


def pred_folder(scales, flip: bool, crf: bool, gate: str, split: str = "", net: str = "") -> str:
    """The folder of predictions made with these test-time flags: `pred` for the final net, one scale,
    no flip, no CRF and the gate on (the defaults of older versions: their folders keep their meaning),
    on the val split, else `pred[-NET][-SPLIT]-s0.5_1-flip-crf-nogate` (NET with '-' for '/':
    `pred-stc-i`); today's defaults, gate off, write `pred-nogate`."""
    parts = [net.replace("/", "-")] if net else []
    parts += [split] if split else []
    if [float(s) for s in scales] != [1.0]:
        parts.append("s" + "_".join(f"{float(s):g}" for s in scales))
    parts += [name for name, on in (("flip", flip), ("crf", crf), ("nogate", gate == "off")) if on]
    return "-".join([PRED, *parts])


def main(argv=None) -> int:
    from wsss import nets
    from wsss.crf import check_crf
    from wsss.run import resolve_device, run_dir, setup_logging
    from wsss.stage import StageError, check_same_dataset, error_line, lock, release

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images is not None and args.out is None:
        parser.error("--images needs --out (the folder the masks go to)")
    if args.model is not None:
        if args.images is None:
            parser.error("--model needs --images and --out (a model file predicts folders of photos)")
        return _predict_with_model(args)
    test_time_settings(args)
    try:
        stage, config = nets.stage_config(args)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    split = args.split or config["val_split"]
    net = ""  # the final net's predictions are named without it
    if args.net is not None:
        try:
            net = "" if args.net == nets.trained_nets(stage)[0] else args.net
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    out = args.out or stage / pred_folder(args.scales, args.flip, args.crf, args.gate,
                                          "" if split == config["val_split"] else split, net)
    try:
        if args.images is not None:  # the user's own folder for their photos: anywhere apart from these
            check_apart(out, {"--images": args.images, "the dataset": Path(config["data"]), "the stage folder": stage,
                              **{f"the stage folder {s.name} of the run": s for s in stage_folders(run_dir(args))}})
        else:
            check_split_out(out, run_dir(args), stage, stage / pred_folder(
                args.scales, args.flip, args.crf, args.gate, "" if split == config["val_split"] else split, net))
        if args.crf:
            check_crf("predict", "no --crf")
        lock(stage, "stage 3 or wsss.predict")
        setup_logging(stage, "predict")
        device = resolve_device(args.device)
        model, checkpoint, has_cls = nets.load_net(stage, config, device, args.net)
        if args.images is not None:
            return _predict_folder(args, model, checkpoint, has_cls, config, device)
        dataset = nets.open_dataset(config["data"], split)
        check_same_dataset(stage, dataset, "predict", keys=("class names", "labels"))
        dataset.validate()
        predict_split(model, dataset, dataset.ids, out, device=device,
                      options=PredictOptions.from_flags(args, has_cls, net_crf(config)),
                      workers=args.workers, checkpoint=checkpoint, desc=f"predict {split}")
    except (FileNotFoundError, WsssError, OSError, ValueError) as e:  # WsssError: StageError, DeviceError...
        print(f"error: {error_line(e) or e}", file=sys.stderr)
        return 1
    finally:
        release(stage)
    print(f"wrote {len(dataset.ids)} predictions to {out}")
    return 0


def _predict_with_model(args) -> int:
    """--model FILE --images DIR --out OUT: the model file holds the net, its classes and its test-time
    settings (flags given override them); no run folder, dataset or lock is involved."""
    from wsss.crf import check_crf
    from wsss.modelfile import load_model
    from wsss.run import resolve_device
    from wsss.stage import error_line

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        device = resolve_device(args.device)
        model, info = load_model(args.model, device)
        test_time_settings(args, info)
        if args.crf:
            check_crf("predict", "--no-crf")
        options = PredictOptions.from_flags(args, info["architecture"]["cls_branch"],
                                        info["test_time"]["crf_params"] or None)
        result = predict_folder(model, args.images, args.out, info["classes"], device=device, options=options,
                                max_side=args.max_side, overlay=args.overlay, checkpoint=args.model)
    except (FileNotFoundError, WsssError, OSError, ValueError) as e:  # WsssError: StageError, DeviceError...
        print(f"error: {error_line(e) or e}", file=sys.stderr)
        return 1
    _report(args, result)
    return 0


def _report(args, result: dict) -> None:
    print(f"wrote {len(result['images'])} masks to {args.out / 'masks'}"
          + (f" and overlays to {args.out / 'overlays'}" if args.overlay else "")
          + f", index {args.out / 'masks.json'}")


def _predict_folder(args, model, checkpoint, has_cls, config, device) -> int:
    from wsss.data.voc import class_names

    result = predict_folder(model, args.images, args.out, class_names(config["data"]), device=device,
                            options=PredictOptions.from_flags(args, has_cls, net_crf(config)),
                            max_side=args.max_side, overlay=args.overlay, checkpoint=checkpoint)
    _report(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
