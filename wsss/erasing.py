"""Stage 1: CAM classifier and adversarial erasing (Wei et al., CVPR 2017, "Object Region Mining
with Adversarial Erasing").

A classifier trained on image labels looks only at the most discriminative part of an object
(a face, a wheel), so its CAM covers little of the object. Adversarial erasing repeats, for
steps k = 1..K:

1. train the CAM classifier (multi-label soft-margin loss, backbone at lr, head at 10 x lr) on
   the training images with the union of the regions mined in steps < k erased: those pixels
   are set to the mean pixel (zero after normalisation), at full image resolution before
   augmentation, so scaling and cropping see the erased image as one picture;
2. compute multi-scale + flip CAMs (wsss.cam) of every training image, erased as in 1;
3. mine for each labelled class the pixels whose normalised CAM exceeds `--ae-threshold`.

With its most discriminative part gone, the step-k classifier must find other evidence for the
class, and its CAM moves to other parts of the object. Per class, the max of the steps' CAMs
(the union score) above `--seed-threshold` is the mined object region that stage 2 turns into
pseudo-masks (a lower threshold than the erasing one: see SEED_THRESHOLD).

Choices (flags); what each was measured to do is in docs/results.md, "Stage 1".

- `--ae-threshold 0.7` (not the 0.5 of PSA/IRN-style seeds). At output stride 16 a CAM is a blurred
  blob: at 0.5 the step-1 region already holds nearly all of the discriminative parts, much of the
  object bodies and about as many background pixels again as a small object has, so erasing it
  leaves little object to find and every further step adds its own margin of background. At 0.7
  the step-1 region is the discriminative part and its surroundings, which is what erasing assumes.
- `--ae-init previous` (default): step k starts from step k-1's weights. The paper trains each
  step's network from the ImageNet model, for several epochs (`imagenet` reproduces that, and is
  the choice for a GPU preset). With the few epochs a CPU affords, a fresh network does not learn the
  erased images well; starting from step k-1, the network already knows the classes and only has
  to find other evidence for them.
- Stopping rule: the paper stops when the classifier "cannot converge well" on the erased images
  (its 4th step, whose regions were mostly background, hurt). Here a step k > 1 whose final-epoch
  mean loss exceeds `--ae-stop-loss` is discarded (no CAMs computed) and erasing stops. The default,
  `auto`, is halfway between step 1's final loss and the loss of the best constant predictor (each
  class predicted at its frequency, i.e. a classifier that learned nothing from pixels): a step
  that has lost more than half of what step 1 learned over chance no longer finds the objects. It
  adapts to the number of classes, their frequencies and the training budget (epochs, GPU or CPU).

Artifacts in outputs/RUN/stage1/: per step `step{k}/checkpoint.pt`, `metrics.jsonl`, `cam/ID.npz`,
`regions/ID.png` (class id where mined in this step, 0 elsewhere) and `done.json` (written last:
a step without it is redone, resuming its training mid-way and keeping the CAM files already
written); then `regions/ID.npz` {"keys", "masks" bool (n, H, W): the union score above
--seed-threshold, "score": the max normalised CAM over steps, stored as CAMs are (wsss.scoremaps)},
`regions/ID.png` and `overlay/ID.png`. Images without labels are skipped (counted in the log) and get
empty CAM and region files.

Defaults run the whole stage on the embedded synthetic dataset on 2 CPU cores in minutes.
The settings for PASCAL VOC 2012 (train_aug, 10,582 images) on a GPU are the presets in `wsss/presets/`
(`--preset voc-vgg16`: the paper's VGG16 with ImageNet init at every step; `voc-r101`). Check the
seeds of a run with `python -m wsss.eval --run NAME --stage stage1` (step 1 vs the union, and a CAM
threshold sweep of step 1 and of the union score) and set `--seed-threshold` to the union's best
threshold if your data has ground truth for a few images; `python -m bench.bench_cam_baseline` checks
that the union beats the plain CAM of the same run's last classifier (not only the first).
"""
from __future__ import annotations

