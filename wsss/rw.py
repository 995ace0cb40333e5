"""Stage 1, after erasing (`--rw`): random-walk seeds from an affinity net (PSA / IRN; the algorithm is
wsss.affinity, the net wsss.models.affinity).

1. The union's normalised CAMs (stage 1's regions/ID.npz) give each training image confident labels
   (wsss.affinity.confident_labels: thresholds and a dense CRF, as IRN), written once to rw/labels/,
   and so same/different labels for nearby pairs of pixels.
2. An AffinityNet head on step 1's classifier (frozen: it saw the images unerased) learns them:
   `--rw-epochs` epochs at `--rw-lr` (IRN: 3 epochs at lr 0.1 for its heads) on the stage's crops and batch.
3. Every image's union CAMs are walked over the predicted affinities (`--rw-beta`, `--rw-steps`) and
   turned into seeds (`--rw-bg-threshold`), written in the seeds format (wsss.scoremaps) that stage 2
   reads: when stage 1 ran with `--rw`, stage 2 takes these seeds instead of the union's.

Artifacts in outputs/RUN/stage1/rw/: labels/ID.png (0 background, a class, 255 unsure),
checkpoint.pt and metrics.jsonl of the head, seeds/ID.npz + seeds/ID.png (class where seeded, 0
elsewhere), done.json (written last). A killed run resumes where it stopped: the labels and seed
files already written are kept, the head's training resumes from its checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import warnings
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from wsss import io
from wsss.affinity import (
    BETA,
    WALK_BG_THRESHOLD,
    WALK_STEPS,
    confident_labels,
    pair_labels,
    random_walk,
    to_grid,
    transition_matrix,
    walk_labels,
)
from wsss.data.transforms import normalize, train_augment
from wsss.data.voc import VOCDataset
from wsss.errors import StageError
from wsss.fusion import regions_label_map
from wsss.layout import DONE, Stage1Folder, item
from wsss.models.affinity import GRID_STRIDE, AffinityNet, affinity_loss, pair_affinity
from wsss.models.classifier import build_classifier
from wsss.run import (
    barrier,
    count_images,
    is_main_process,
    phase,
    positive_float,
    positive_int,
    resolve_amp,
    shard,
)
from wsss.scoremaps import read_seeds, write_seeds
from wsss.shapes import MAX_SIDE, fitted_size
from wsss.train import TrainConfig, epoch_metrics, fit, torch_device
from wsss.workers import parallel_map

log = logging.getLogger("wsss")
RW_SEED_OFFSET = 7000  # the head's training seed: --seed + this, apart from the erasing steps' (+ 1000 k)


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("stage 1: random-walk seeds (affinity net, PSA / IRN)")
    # On by default: on the VOC-like data (20 classes, VOC's small objects) the walked seeds scored 16 points
    # above the union's CAMs and the PSL net 9.5 above the union's; on the demo's 6 classes the net was no
    # better (-0.6), for about 2 more minutes of CPU (docs/results.md, "Random-walk seeds").
    g.add_argument("--rw", action=argparse.BooleanOptionalAction, default=True,
                   help="after erasing, train an affinity head and walk the union's CAMs over its affinities: "
                        "stage 2 then takes the walked seeds (wsss/rw.py); --no-rw: the union's")
    g.add_argument("--rw-epochs", type=positive_int, default=3, help="epochs of the affinity head (IRN: 3)")
    g.add_argument("--rw-lr", type=positive_float, default=0.1, help="learning rate of the affinity head (IRN: 0.1)")
    g.add_argument("--rw-beta", type=positive_float, default=BETA, help="power of the affinities (IRN: 10)")
    g.add_argument("--rw-steps", type=positive_int, default=WALK_STEPS,
                   help="random-walk steps on the stride-8 grid (see wsss/affinity.py)")
    g.add_argument("--rw-bg-threshold", type=float, default=WALK_BG_THRESHOLD,
                   help="background where every walked class map, divided by its maximum, is below this")


def write_labels(dataset: VOCDataset, seeds: Path, out: Path, id_: str) -> str:
    """out/ID.png: the confident labels (wsss.affinity.confident_labels) of one image's seeds' CAMs."""
    image = dataset.image(id_)
    keys, _, score = read_seeds(item(seeds, id_, ".npz"), dataset.label_ids(id_), image.shape[:2])
    io.write_mask(item(out, id_), confident_labels(image, score, keys))
    return id_


def confident_label_maps(dataset: VOCDataset, ids: list[str], folder: Stage1Folder, workers: int) -> None:
    """rw/labels/ID.png of this rank's share of `ids` (two dense CRFs an image, in a pool of `workers`),
    skipping those already written."""
    todo = [i for i in shard(ids) if not item(folder.rw_labels, i).is_file()]
    count_images(len(todo))
    work = partial(write_labels, dataset, folder.regions, folder.rw_labels)
    for id_, _, error in parallel_map(work, todo, workers, "affinity labels"):
        if error is not None:
            raise StageError(f"{item(folder.rw_labels, id_)}: {error}") from error


class AffinityItems:
    """Training items of the affinity head (the `item(index, rng)` contract of wsss.train.fit): the
    image cropped and its pair labels from its confident labels (rw/labels/ID.png)."""

    def __init__(self, dataset: VOCDataset, ids: list[str], labels: Path, crop: int):
        self.dataset, self.ids, self.labels, self.crop = dataset, ids, labels, crop
        self.grid = (-(-crop // GRID_STRIDE),) * 2

    def __len__(self) -> int:
        return len(self.ids)

    def item(self, index: int, rng: np.random.Generator) -> dict:
        id_ = self.ids[index]
        image, labels = self.dataset.image(id_), io.read_mask(item(self.labels, id_))
        if labels.shape != image.shape[:2]:
            raise StageError(f"{item(self.labels, id_)}: size {labels.shape} differs from the image's "
                             f"{image.shape[:2]}")
        image, labels = train_augment(image, labels, self.crop, rng)
        bg, fg, neg = pair_labels(to_grid(labels, GRID_STRIDE, self.grid))
        return {"image": normalize(image), "bg": bg, "fg": fg, "neg": neg}


def affinity_step(model, batch: dict, epoch: int):
    return affinity_loss(pair_affinity(model(batch["image"])), batch["bg"], batch["fg"], batch["neg"])


def grid_features(model, image: np.ndarray, device) -> np.ndarray:
    """The affinity features (448, h, w) of an image on the stride-8 grid of its fitted size (at most
    MAX_SIDE: bounded memory on a huge photo)."""
    h, w = image.shape[:2]
    fh, fw = fitted_size((h, w), MAX_SIDE)
    small = cv2.resize(image, (fw, fh), interpolation=cv2.INTER_AREA) if (fh, fw) != (h, w) else image
    with torch.inference_mode():
        return model(torch.from_numpy(normalize(small))[None].to(device))[0].float().cpu().numpy()


def walk(features: np.ndarray, score: np.ndarray, *, beta: float, steps: int) -> np.ndarray:
    """Class maps `score` (n, H, W) walked over the affinities of `features` (grid_features of the same
    image), back at the image's size (n, H, W)."""
    n, h, w = score.shape
    if n == 0:
        return np.zeros((0, h, w), np.float32)
    gh, gw = features.shape[1:]
    fh, fw = fitted_size((h, w), MAX_SIDE)
    cams = np.stack([cv2.resize(s, (gw, gh), interpolation=cv2.INTER_AREA) for s in score])
    walked = random_walk(cams, transition_matrix(features, beta), steps)
    # grid cell i covers pixels [8i, 8i + 8) of the fitted image: to whole cells, cropped, then to (h, w)
    return np.stack([cv2.resize(cv2.resize(m, (gw * GRID_STRIDE, gh * GRID_STRIDE),
                                           interpolation=cv2.INTER_LINEAR)[:fh, :fw], (w, h),
                                interpolation=cv2.INTER_LINEAR) for m in walked])


