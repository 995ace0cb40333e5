"""Stage 3: train a segmentation net on stage 2's artifacts (STC or PSL), predict val, score it.

This module holds what the two methods share, so that each of `wsss.stc` / `wsss.psl` is only its
method: the training crops (`SegmentationTrainSet`), building and loading nets, the per-epoch val
mIoU, the stage folder and `run(args)` behind `stages/stage3.py`.

Layout of a stage folder: `outputs/RUN/stage3/` by default, `outputs/RUN/stage3-TAG/` with
`--tag TAG`, so that variants (another method, `--masks gt`, an ablation) never overwrite each
other; `stage3/pred` is the default product that `make eval` scores.

    config.json, stage3.log, manifest.json (written last; `predictions` lists every pred folder)
    stage.json              config + input fingerprints this folder's artifacts belong to (wsss.stage)
    psl/                    PSL net: checkpoint.pt, metrics.jsonl
    psl/train-crf/ID.png    PSL+ only: PSL predictions of the training images, restricted to their
                            labels, after the stage-2 dense CRF: what psl-plus/ retrains on
    psl-plus/               PSL+ net (--psl-plus)
    stc/simple.txt          the ids of the simple training images
    stc/i/, stc/e/, stc/p/  STC nets; stc/i/pred and stc/e/pred hold their predictions of the
                            training images (restricted to the labels) that the next net trains on
    gt/                     --masks gt: the same net trained on the ground-truth masks
    pred/ID.png             val predictions of the final net (palette PNGs), default test-time flags
    pred-SETTINGS/          the same with other test-time flags (`wsss.predict.pred_folder`)
    metrics.jsonl           every epoch of every net, with "net": its folder
    eval.json               wsss.eval scores of pred/ against the val ground truth (eval-SETTINGS.json)

Defaults (CPU): efficientnet-lite0 + ASPP at output stride 16, 8 epochs of 160 px crops, batch 8,
lr 0.0025 (head 10x) after a 100-iteration linear warm-up, gradient norm clipped at 5, one test
scale. STC trains three nets, two of them on the simple images only. The papers' settings (output
stride 8, more iterations, multi-scale test) are a matter of flags on a GPU.

Why these optimiser defaults. The first defaults (lr 0.005, head 0.05, no warm-up, no clipping)
were chosen on the embedded dataset alone; on a VOC-like one (`wsss.data.voclike`: real VOC layouts,
20 classes, mostly small objects) the same net died in its first epoch even on ground-truth masks.
What dies is the head's 1x1 reduction layer (1280 -> 256, ReLU) in front of the ASPP branches: the
first updates at 10x the backbone's step, driven by a background-dominated loss, push its units
negative until almost none fire, and the net then gives the same logits everywhere. Batch norm in
that layer does not save it (the gradient norm then spikes and the backbone features go constant):
the step is too large, not the layer badly scaled. A lower rate, a warm-up (the new head's first
steps are small) and clipping (one bad batch cannot throw the weights far) keep the units alive on
both datasets; the figures are in the README. `collapse_check` stops a run that dies anyway.

Resume: each training resumes from its checkpoint (`wsss.train.fit`), finished trainings return at
once, predictions already written are kept. The test-time flags (--scales, --flip, --crf, --gate) are
not config: a finished stage rerun with other ones keeps its nets byte for byte and only predicts
and scores into another folder. Any other changed flag or input stops the stage (wsss.stage).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsss import io
from wsss.data.transforms import normalize, train_augment
from wsss.data.voc import DatasetError, VOCDataset
from wsss.io import IGNORE
from wsss.losses import cross_entropy
from wsss.pseudo import stc_soft_target
from wsss.run import (
    autocast,
    barrier,
    is_main_process,
    log,
    positive_float,
    positive_int,
    resolve_amp,
    resolve_device,
    run_dir,
    runtime,
    safe_name,
)
from wsss.stage import dataset_inputs, open_stage
from wsss.train import fit, read_metrics, torch_device

# transforms.train_augment pads masks with 255. To tell padding (outside the image) apart from a
# map's own values, a map's 255 travels as 254: ignore of a hard mask (back to 255 after), or full
# saliency of a grey map (so a grey map's probability is value / 254 after augmentation).
PAD, SHIFTED = 255, 254
WARMUP = 100  # iterations; see "Why these optimiser defaults" in the module docstring
CLIP_GRAD = 5.0


def add_args(p: argparse.ArgumentParser) -> None:
    from wsss.predict import add_predict_args

    p.add_argument("--method", choices=["psl", "stc"], default="psl")
    p.add_argument("--masks", choices=["pseudo", "gt"], default="pseudo",
                   help="gt: train the same net, plain cross-entropy, on the training split's ground-truth "
                        "masks (the fully supervised upper bound; --method is then not used)")
    runtime(p.add_argument("--tag", default=None, type=safe_name,
                           help="write to outputs/RUN/stage3-TAG instead of stage3"))
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--head", default="auto", choices=["auto", "largefov", "aspp"])
    p.add_argument("--output-stride", type=int, default=16, choices=[8, 16],
                   help="16 keeps the CPU default in budget (output stride 8 costs about 4x per image on "
                        "efficientnet-lite0); the papers use 8, pass it on a GPU")
    p.add_argument("--weights", default="imagenet", help="backbone weights: imagenet, none, or a .pth path")
    p.add_argument("--epochs", type=positive_int, default=8, help="epochs of each training")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=0.0025,
                   help="backbone learning rate (the head gets 10x); see the module docstring for why")
    p.add_argument("--crop", type=positive_int, default=160, help="training crop size")
    p.add_argument("--warmup", type=int, default=WARMUP,
                   help="iterations of linear learning-rate warm-up (see wsss/segment.py for why)")
    p.add_argument("--clip-grad", type=float, default=CLIP_GRAD, help="max gradient norm (0: no clipping)")
    runtime(p.add_argument("--collapse-check", action=argparse.BooleanOptionalAction, default=True,
                           help="stop a training whose net has collapsed (wsss.segment.collapse_check); off only "
                                "for smoke runs, whose one epoch from random weights is expected to look collapsed"))
    add_predict_args(p)
    g = p.add_argument_group("PSL (--method psl)")
    g.add_argument("--psl-online", choices=["on", "off"], default="on",
                   help="off: the ablation without the online (prohibitive) masks")
    g.add_argument("--psl-online-weight", type=float, default=1.0, help="weight of the online-mask cross-entropy")
    g.add_argument("--psl-online-start", type=int, default=None,
                   help="first epoch (1-based, as in metrics.jsonl) with the online term; "
                        "default: the second half of training, so the net first learns the pseudo-masks")
    g.add_argument("--psl-cls-weight", type=float, default=1.0, help="weight of the classification loss")
    g.add_argument("--psl-plus", action="store_true",
                   help="PSL+: retrain once on the PSL net's CRF-refined predictions of the training images")
    g = p.add_argument_group("STC (--method stc)")
    g.add_argument("--stc-steps", type=int, default=3, choices=[1, 2, 3],
                   help="train I-DCNN (1), then E-DCNN (2), then P-DCNN (3)")
    g.add_argument("--stc-saliency-threshold", type=float, default=0.5,
                   help="saliency above this is salient (for the simple-image rule)")
    g.add_argument("--stc-concentration", type=float, default=0.9,
                   help="simple image: least fraction of the saliency mass inside the largest salient component")
    g.add_argument("--stc-background", type=float, default=0.05,
                   help="simple image: largest mean saliency outside that component (clean background)")


def stage_name(args) -> str:
    return f"stage3-{args.tag}" if args.tag else "stage3"


def stage_path(args) -> Path:
    return run_dir(args) / stage_name(args)


def open_dataset(root, split: str, mask_dir=None, limit: int = 0) -> VOCDataset:
    return VOCDataset(root, split, mask_dir=mask_dir, limit=limit)


# ---------------------------------------------------------------- training crops

class SegmentationTrainSet:
    """Training crops (transforms.train_augment: scale, flip, crop) with their targets.

    `target_dir`: folder of ID.png maps at image size (None: the dataset's ground-truth masks).
    Hard targets (`soft=False`): mask ids, 255 = ignore. Soft targets (`soft=True`, STC's I-DCNN):
    a grey map 0..255 (the saliency) is the foreground probability of the image's one class,
    expanded after augmentation by `wsss.pseudo.stc_soft_target` into per-pixel class probabilities.
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
        raise SystemExit(f"error: {folder}: no {what} for any of the {len(ids)} training images")
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


# ---------------------------------------------------------------- nets

def build_net(config: dict, num_classes: int, cls_branch: bool, pretrained: bool = True):
    """The run's segmentation net; `pretrained=False` skips loading backbone weights (a checkpoint follows)."""
    from wsss.models.segnet import build_segnet

    weights = config["weights"] if pretrained and config["weights"] != "none" else None
    return build_segnet(config["backbone"], num_classes, head=config["head"],
                        output_stride=config["output_stride"], cls_branch=cls_branch, weights=weights)


def final_net(config: dict) -> tuple[str, bool]:
    """(folder of the final net inside the stage folder, whether it has the classification branch)."""
    if config["masks"] == "gt":
        return "gt", False
    if config["method"] == "psl":
        return ("psl-plus" if config["psl_plus"] else "psl"), True
    return f"stc/{'iep'[config['stc_steps'] - 1]}", False


def load_final_net(stage: Path, config: dict, device: str):
    """(model on device in eval mode, its checkpoint path, has classification branch)."""
    name, has_cls = final_net(config)
    checkpoint = Path(stage) / name / "checkpoint.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no trained net (has stage 3 finished?)")
    with warnings.catch_warnings():  # "randomly initialised backbone": the checkpoint is loaded next
        warnings.simplefilter("ignore", UserWarning)
        model = build_net(config, open_dataset(config["data"], config["val_split"]).num_classes, has_cls,
                          pretrained=False)
    state = io.load_checkpoint(checkpoint)
    if state["epoch"] < config["epochs"]:
        log.warning("%s: training stopped after epoch %d of %d", checkpoint, state["epoch"], config["epochs"])
    model.load_state_dict(state["model"])
    return model.to(torch_device(device)).eval(), checkpoint, has_cls


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

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def amp(self) -> str:
        """The resolved --amp: training, the per-epoch val and every prediction pass run under it."""
        return resolve_amp(self.args.amp, self.device)

    @property
    def stage2(self) -> Path:
        return run_dir(self.args) / "stage2"

    def train_net(self, name: str, trainset, step_fn, cls_branch: bool = False, gate: bool = False,
                  loss_key: str = "loss"):
        """Train (or resume, or load when finished) the net in out/name; returns the bare module.
        `loss_key`: the log entry holding the segmentation cross-entropy, for the collapse check."""
        torch.manual_seed(self.args.seed)  # the same initial head whether or not earlier nets ran here
        model = build_net(self.config, self.num_classes, cls_branch)
        log.info("%s: training on %d images", name, len(trainset))
        health = (collapse_check(trainset.constant_predictor_loss(), max(self.args.warmup, 1), loss_key,
                                 self.train.class_names) if self.args.collapse_check else None)
        return fit(model, trainset, step_fn, self.out / name, epochs=self.args.epochs,
                   batch_size=self.args.batch_size, lr=self.args.lr, device=self.device, seed=self.args.seed,
                   workers=self.args.workers, param_groups=model.param_groups, warmup=self.args.warmup,
                   clip_grad=self.args.clip_grad, evaluate=self.val_evaluator(gate), health=health, desc=name,
                   amp=self.amp)

    def val_evaluator(self, gate: bool):
        """evaluate(model) -> {"val_miou", "val_classes": how many classes it predicts anywhere,
        "val_class": the most predicted one} at one scale, or None when val has no ground truth."""
        from wsss.eval import confusion_matrix, scores
        from wsss.predict import label_map, predict_masks

        ids = [i for i in self.val.ids if self.val.has_mask(i)]
        if not ids:
            return None

        def evaluate(model) -> dict:
            conf = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
            for id_, _, probs in predict_masks(model, self.val, ids, device=torch_device(self.device),
                                               gate=gate, desc="val"):
                conf += confusion_matrix(self.val.mask(id_), label_map(probs), self.num_classes)
            predicted = conf.sum(0)
            return {"val_miou": scores(conf)["miou"], "val_classes": int((predicted > 0).sum()),
                    "val_class": int(predicted.argmax())}

        return evaluate

    def predict_train(self, model, ids, out_dir, *, checkpoint, crf_params=None, desc="predict"):
        """Predictions of training images into out_dir, restricted to each image's labels (the
        targets of the next net: STC's E- and P-DCNN, PSL+), optionally through a dense CRF."""
        from wsss.predict import predict_split

        with autocast(self.amp, torch_device(self.device).type):
            return predict_split(model, self.train, ids, out_dir, device=torch_device(self.device), restrict=True,
                                 crf=crf_params is not None, crf_params=crf_params, workers=self.args.workers,
                                 checkpoint=checkpoint, desc=desc)


def train_gt(ctx: Stage3):
    """The fully supervised upper bound: the same net and schedule on the ground-truth masks."""
    trainset = SegmentationTrainSet(ctx.train, ctx.train.ids, ctx.args.crop)
    return ctx.train_net("gt", trainset, ce_step), False


NETS = ("gt", "psl", "psl-plus", "stc/i", "stc/e", "stc/p")  # every net's folder, in training order


def _collect_metrics(out: Path) -> list[dict]:
    """Every training's metrics.jsonl, each line tagged with its net's folder."""
    return [{"net": net, **r} for net in NETS for r in read_metrics(out / net)]


def run(args) -> dict | None:
    """Stage 3 end to end; returns the val scores (None when already complete)."""
    from wsss import psl, stc
    from wsss.crf import check_crf
    from wsss.eval import evaluate, format_table
    from wsss.predict import net_crf, pred_folder, predict_split
    from wsss.train import init_distributed

    device = resolve_device(args.device)
    stage2 = run_dir(args) / "stage2"
    train = open_dataset(args.data, args.train_split, limit=args.limit)
    val = open_dataset(args.data, args.val_split, limit=args.limit)
    train.validate(need_mask=args.masks == "gt")
    val.validate()
    inputs = {**dataset_inputs(train, masks=args.masks == "gt"), **dataset_inputs(val, masks=True, prefix="val ")}
    if args.masks == "pseudo":
        if not (stage2 / io.MANIFEST).is_file():
            raise SystemExit(f"error: {stage2}: stage 2 is not complete (no {io.MANIFEST}); run stages/stage2.py first")
        inputs["stage2"] = stage2
    if args.crf or (args.psl_plus and args.method == "psl" and args.masks == "pseudo"):
        check_crf("stage 3", "no --crf" if args.crf else "no --psl-plus")
    name, pred = stage_name(args), pred_folder(args.scales, args.flip, args.crf, args.gate)
    stage = open_stage(args, name, inputs, owned=(*{n.split("/")[0] for n in NETS}, "pred", "pred-*", "eval*.json",
                                                  "metrics.jsonl"),
                       done=lambda manifest: pred in manifest.get("outputs", {}).get("predictions", {pred: 0}))
    if stage is None:
        return None
    out, config = stage.path, stage.config
    init_distributed(device)
    barrier()
    ctx = Stage3(args, config, out, device, train, val)

    if args.masks == "gt":
        model, has_cls = train_gt(ctx)
    elif args.method == "psl":
        model, has_cls = psl.run(ctx)
    else:
        model, has_cls = stc.run(ctx)

    t_pred = time.time()
    checkpoint = out / final_net(config)[0] / "checkpoint.pt"
    with autocast(ctx.amp, torch_device(device).type):
        predict_split(model, ctx.val, ctx.val.ids, out / pred, device=torch_device(device), scales=args.scales,
                      flip=args.flip, gate=has_cls and args.gate == "on", crf=args.crf, crf_params=net_crf(config),
                      workers=args.workers, checkpoint=checkpoint, desc="predict val")
    if not is_main_process():
        return None
    records = _collect_metrics(out)
    io.write_bytes(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    outputs = {"final_net": final_net(config)[0], "predict_seconds": round(time.time() - t_pred, 1),
               "nets": _net_summary(records)}
    prediction = {"scales": list(args.scales), "flip": args.flip, "crf": args.crf, "gate": args.gate}
    result = None
    if ctx.val.mask_dir is not None and all(ctx.val.has_mask(i) for i in ctx.val.ids):
        result = evaluate(out / pred, ctx.val.mask_dir, ctx.val.ids, ctx.num_classes,
                          workers=args.workers, class_names=ctx.val.class_names)
        io.write_json(out / f"eval{pred[len('pred'):]}.json", result)
        log.info("%s", format_table(result, title=f"== {name} val predictions: {out / pred}"))
        outputs["val_miou"] = prediction["val_miou"] = result["miou"]
    else:
        log.info("no ground truth for every image of %s: val predictions are not scored", args.val_split)
    if stage.manifest:  # the nets were finished before: keep their figures, add this prediction folder
        outputs = {**stage.manifest["outputs"]}
    outputs["predictions"] = {**outputs.get("predictions", {}), pred: prediction}
    stage.finish(outputs)
    return result


def _net_summary(records: list[dict]) -> dict:
    """Per net: epochs, training seconds, and its last val mIoU."""
    nets: dict[str, dict] = {}
    for r in records:
        n = nets.setdefault(r["net"], {"epochs": 0, "seconds": 0.0})
        n["epochs"] = r["epoch"]
        n["seconds"] = round(n["seconds"] + r.get("seconds", 0.0), 1)
        if "val_miou" in r:
            n["val_miou"] = r["val_miou"]
    return nets