import argparse
import logging
import math
import warnings
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from wsss import io
from wsss.cam import load_cams, multiscale_cams_batch, save_cams
from wsss.crf import check_crf
from wsss.data.transforms import normalize, train_augment
from wsss.data.voc import DatasetError, VOCDataset, list_path
from wsss.fusion import regions_label_map
from wsss.layout import CAMS, DONE, OVERLAY, REGIONS, RW, STAGE1, STEP_GLOB, Stage1Folder, item, step_name
from wsss.mining import erase, mine
from wsss.models.classifier import build_classifier
from wsss.run import (
    add_epoch_val,
    add_scales,
    barrier,
    count_images,
    is_main_process,
    phase,
    positive_int,
    process_pool,
    rank_world,
    resolve_amp,
    resolve_device,
    runtime,
    shard,
    spread,
)
from wsss.rw import add_args as add_rw_args
from wsss.rw import run_rw
from wsss.scoremaps import write_seeds
from wsss.shapes import MAX_SIDE, batches, bucket, fitted_size, shard_batches, size_divisor
from wsss.stage import check_processes, dataset_inputs, open_stage
from wsss.train import TrainConfig, epoch_metrics, fit, init_distributed, torch_device

log = logging.getLogger("wsss")
CAM_BATCH = {"cuda": 8, "cpu": 1}  # same-size images per multiscale_cams_batch call (see wsss/cam.py)
CAM_CHUNK = 8  # images per task of a CAM worker process


# ---------------------------------------------------------------- flags

# The union's regions are thresholded apart from what is erased. Erasing wants only the most
# discriminative part gone (--ae-threshold 0.7), while a seed wants as much of the object as the CAM
# holds without its background margin, and that level is lower where objects are small (their CAM
# blobs peak on a few pixels): VOC-like data wants a lower threshold than the embedded set, which
# wants one a little under 0.7. 0.55 scored best over both datasets' sweeps (docs/results.md, "The
# default chain on the VOC-like data").
SEED_THRESHOLD = 0.55

# A floor of SGD steps per erasing step: an epoch budget shrinks with the dataset (3 epochs of 600 images
# at batch 16 are 111 steps, and a 20-class classifier is still at val mAP 0.44 there with a useless CAM),
# while 3 epochs of VOC's train_aug are 1,983 steps, where the floor never binds. 300 steps took the
# VOC-like step-1 classifier to mAP 0.83 and its CAM from 6.5 to 40.9 at the best threshold, at crop 160
# (crop 224 did no better: 37.7); the chain's figures are in docs/results.md, "Stage 1's budget".
ITERATIONS = 300