def walk_image(model, image: np.ndarray, score: np.ndarray, device, *, beta: float, steps: int,
               bg_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(masks, score) of one image's random-walk seeds, at the image's size; `score` its normalised CAMs."""
    if len(score) == 0:
        return walk_labels(np.zeros_like(score), bg_threshold)
    return walk_labels(walk(grid_features(model, image, device), score, beta=beta, steps=steps), bg_threshold)


def walk_seeds(model, dataset: VOCDataset, ids: list[str], folder: Stage1Folder, args, device) -> None:
    """rw/seeds/ID.npz and ID.png for this rank's share of `ids`, skipping those already written."""
    todo = [i for i in shard(ids) if not item(folder.rw_seeds, i).is_file()]
    count_images(len(todo))
    model.eval()
    for id_ in tqdm(todo, desc="random walk", disable=not is_main_process(), leave=False):
        image = dataset.image(id_)
        keys, _, score = read_seeds(item(folder.regions, id_, ".npz"), dataset.label_ids(id_), image.shape[:2])
        masks, walked = walk_image(model, image, score, device, beta=args.rw_beta, steps=args.rw_steps,
                                   bg_threshold=args.rw_bg_threshold)
        stored = write_seeds(item(folder.rw_seeds, id_, ".npz"), keys, masks, walked)
        io.write_mask(item(folder.rw_seeds, id_), regions_label_map(masks, keys, stored))  # written last: done


def affinity_net(args, num_classes: int, folder: Stage1Folder) -> AffinityNet:
    """The affinity head on step 1's trained classifier."""
    torch.manual_seed(args.seed + RW_SEED_OFFSET)
    with warnings.catch_warnings():  # the weights come next, from the trained classifier
        warnings.simplefilter("ignore")
        classifier = build_classifier(args.backbone, num_classes - 1, output_stride=args.output_stride, weights=None)
    classifier.load_state_dict(io.load_checkpoint(folder.checkpoint(1))["model"])
    return AffinityNet(classifier)


def run_rw(args, dataset: VOCDataset, ids: list[str], labelled: set[str], out: Path, device: str) -> dict:
    """Train the head, walk every image (see the module docstring); resumable; returns rw/done.json."""
    folder = Stage1Folder(out)
    if (folder.rw / DONE).is_file():
        return io.read_json(folder.rw / DONE)
    train_ids = [i for i in ids if i in labelled]
    with phase("affinity-labels"):
        confident_label_maps(dataset, train_ids, folder, args.workers)
    barrier()
    model = affinity_net(args, dataset.num_classes, folder)
    head = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    config = TrainConfig(epochs=args.rw_epochs, batch_size=args.batch_size, lr=args.rw_lr, device=device,
                         seed=args.seed + RW_SEED_OFFSET, workers=args.workers, desc="affinity",
                         amp=resolve_amp(args.amp, device))
    model = fit(model, AffinityItems(dataset, train_ids, folder.rw_labels, args.crop), affinity_step, folder.rw,
                config, param_groups=lambda lr: [{"params": head, "lr": lr}])
    with phase("random-walk"):
        walk_seeds(model, dataset, ids, folder, args, torch_device(device))
    barrier()
    final = epoch_metrics(folder.rw, args.rw_epochs)
    info = {"epochs": args.rw_epochs, "final_loss": final["loss"],
            **{f"final_{k}": final[k] for k in ("bg", "fg", "neg")}}
    if is_main_process():
        io.write_json(folder.rw / DONE, info)
    barrier()
    return info
