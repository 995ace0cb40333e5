"""The stage-3 library: what every stage-3 method (`wsss.methods`) trains with.

`SegmentationTrainSet` (training crops of a folder of targets), `Stage3` (the run a method trains
in: its args and config, the stage folder, the datasets, `train_net` and `predict_train`), the
collapse check and the plain cross-entropy step. Nothing here knows a method: a method imports
this module, never the other way round.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wsss import io, tblog
from wsss.data.transforms import normalize, train_augment
from wsss.data.voc import DatasetError, VOCDataset
from wsss.fusion import stc_soft_target
from wsss.labels import IGNORE
from wsss.losses import cross_entropy
from wsss.metrics import ConfusionMatrix
from wsss.nets import build_net
from wsss.predict import PredictOptions, label_map, labels_at, predict_masks, predict_split
from wsss.run import autocast, layout, log, phase, resolve_amp, spread
from wsss.stage import StageError
from wsss.train import TrainConfig, fit, torch_device
from wsss.viz import overlay

# transforms.train_augment pads masks with 255. To tell padding (outside the image) apart from a
# map's own values, a map's 255 travels as 254: ignore of a hard mask (back to 255 after), or full
# saliency of a grey map (so a grey map's probability is value / 254 after augmentation).
PAD, SHIFTED = 255, 254


# ---------------------------------------------------------------- training crops

class SegmentationTrainSet:
    """Training crops (transforms.train_augment: scale, flip, crop) with their targets.

    `target_dir`: folder of ID.png maps at image size (None: the dataset's ground-truth masks).
    Hard targets (`soft=False`): mask ids, 255 = ignore. Soft targets (`soft=True`, STC's I-DCNN):
    a grey map 0..255 (the saliency) is the foreground probability of the image's one class,
    expanded after augmentation by `wsss.fusion.stc_soft_target` into per-pixel class probabilities.
    Items: "image" float32 3xHxW normalised, "target" int64 HxW (255 on ignore and padding) or
    float32 CxHxW probabilities, "valid" bool HxW (inside the image, not padding), "label" float32[C-1].
    """

    def __init__(self, dataset: VOCDataset, ids, crop: int, target_dir=None, soft: bool = False):
        self.dataset, self.ids, self.crop, self.soft = dataset, list(ids), crop, soft
        self.target_dir = Path(target_dir) if target_dir is not None else None

    def __len__(self) -> int:
        return len(self.ids)

    def constant_predictor_loss(self, most: int = 500) -> float | None:
        """Cross-entropy of the best constant predictor (each class at its pixel frequency in the
        targets, from up to `most` evenly spaced images): a net whose loss stays at this level has
        learned nothing from the pixels. None for soft targets."""
        if self.soft:
            return None
        counts = np.zeros(256, np.int64)
        for id_ in self.ids[::max(1, len(self.ids) // most)]:
            counts += np.bincount(self.target(id_).ravel(), minlength=256)
        counts[IGNORE] = 0
        freq = counts[counts > 0] / max(counts.sum(), 1)
        return float(-(freq * np.log(freq)).sum())

    def target(self, id_: str) -> np.ndarray:
        if self.target_dir is None:
            return self.dataset.mask(id_)
        path = self.target_dir / f"{id_}.png"
        if not path.is_file():
            raise DatasetError(f"{path}: training target not found")
        try:
            return io.read_mask(path)
        except ValueError as e:
            raise DatasetError(str(e)) from e

    def item(self, index: int, rng: np.random.Generator) -> dict:
        id_ = self.ids[index]
        image, target = self.dataset.image(id_), self.target(id_)
        if target.shape != image.shape[:2]:
            where = self.target_dir / f"{id_}.png" if self.target_dir else self.dataset.mask_path(id_)
            raise DatasetError(f"{where}: target size {target.shape[1]}x{target.shape[0]} differs from "
                               f"image size {image.shape[1]}x{image.shape[0]}")
        image, target = train_augment(image, np.minimum(target, SHIFTED), self.crop, rng)
        valid = target != PAD
        if self.soft:
            class_ids = self.dataset.label_ids(id_)
            if len(class_ids) != 1:
                raise DatasetError(f"{id_}: STC soft targets need an image with one label, it has {len(class_ids)}")
            foreground = np.where(valid, target.astype(np.float32) / SHIFTED, 0.0)
            target = stc_soft_target(foreground, int(class_ids[0]), self.dataset.num_classes)
        else:
            target = target.astype(np.int64)
            target[target >= SHIFTED] = IGNORE
        return {"id": id_, "image": normalize(image), "target": target, "valid": valid,
                "label": self.dataset.labels(id_)}


def with_targets(ids, folder: Path, what: str) -> list[str]:
    """The ids that have folder/ID.png; the others are skipped with a warning (stage 2 skips images
    it could not process), and none at all is an error."""
    have = {p.stem for p in Path(folder).glob("*.png")}
    kept = [i for i in ids if i in have]
    if not kept:
        raise StageError(f"{folder}: no {what} for any of the {len(ids)} training images")
    if len(kept) < len(ids):
        missing = [i for i in ids if i not in have]
        log.warning("%s: %d of %d training images have no %s and are skipped (%s%s)", folder, len(missing),
                    len(ids), what, ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "")
    return kept


def collapse_check(constant_loss: float | None, min_steps: int, loss_key: str = "loss", class_names=None):
    """`health` for wsss.train.fit: the net is dead when, after `min_steps` SGD steps (the warm-up:
    before it a live net may still say background everywhere), every pixel of every val image is
    one class *and* its training cross-entropy has not come below the constant predictor's level
    (a loss alone at that level can be a hard dataset)."""
    def health(record: dict) -> str | None:
        loss = record.get(loss_key, record.get("loss"))
        if (constant_loss is None or record.get("steps", 0) < min_steps or record.get("val_classes") != 1
                or loss < 0.9 * constant_loss):
            return None
        name = record.get("val_class")
        if class_names is not None and name is not None:
            name = class_names[name]
        return (f"the net has collapsed: it predicts '{name}' for every pixel of every val image, and its training "
                f"loss {loss:.3f} is at the level of a constant predictor ({constant_loss:.3f}). The step size is too "
                f"large for this data: lower --lr, raise --warmup or lower --clip-grad")
    return health


def ce_step(model, batch, epoch):
    """Plain cross-entropy on hard targets (E-DCNN, P-DCNN, the ground-truth upper bound)."""
    return cross_entropy(model(batch["image"])["seg"], batch["target"]), {}


# ---------------------------------------------------------------- one stage-3 run

@dataclass
class Stage3:
    """What every training of a stage-3 run needs."""

    args: argparse.Namespace
    config: dict
    out: Path
    device: str
    train: VOCDataset
    val: VOCDataset
    nets: dict = field(default_factory=dict)  # {folder: (model, has cls branch)} trained so far, in order

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def amp(self) -> str:
        """The resolved --amp: training, the per-epoch val and every prediction pass run under it."""
        return resolve_amp(self.args.amp, self.device)

    @property
    def stage2(self) -> Path:
        return layout(self.args).stage2.path

    def train_net(self, name: str, trainset, step_fn, cls_branch: bool = False, gate: bool = False,
                  loss_key: str = "loss", epochs: int | None = None):
        """Train (or resume, or load when finished) the net in out/name; returns the bare module.
        `loss_key`: the log entry holding the segmentation cross-entropy, for the collapse check;
        `epochs`: this net's budget (default --epochs)."""
        torch.manual_seed(self.args.seed)  # the same initial head whether or not earlier nets ran here
        model = build_net(self.config, self.num_classes, cls_branch)
        log.info("%s: training on %d images", name, len(trainset))
        health = (collapse_check(trainset.constant_predictor_loss(), max(self.args.warmup, 1), loss_key,
                                 self.train.class_names) if self.args.collapse_check else None)
        config = TrainConfig(epochs=self.args.epochs if epochs is None else epochs, batch_size=self.args.batch_size,
                             lr=self.args.lr, device=self.device, seed=self.args.seed, workers=self.args.workers,
                             desc=name, warmup=self.args.warmup, clip_grad=self.args.clip_grad, amp=self.amp)
        model = fit(model, trainset, step_fn, self.out / name, config, param_groups=model.param_groups,
                    evaluate=self.val_evaluator(gate, name), health=health)
        self.nets[name] = (model, cls_branch)
        return model

    def val_evaluator(self, gate: bool, name: str = "net"):
        """evaluate(model) -> {"val_miou", "val_classes": how many classes it predicts anywhere,
        "val_class": the most predicted one} at one scale on --epoch-val images, or None when val has
        no ground truth."""
        ids = spread([i for i in self.val.ids if self.val.has_mask(i)], self.args.epoch_val)
        if not ids:
            return None

        def evaluate(model) -> dict:
            conf = ConfusionMatrix(self.num_classes)
            shown = []
            for id_, image, probs in predict_masks(model, self.val, ids, device=torch_device(self.device),
                                                   gate=gate, desc="val"):
                pred = labels_at(label_map(probs), image.shape[:2])
                conf.add(self.val.mask(id_), pred)
                if tblog.active() and len(shown) < tblog.IMAGES:
                    shown.append(np.concatenate([image, overlay(image, pred)], axis=1))
            tblog.images(f"{name}/val", shown)
            predicted = conf.matrix.sum(0)
            return {"val_miou": conf.scores()["miou"], "val_classes": int((predicted > 0).sum()),
                    "val_class": int(predicted.argmax())}

        return evaluate

    def predict_train(self, model, ids, out_dir, *, checkpoint, crf_params=None, desc="predict"):
        """Self-training targets: predictions of training images into out_dir at --self-train-scales
        (and flip), restricted to each image's labels, optionally through a dense CRF, 255 where the
        net is unsure or the CRF disagrees with it (--self-train-confidence; `wsss.predict`, step 5)."""
        args = self.args
        with autocast(self.amp, torch_device(self.device).type), phase("targets"):
            options = PredictOptions(scales=args.self_train_scales, flip=args.self_train_flip, restrict=True,
                                     crf=crf_params is not None, crf_params=crf_params,
                                     ignore_below=args.self_train_confidence)
            return predict_split(model, self.train, ids, out_dir, device=torch_device(self.device),
                                 options=options, workers=args.workers, checkpoint=checkpoint, desc=desc)