def _stop_loss(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected 'auto' or a number") from None


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("stage 1: classifier, CAM and adversarial erasing")
    g.add_argument("--backbone", default="efficientnet-lite0",
                   help="vgg16 | resnet50 | resnet101 | efficientnet-lite0 (lite1/lite2 if installed)")
    g.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a backbone state dict")
    g.add_argument("--output-stride", type=int, default=16, choices=[8, 16])
    g.add_argument("--epochs", type=positive_int, default=3, help="training epochs per erasing step")
    g.add_argument("--iterations", type=int, default=ITERATIONS,
                   help="at least this many SGD steps per erasing step (more epochs on a small dataset: an "
                        "epoch of a few hundred images is a few dozen steps; see ITERATIONS); 0: --epochs alone")
    g.add_argument("--batch-size", type=positive_int, default=16)
    g.add_argument("--lr", type=float, default=0.01, help="backbone learning rate (the head gets 10x)")
    g.add_argument("--crop", type=positive_int, default=160, help="training crop size")
    add_scales(g, "--cam-scales", container=tuple, default=(0.5, 1.0, 1.5),
               help="CAM scales, 0.5,1,1.5 or 0.5 1 1.5 (0.5,1.0,1.5,2.0 as PSA/IRN on a GPU)")
    g.add_argument("--cam-flip", action=argparse.BooleanOptionalAction, default=True,
                   help="add the CAM of the mirrored image")
    g.add_argument("--ae-steps", type=positive_int, default=3, help="erasing steps K")
    g.add_argument("--ae-threshold", type=float, default=0.7, help="mine (and erase) where the normalised CAM "
                   "exceeds this")
    g.add_argument("--seed-threshold", type=float, default=SEED_THRESHOLD,
                   help="the union's regions (stage 2's seeds): where the max normalised CAM over the kept steps "
                        "exceeds this (see SEED_THRESHOLD)")
    g.add_argument("--ae-init", choices=["imagenet", "previous"], default="previous",
                   help="step k starts from the ImageNet backbone or from step k-1's weights")
    g.add_argument("--ae-stop-loss", type=_stop_loss, default="auto",
                   help="stop when a step's final-epoch loss exceeds this; auto = halfway between step 1's "
                        "final loss and the loss of predicting each class at its frequency")
    g.add_argument("--max-side", type=positive_int, default=MAX_SIDE,
                   help="images whose longer side exceeds this are downscaled to it for their CAMs (and the "
                        "CAMs upscaled back), so one huge photo cannot exhaust memory: a 1024x768 image at "
                        "scales 0.5,1.0,1.5 with flip took 1.0 GB more (efficientnet-lite0, resnet50), 1.9 GB "
                        "(vgg16); VOC photos (at most 500 px) are never downscaled")
    runtime(g.add_argument("--overlays", type=int, default=24, help="number of overlay pictures to draw"))
    add_epoch_val(g)
    add_rw_args(parser)
    return parser


def step_epochs(epochs: int, iterations: int, images: int, batch_size: int) -> int:
    """Epochs of an erasing step: `epochs`, or more where that is fewer than `iterations` SGD steps.

    A budget in epochs shrinks with the dataset: 3 epochs of 600 images at batch 16 are 111 steps,
    too few for a 20-class classifier (docs/results.md, "Stage 1's budget"), while 3 epochs of VOC's
    10,582 are 1,983. `--iterations` sets a floor in steps that does not."""
    per_epoch = max(images // batch_size, 1)
    return max(epochs, math.ceil(iterations / per_epoch))


# ---------------------------------------------------------------- erasing

def erased_region(id_: str, region_dirs: list[Path], shape: tuple[int, int]) -> np.ndarray:
    """Pixels mined for any class in the steps whose region folders are given (bool H x W)."""
    mask = np.zeros(shape, dtype=bool)
    for d in region_dirs:
        path = item(d, id_)
        region = io.read_mask(path)
        if region.shape != tuple(shape):
            raise DatasetError(f"{path}: region size {region.shape[1]}x{region.shape[0]} differs from the "
                               f"image size {shape[1]}x{shape[0]}")
        mask |= region != 0
    return mask


def erased_image(dataset: VOCDataset, id_: str, region_dirs: list[Path]) -> np.ndarray:
    image = dataset.image(id_)
    if not region_dirs:
        return image
    return erase(image, erased_region(id_, region_dirs, image.shape[:2]))


class ErasedImages:
    """Training items of one erasing step (the `item(index, rng)` contract of wsss.train.fit)."""

    def __init__(self, dataset: VOCDataset, ids: list[str], region_dirs: list[Path], crop: int):
        self.dataset, self.ids, self.region_dirs, self.crop = dataset, ids, region_dirs, crop

    def __len__(self) -> int:
        return len(self.ids)

    def item(self, index: int, rng: np.random.Generator) -> dict:
        id_ = self.ids[index]
        image, _ = train_augment(erased_image(self.dataset, id_, self.region_dirs), None, self.crop, rng)
        return {"image": normalize(image), "label": self.dataset.labels(id_)}


def classification_step(model, batch: dict, epoch: int):
    logits = model(batch["image"].contiguous(memory_format=torch.channels_last))
    return F.multilabel_soft_margin_loss(logits.float(), batch["label"]), {}


# ---------------------------------------------------------------- evaluation of the classifier

def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = labels[order] > 0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def classification_map(model, dataset: VOCDataset, ids: list[str], device) -> float:
    """Mean average precision of the image labels on `ids` (whole images at most MAX_SIDE, one scale;
    under the caller's autocast: wsss.train.fit runs it under the training's)."""
    model.eval()
    scores, labels = [], []
    with torch.inference_mode():
        for id_ in ids:
            x = torch.from_numpy(normalize(fit_side(dataset.image(id_), MAX_SIDE)))[None].to(device)  # bounded memory
            scores.append(torch.sigmoid(model(x.contiguous(memory_format=torch.channels_last))).float().cpu()[0])
            labels.append(dataset.labels(id_))
    scores, labels = torch.stack(scores).numpy(), np.stack(labels)
    aps = [average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1]) if labels[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def stop_loss_of(flag: str | float, step1_loss: float, chance_loss: float) -> float:
    """The stop level: the flag's number, or for `auto` halfway between step 1's final loss and the
    constant predictor's (see the module docstring)."""
    return (step1_loss + chance_loss) / 2 if flag == "auto" else float(flag)


def constant_predictor_loss(labels: np.ndarray) -> float:
    """Multi-label soft-margin loss of predicting each class at its frequency (binary entropy)."""
    p = np.clip(labels.mean(axis=0), 1e-7, 1 - 1e-7)
    return float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))))


