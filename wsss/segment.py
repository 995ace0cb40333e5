"""Stage 3: train a segmentation net on stage 2's artifacts (STC, PSL or any registered method),
predict val, score it: `run(args)` behind `stages/stage3.py`.

The method (`--method`, one of `wsss.methods.METHODS`: how to add one is in that module's
docstring) trains its nets with the stage-3 library (`wsss.segtrain`: training crops, the Stage3
context; `wsss.nets`: building and loading nets; `wsss.predict`); this module opens the stage
folder, runs the method, predicts val with its final net and scores it.

Layout of a stage folder: `outputs/RUN/stage3/` by default, `outputs/RUN/stage3-TAG/` with
`--tag TAG`, so that variants (another method, `--masks gt`, an ablation) never overwrite each
other; `stage3/pred` is the default product that `make eval` scores.

    config.json, stage3.log, manifest.json (written last; `predictions` lists every pred folder)
    stage.json              config + input fingerprints this folder's artifacts belong to (wsss.stage)
    psl/                    PSL net: checkpoint.pt, metrics.jsonl
    psl/train-crf/ID.png    PSL+ only: PSL predictions of the training images, restricted to their
                            labels, after a dense CRF with stage 2's kernels, 255 where unsure:
                            what psl-plus/ retrains on
    psl-plus/               PSL+ net (--psl-plus)
    stc/simple.txt          the ids of the simple training images
    stc/i/, stc/e/, stc/p/  STC nets; stc/i/pred and stc/e/pred hold their predictions of the
                            training images (restricted to the labels) that the next net trains on
    gt/                     --method gt (or --masks gt): the same net trained on the ground-truth masks
    pred/ID.png             val predictions of the final net (palette PNGs), default test-time flags
    pred-SETTINGS/          the same with other test-time flags (`wsss.predict.pred_folder`)
    metrics.jsonl           every epoch of every net, with "net": its folder
    model.pt                the final net with its classes, architecture, input normalisation and
                            best scored test-time settings (`wsss.modelfile`): usable anywhere
    eval.json               wsss.eval scores of pred/ against the val ground truth (eval-SETTINGS.json)

Defaults (CPU): efficientnet-lite0 + ASPP at output stride 16, 8 epochs of 160 px crops, batch 8,
lr 0.0025 (head 10x) after a 100-iteration linear warm-up, gradient norm clipped at 5, one test
scale. STC trains three nets, two of them on the simple images only, each for the same number of
SGD iterations (`wsss.methods.stc`). The papers' settings (output stride 8, more iterations,
multi-scale test) are a matter of flags on a GPU.

Why these optimiser defaults. The first defaults (lr 0.005, head 0.05, no warm-up, no clipping)
were chosen on the embedded dataset alone; on a VOC-like one (`wsss.data.voclike`: real VOC layouts,
20 classes, mostly small objects) the same net died in its first epoch even on ground-truth masks.
What dies is the head's 1x1 reduction layer (1280 -> 256, ReLU) in front of the ASPP branches: the
first updates at 10x the backbone's step, driven by a background-dominated loss, push its units
negative until almost none fire, and the net then gives the same logits everywhere. Batch norm in
that layer does not save it (the gradient norm then spikes and the backbone features go constant):
the step is too large, not the layer badly scaled. A lower rate, a warm-up (the new head's first
steps are small) and clipping (one bad batch cannot throw the weights far) keep the units alive on
both datasets; the figures are in docs/results.md. `collapse_check` stops a run that dies anyway.

Resume: each training resumes from its checkpoint (`wsss.train.fit`), finished trainings return at
once, predictions already written are kept. The test-time flags (--scales, --flip, --crf, --gate) are
not config: a finished stage rerun with other ones keeps its nets byte for byte and only predicts
and scores into another folder. Nor are the flags of the methods not chosen (a PSL run records no
--stc-* flag, `wsss.config`). Any other changed flag or input stops the stage (wsss.stage).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from wsss import io
from wsss.config import add_section
from wsss.crf import check_crf
from wsss.layout import EVAL_GLOB, METRICS, MODEL, PRED, PRED_GLOB, STAGE2, Stage3Folder, eval_file
from wsss.methods import METHODS
from wsss.modelfile import best_prediction, from_checkpoint, save_model
from wsss.nets import net_crf, open_dataset, stage_name
from wsss.predict import PredictOptions, add_predict_args, pred_folder, predict_split
from wsss.run import (
    add_epoch_val,
    add_scales,
    autocast,
    barrier,
    is_main_process,
    layout,
    log,
    phase,
    positive_float,
    positive_int,
    resolve_device,
    runtime,
    safe_name,
)
from wsss.scoring import evaluate, format_table
from wsss.segtrain import Stage3
from wsss.stage import StageError, check_processes, check_same_dataset, dataset_inputs, open_stage
from wsss.train import init_distributed, read_metrics, torch_device

WARMUP = 100  # iterations; see "Why these optimiser defaults" in the module docstring
CLIP_GRAD = 5.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=sorted(METHODS), default="psl",
                   help="the stage-3 method (wsss.methods: a registry any module can add to)")
    p.add_argument("--masks", choices=["pseudo", "gt"], default="pseudo",
                   help="gt: the same as --method gt, the fully supervised upper bound on the training split's "
                        "ground-truth masks (--method is then not used)")
    add_epoch_val(p)
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
                   help="iterations of linear learning-rate warm-up "
                        "(see the module docstring of wsss/segment.py for why)")
    p.add_argument("--clip-grad", type=float, default=CLIP_GRAD, help="max gradient norm (0: no clipping)")
    runtime(p.add_argument("--collapse-check", action=argparse.BooleanOptionalAction, default=True,
                           help="stop a training whose net has collapsed (wsss.segtrain.collapse_check); off only "
                                "for smoke runs, whose one epoch from random weights is expected to look collapsed"))
    add_predict_args(p)
    g = p.add_argument_group("self-training targets (PSL+, STC's E- and P-DCNN): a net's predictions of the "
                             "training images that the next net trains on")
    add_scales(g, "--self-train-scales", default=[0.75, 1.0, 1.25],
                   help="scales whose probabilities are averaged (as at test time: a target should be the net's "
                        "best guess, not its single-scale one; 3 scales + flip cost 6 forwards per image)")
    g.add_argument("--self-train-flip", action=argparse.BooleanOptionalAction, default=True,
                   help="also average the mirrored image")
    g.add_argument("--self-train-confidence", type=float, default=0.6,
                   help="a target pixel is 255 (ignored) where the net's largest probability, over the image's "
                        "own classes, is below this, and where PSL+'s CRF changes the net's label: an unsure "
                        "pixel left as a confident label teaches the next net the error (0: only the CRF rule)")
    for method in METHODS.values():  # each method's flags are its section: a run records its own method's
        if method.args is not None:
            add_section(p, method.name, method.args)



def method_name(args) -> str:
    return "gt" if args.masks == "gt" else args.method


def _collect_metrics(out: Path, nets) -> list[dict]:
    """Every training's metrics.jsonl, each line tagged with its net's folder."""
    return [{"net": net, **r} for net in nets for r in read_metrics(out / net)]


def run(args) -> dict | None:
    """Stage 3 end to end; returns the val scores (None when already complete)."""
    device = resolve_device(args.device)
    check_processes(args.batch_size)
    method = METHODS[method_name(args)]
    on_gt = method.reads == "masks"
    stage2 = layout(args).stage2.path
    train = open_dataset(args.data, args.train_split, limit=args.limit)
    val = open_dataset(args.data, args.val_split, limit=args.limit)
    train.validate(need_mask=on_gt)
    val.validate()
    inputs = {**dataset_inputs(train, masks=on_gt), **dataset_inputs(val, masks=True, prefix="val ")}
    if not on_gt:
        if not (stage2 / io.MANIFEST).is_file():
            raise StageError(f"{stage2}: stage 2 is not complete (no {io.MANIFEST}); run stages/stage2.py first")
        inputs[STAGE2] = stage2
        check_same_dataset(stage2, train, "stage 3")
    if args.crf:
        check_crf("stage 3", "no --crf")
    name, pred = stage_name(args), pred_folder(args.scales, args.flip, args.crf, args.gate)
    folders = {f for m in METHODS.values() for f in m.folders}
    owned = (*sorted(folders), PRED, PRED_GLOB, EVAL_GLOB, METRICS, MODEL)
    stage = open_stage(args, name, inputs, owned=owned, sections=(method.name,),
                       done=lambda manifest: pred in manifest.get("outputs", {}).get("predictions", {pred: 0}))
    if stage is None:
        return None
    out, config = stage.path, stage.config
    init_distributed(device)
    barrier()
    ctx = Stage3(args, config, out, device, train, val)
    final = method.train(ctx)
    if final not in ctx.nets:
        raise StageError(f"method {method_name(args)!r} returned {final!r}, not the folder of a net it trained "
                         f"with ctx.train_net ({', '.join(ctx.nets) or 'none'}); see wsss/methods/__init__.py")
    model, has_cls = ctx.nets[final]

    t_pred = time.time()
    checkpoint = Stage3Folder(out).checkpoint(final)
    with autocast(ctx.amp, torch_device(device).type), phase("predict-val"):
        predict_split(model, ctx.val, ctx.val.ids, out / pred, device=torch_device(device),
                      options=PredictOptions.from_flags(args, has_cls, net_crf(config)), workers=args.workers,
                      checkpoint=checkpoint, desc="predict val")
    if not is_main_process():
        return None
    records = _collect_metrics(out, ctx.nets)
    io.write_bytes(out / METRICS, "".join(json.dumps(r) + "\n" for r in records).encode())
    outputs = {"final_net": final, "predict_seconds": round(time.time() - t_pred, 1),
               "nets": _net_summary(records)}
    prediction = {"scales": list(args.scales), "flip": args.flip, "crf": args.crf, "gate": args.gate}
    result = None
    missing = [i for i in ctx.val.ids if not ctx.val.has_mask(i)] if ctx.val.mask_dir is not None else ctx.val.ids
    if ctx.val.mask_dir is not None and missing:  # a scoring turned off by a few files must be seen
        log.warning("%d of %d images of %s have no ground truth (%s): val predictions are not scored; add "
                    "their masks to %s, or remove them from the list", len(missing), len(ctx.val.ids),
                    args.val_split, ", ".join(f"{ctx.val.mask_path(i)}" for i in missing[:5])
                    + (", ..." if len(missing) > 5 else ""), ctx.val.mask_dir)
    if not missing:
        result = evaluate(out / pred, ctx.val.mask_dir, ctx.val.ids, ctx.num_classes,
                          workers=args.workers, class_names=ctx.val.class_names)
        io.write_json(out / eval_file(pred), result)
        log.info("%s", format_table(result, title=f"== {name} val predictions: {out / pred}"))
        outputs["val_miou"] = prediction["val_miou"] = result["miou"]
    else:
        log.info("no ground truth for every image of %s: val predictions are not scored", args.val_split)
    if stage.manifest:  # the nets were finished before: keep their figures, add this prediction folder
        outputs = {**stage.manifest["outputs"]}
    outputs["predictions"] = {**outputs.get("predictions", {}), pred: prediction}
    outputs["model"] = _write_model(out, config, final, ctx.val.class_names, outputs["predictions"])
    stage.finish(outputs)
    return result


def _write_model(out: Path, config: dict, final: str, classes, predictions: dict) -> str:
    """stage3/model.pt: the final net with what it takes to use it anywhere (`wsss.modelfile`), with
    the test-time settings of the best scored prediction folder; returns its name in the stage folder."""
    path = Stage3Folder(out).model
    save_model(path, from_checkpoint(out, config, classes, final, best_prediction(predictions)))
    log.info("model file: %s (python -m wsss.predict --model %s --images DIR --out DIR)", path, path)
    return MODEL


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