# ---------------------------------------------------------------- one step

def build_model(args, num_classes: int, step: int, out: Path):
    torch.manual_seed(args.seed + 1000 * step)
    weights = None if args.weights == "none" else args.weights
    model = build_classifier(args.backbone, num_classes - 1, output_stride=args.output_stride, weights=weights)
    if args.ae_init == "previous" and step > 1:
        model.load_state_dict(io.load_checkpoint(Stage1Folder(out).checkpoint(step - 1))["model"])
    return model.to(memory_format=torch.channels_last)


@dataclass(frozen=True)
class CamJob:
    """What writing one step's CAMs and regions needs besides the model (picklable, for workers)."""
    dataset: VOCDataset
    labelled: frozenset
    step_dir: Path
    region_dirs: tuple
    scales: tuple
    flip: bool
    threshold: float
    max_side: int = 1024
    amp: str = "off"  # a resolved --amp


def fit_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """`image` downscaled so that its longer side is at most `max_side` (unchanged if it is)."""
    h, w = fitted_size(image.shape[:2], max_side)
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def cam_batches(job: CamJob, ids: list[str], divisor: int, batch_size: int) -> list[list[str]]:
    """`ids` in batches of one bucket each (`wsss.shapes`), from the image headers; the order is
    the same on every rank, so that ranks can split it."""
    def key(id_: str):
        w, h = job.dataset.image_size(id_)
        return bucket(fitted_size((h, w), job.max_side), job.scales, divisor)

    return batches(ids, key, batch_size)


def write_cams(model, job: CamJob, ids: list[str], device: torch.device) -> int:
    """cam/ID.npz and regions/ID.png of `ids` (erased by the earlier steps); returns len(ids).

    The labelled images go through the net CAM_BATCH at a time, in the order given: callers pass
    them grouped by bucket (`cam_batches`), so a batch shares one input shape."""
    cam_dir, region_dir = job.step_dir / CAMS, job.step_dir / REGIONS
    divisor = size_divisor(device.type)
    for id_ in ids:
        if id_ not in job.labelled:
            w, h = job.dataset.image_size(id_)
            save_cams(cam_dir, id_, np.zeros((0, h, w), np.float32), np.zeros(0, np.int64))
            io.write_mask(item(region_dir, id_), np.zeros((h, w), np.uint8))
    labelled = [i for i in ids if i in job.labelled]
    size = CAM_BATCH[device.type]
    for planned in (labelled[i:i + size] for i in range(0, len(labelled), size)):
        fulls = [erased_image(job.dataset, id_, list(job.region_dirs)) for id_ in planned]
        images = [fit_side(full, job.max_side) for full in fulls]
        # a header that disagrees with the decoded image (a rotated photo) splits the batch, never fails it
        shapes = [bucket(image.shape[:2], job.scales, divisor) for image in images]
        for group in batches(range(len(planned)), shapes.__getitem__, len(planned)):
            cams = multiscale_cams_batch(model, [images[k] for k in group],
                                         [job.dataset.label_ids(planned[k]) for k in group], job.scales, job.flip,
                                         device, job.amp if device.type == "cuda" else "off", divisor)
            for k, cam in zip(group, cams, strict=True):
                _write_cam(job, planned[k], cam, job.dataset.label_ids(planned[k]), fulls[k].shape[:2])
    return len(ids)


def _write_cam(job: CamJob, id_: str, cam: np.ndarray, keys, shape: tuple[int, int]) -> None:
    if cam.shape[1:] != shape:  # a downscaled image: its CAM back at full size
        cam = F.interpolate(torch.from_numpy(np.asarray(cam, np.float32))[None], size=shape,
                            mode="bilinear", align_corners=False)[0].numpy()
    cam = save_cams(job.step_dir / CAMS, id_, cam, keys)  # mine what is stored, so a resumed run mines the same
    _, region = mine(cam, keys, job.threshold)
    io.write_mask(item(job.step_dir / REGIONS, id_), region)


_worker: tuple | None = None  # (model, job) of a CAM worker process, set once by its initializer


def _init_cam_worker(job: CamJob, backbone: str, num_classes: int, output_stride: int, state: dict) -> None:
    global _worker
    torch.set_num_threads(1)
    with warnings.catch_warnings():  # the weights come next, from the trained classifier
        warnings.simplefilter("ignore")
        model = build_classifier(backbone, num_classes, output_stride=output_stride, weights=None)
    model.load_state_dict(state)
    _worker = (model, job)


def _cam_worker(ids: list[str]) -> int:
    model, job = _worker
    return write_cams(model, job, ids, torch.device("cpu"))


def compute_step_cams(model, dataset: VOCDataset, ids: list[str], labelled: set[str], step_dir: Path,
                      region_dirs: list[Path], args, device) -> None:
    """CAMs and mined regions of every image (this rank's share), skipping those already written.

    On a CPU the images go to `--workers` processes of one thread each: a forward of one small
    image keeps two threads far from busy, so single-thread processes mine more images a second
    (docs/results.md, "Speed").
    """
    cam_dir, region_dir = step_dir / CAMS, step_dir / REGIONS
    job = CamJob(dataset, frozenset(labelled), step_dir, tuple(region_dirs), tuple(args.cam_scales),
                 args.cam_flip, args.ae_threshold, args.max_side, resolve_amp(args.amp, device.type))
    # ranks split the bucket-ordered images, so each meets few shapes (one rank: all of them, in that order)
    planned = cam_batches(job, list(ids), size_divisor(device.type), CAM_BATCH[device.type])
    pending = [[i for i in b if not (item(cam_dir, i, ".npz").is_file() and item(region_dir, i).is_file())]
               for b in shard_batches(planned, *rank_world())]
    pending = [b for b in pending if b]
    todo = [i for b in pending for i in b]
    count_images(len(todo))
    processes = min(args.workers, len(todo)) if device.type == "cpu" else 1
    # one process: a task per bucket batch; CPU workers: tasks of CAM_CHUNK images (their batch is one)
    chunks = pending if processes <= 1 else [todo[i:i + CAM_CHUNK] for i in range(0, len(todo), CAM_CHUNK)]
    with tqdm(total=len(todo), desc=f"CAM {step_dir.name}", disable=not is_main_process(), leave=False) as bar:
        if processes <= 1:
            for chunk in chunks:
                bar.update(write_cams(model, job, chunk, device))
            return
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        initargs = (job, args.backbone, dataset.num_classes - 1, args.output_stride, state)
        with process_pool(processes, initializer=_init_cam_worker, initargs=initargs) as pool:
            for future in as_completed([pool.submit(_cam_worker, chunk) for chunk in chunks]):
                bar.update(future.result())


def coverage(region_dir: Path, ids: list[str]) -> float:
    """Mean fraction of the image mined, over `ids`."""
    fractions = [float((io.read_mask(item(region_dir, i)) != 0).mean()) for i in ids]
    return float(np.mean(fractions)) if fractions else 0.0


def run_step(step: int, args, dataset, ids, labelled, out: Path, region_dirs, stop_loss: float, device) -> dict:
    """Train, compute CAMs and mine regions for one step; resumable; returns its done.json.

    A step after the first whose final-epoch loss exceeds `stop_loss` is discarded (no CAMs)."""
    step_dir = Stage1Folder(out).step(step)
    if (step_dir / DONE).is_file():
        info = io.read_json(step_dir / DONE)
        log.info("step %d already done: %s", step, info)
        return info
    model = build_model(args, dataset.num_classes, step, out)
    train_ids = [i for i in ids if i in labelled]
    evaluate = None
    val = held_out(args)
    if val is not None:
        evaluate = lambda m: {"val_mAP": classification_map(m, val, val.ids, torch_device(device))}  # noqa: E731
    epochs = step_epochs(args.epochs, args.iterations, len(train_ids), args.batch_size)
    config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, device=device,
                         seed=args.seed + 1000 * step, workers=args.workers, desc=f"AE step {step}",
                         amp=resolve_amp(args.amp, device))
    model = fit(model, ErasedImages(dataset, train_ids, region_dirs, args.crop), classification_step, step_dir,
                config, param_groups=model.param_groups, evaluate=evaluate)
    final = epoch_metrics(step_dir, epochs)  # by number: a stale line of another epoch never decides
    kept = final["loss"] <= stop_loss
    if kept:
        with phase("cams"):
            compute_step_cams(model, dataset, ids, labelled, step_dir, region_dirs, args, torch_device(device))
    elif is_main_process():
        log.warning("step %d: final loss %.4f > stop loss %.4f: the classifier no longer finds the erased "
                    "classes; discarding this step and stopping", step, final["loss"], stop_loss)
    barrier()
    info = {"step": step, "final_loss": final["loss"], "val_mAP": final.get("val_mAP"), "kept": kept,
            "coverage": coverage(step_dir / REGIONS, train_ids) if kept and is_main_process() else None}
    if is_main_process():
        io.write_json(step_dir / DONE, info)
    barrier()
    return info


def held_out(args) -> VOCDataset | None:
    """The labelled images of --val-split (--epoch-val of them), for the classifier's mAP after each
    epoch (None if none)."""
    if not args.val_split or args.val_split == args.train_split or not list_path(args.data, args.val_split).is_file():
        return None
    val = VOCDataset(args.data, args.val_split, limit=args.limit)
    val.ids = spread([i for i in val.ids if val.labels(i).any()], args.epoch_val)
    return val if val.ids else None


# ---------------------------------------------------------------- union and pictures

def write_union(dataset: VOCDataset, ids: list[str], out: Path, steps: list[int], threshold: float) -> None:
    """regions/ID.npz and regions/ID.png: per class the union of the steps' regions (this rank's share)."""
    folder = Stage1Folder(out)
    for id_ in tqdm(shard(ids), desc="union", disable=not is_main_process(), leave=False):
        w, h = dataset.image_size(id_)
        cams, keys = [], None
        for k in steps:
            cam, step_keys = load_cams(folder.cams(k), id_, expected_shape=(h, w))
            if keys is not None and not np.array_equal(keys, step_keys):
                raise DatasetError(f"{item(folder.cams(k), id_, '.npz')}: class ids {step_keys.tolist()} "
                                   f"differ from step {steps[0]}'s {keys.tolist()}")
            cams.append(cam)
            keys = step_keys
        cams = np.stack(cams)  # (steps, n, H, W)
        masks = (cams > threshold).any(axis=0)
        score = write_seeds(item(folder.regions, id_, ".npz"), keys, masks, cams.max(axis=0))
        io.write_mask(item(folder.regions, id_), regions_label_map(masks, keys, score))


def write_overlays(dataset: VOCDataset, ids: list[str], out: Path, steps: list[int], count: int) -> None:
    """overlay/ID.png for `count` images spread over the list: the image, per step the CAM heat map
    (max over the labelled classes) on the image as that step saw it (erased) and the mined region,
    the union, and the ground truth when there is one."""
    from wsss.viz import colorize, heatmap, side_by_side

    folder = Stage1Folder(out)
    for id_ in tqdm(spread(ids, count) if count > 0 else [], desc="overlays", leave=False):
        image = dataset.image(id_)
        panels, titles = [image], ["image"]
        for j, k in enumerate(steps):
            cam, _ = load_cams(folder.cams(k), id_, expected_shape=image.shape[:2])
            seen = erased_image(dataset, id_, [folder.step_regions(s) for s in steps[:j]])
            panels += [heatmap(cam.max(axis=0) if len(cam) else np.zeros(image.shape[:2], np.float32), seen),
                       colorize(io.read_mask(item(folder.step_regions(k), id_)))]
            titles += [f"CAM step {k}", f"mined step {k}"]
        panels.append(colorize(io.read_mask(item(folder.regions, id_))))
        titles.append("union")
        if dataset.has_mask(id_):
            panels.append(colorize(dataset.mask(id_)))
            titles.append("ground truth")
        io.write_png(item(folder.overlay, id_), side_by_side(panels, titles))


# ---------------------------------------------------------------- the stage

def run(args) -> dict | None:
    """Run stage 1 (see the module docstring); returns the manifest, or None when skipped."""
    device = resolve_device(args.device)
    check_processes(args.batch_size)
    init_distributed(device)
    if args.rw:
        check_crf("stage 1 --rw", "--no-rw")  # the affinity labels need it: say so before hours of erasing
    dataset = VOCDataset(args.data, args.train_split, limit=args.limit)
    dataset.validate()
    stage = open_stage(args, STAGE1, dataset_inputs(dataset), owned=(STEP_GLOB, REGIONS, RW, OVERLAY))
    if stage is None:
        return None
    out = stage.path
    barrier()

    main = is_main_process()
    ids = dataset.ids
    labelled = {i for i in ids if dataset.labels(i).any()}
    if not labelled:
        raise DatasetError(f"{list_path(args.data, args.train_split)}: no image has a label")
    if len(labelled) < len(ids) and main:
        log.warning("%d of %d images have no labels: skipped (empty CAM and region files)",
                    len(ids) - len(labelled), len(ids))
    chance_loss = constant_predictor_loss(np.stack([dataset.labels(i) for i in ids if i in labelled]))
    if main:
        log.info("stage 1: %d images (%d labelled), %d classes; loss of the constant predictor %.4f", len(ids),
                 len(labelled), dataset.num_classes - 1, chance_loss)

    steps: list[dict] = []
    stop_loss = float("inf")  # step 1 is always kept
    for k in range(1, args.ae_steps + 1):
        kept_dirs = [Stage1Folder(out).step_regions(s["step"]) for s in steps if s["kept"]]
        info = run_step(k, args, dataset, ids, labelled, out, kept_dirs, stop_loss, device)
        steps.append(info)
        if not info["kept"]:
            break
        if k == 1:
            stop_loss = stop_loss_of(args.ae_stop_loss, info["final_loss"], chance_loss)
            if main:
                log.info("stop loss %.4f (%s)", stop_loss, args.ae_stop_loss)
            if main and info["final_loss"] > 0.5 * chance_loss:
                log.warning("step 1: final loss %.4f is more than half the constant predictor's %.4f: the "
                            "classifier has hardly converged (more --epochs or another --lr?)",
                            info["final_loss"], chance_loss)
    kept = [s["step"] for s in steps if s["kept"]]
    write_union(dataset, ids, out, kept, args.seed_threshold)
    barrier()
    rw = run_rw(args, dataset, ids, labelled, out, device) if args.rw else None
    if not main:
        return None
    labelled_ids = [i for i in ids if i in labelled]
    write_overlays(dataset, labelled_ids, out, kept, args.overlays)
    outputs = {
        "images": len(ids), "skipped_unlabelled": len(ids) - len(labelled), "chance_loss": round(chance_loss, 4),
        "stop_loss": round(stop_loss, 4) if np.isfinite(stop_loss) else None,
        "steps_run": len(steps), "steps_done": len(kept), "stopped_early": len(kept) < len(steps),
        "final_loss": {step_name(s["step"]): round(s["final_loss"], 4) for s in steps},
        "val_mAP": {step_name(s["step"]): s["val_mAP"] for s in steps if s.get("val_mAP") is not None},
        "coverage": {step_name(s["step"]): round(s["coverage"], 4) for s in steps if s["kept"]},
        "union_coverage": round(coverage(Stage1Folder(out).regions, labelled_ids), 4),
    }
    if rw is not None:  # stage 2 takes these seeds instead of the union's
        outputs["rw"] = {**rw, "coverage": round(coverage(Stage1Folder(out).rw_seeds, labelled_ids), 4)}
    for s in steps:
        log.info("step %d: final loss %.4f, region coverage %s%s", s["step"], s["final_loss"],
                 "-" if s["coverage"] is None else f"{100 * s['coverage']:.1f}%", "" if s["kept"] else " (discarded)")
    log.info("union of %d steps covers %.1f%% of the labelled images", len(kept), 100 * outputs["union_coverage"])
    return stage.finish(outputs)
