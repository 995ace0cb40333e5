"""The training loop shared by stage 1 (classifier) and stage 3 (segmentation nets).

One loop, so every network gets the same guarantees: SGD with poly learning rate (DeepLab,
IRN) after a linear warm-up, gradient-norm clipping, mixed precision on CUDA (`--amp`: bf16, or fp16
with a gradient scaler whose gradients are unscaled before clipping), DistributedDataParallel
when launched by torchrun, a checkpoint after every epoch written atomically (the last one holds the
weights alone: `final_weights`) after the epoch's metrics line, and resume from it
after a kill (an interrupted epoch is redone from the last finished one, with the same data order
as an uninterrupted run).

Training never fails silently: a non-finite loss or gradient stops it at once, and after each
epoch `health(record)` (the caller's test for a dead net, e.g. `wsss.segment`'s "every val pixel
is one class while the loss sits at the constant predictor's level") may stop it with
`TrainingCollapsed`, after the epoch's line is written so the collapse can be seen.
`metrics.jsonl` holds one line per epoch and, every `log_every` iterations, a line with "iter"
(loss, learning rate, gradient norm before clipping): the moment a net dies is visible there.

DDP runs without `find_unused_parameters` (a second autograd pass over the graph each step): every
net here uses all its parameters in its loss (tests/test_train.py checks it); a net that does not
passes `find_unused=True`.

Under torchrun, `batch_size` stays the global batch: each of W processes takes batch_size / W
images, and DistributedSampler deals out the same permutation (randperm seeded with seed + epoch)
that one process walks through, so step t of a W-process run sees the same images, augmented the
same way, as step t of a one-process run; DDP's gradient average then equals the batch mean of a
per-image loss. Frozen batch norm (pretrained backbones) keeps it so; batch norm in training mode
sees only a rank's share.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from wsss import io, tblog
from wsss.errors import WsssError
from wsss.run import autocast, count_images, distributed, is_main_process, phase, rank_world
from wsss.stage import StageError

log = logging.getLogger("wsss")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LOG_EVERY = 10  # iterations between the "iter" lines of metrics.jsonl
MAX_SKIPPED = 20  # fp16: consecutive overflowing steps (each halves the loss scale) before training stops


class TrainingCollapsed(WsssError, RuntimeError):
    """The net stopped learning (see `fit`'s `health`); the message says what was seen and which flags to look at."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def init_distributed(device: str) -> None:
    """Join the torchrun process group once (gloo on CPU, nccl on CUDA)."""
    if distributed() and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)  # torch wants the group torn down before exit
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def torch_device(device: str) -> torch.device:
    """The torch device of a resolved --device: under torchrun the rank's GPU, else the current one
    (`--device cuda:N` made it N)."""
    if device == "cuda":
        rank = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(rank) if rank is not None else torch.cuda.current_device())
    return torch.device(device)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def scheduled_lr(base_lr: float, step: int, total: int, warmup: int = 0, power: float = 0.9) -> float:
    """Poly decay (DeepLab) times a linear warm-up over the first `warmup` iterations: the new head
    starts at a tiny step, so its first updates cannot push every unit of the head's ReLU layer
    negative before the features have been seen (the collapse described in `wsss.segment`)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return warm * base_lr * (1 - step / max(total, 1)) ** power


def step_seed(seed: int, step: int) -> int:
    """Torch's seed for one training step of one rank, from (seed, step, rank)."""
    return int(np.random.SeedSequence((seed, step, rank_world()[0])).generate_state(1)[0])


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)


class EpochSeeded(Dataset):
    """Gives each item a seed from (seed, epoch, index) so augmentation does not depend on
    worker count, resume point or process rank: the wrapped dataset takes `item(i, rng)`."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        rng = np.random.default_rng((self.seed, epoch, index))
        return self.dataset.item(index, rng)


class EpochOrder(torch.utils.data.Sampler):
    """One epoch's order as (epoch, index) keys for an `EpochSeeded` set: the epoch travels with each
    index, so the loader's workers can persist across epochs (a worker's copy of the set never
    sees a later epoch) and still augment as a fresh loader would. The order depends on (seed,
    epoch) alone (a resumed run sees the same batches), or comes from a DistributedSampler."""

    def __init__(self, size: int, seed: int, sampler: DistributedSampler | None = None):
        self.size, self.seed, self.sampler, self.epoch = size, seed, sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) if self.sampler is not None else self.size

    def __iter__(self):
        if self.sampler is not None:
            order = list(self.sampler)
        else:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        return iter([(self.epoch, i) for i in order])


@contextlib.contextmanager
def cudnn_autotune(device: torch.device):
    """cuDNN picks its fastest kernels for the fixed training crops (off again after: inference meets
    other shapes), unless --deterministic asked for reproducible ones."""
    saved = torch.backends.cudnn.benchmark
    if device.type == "cuda" and not torch.backends.cudnn.deterministic:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def fit(model, dataset, step_fn, out_dir, *, epochs: int, batch_size: int, lr: float, device: str,
        seed: int, workers: int = 0, param_groups=None, evaluate=None, desc: str = "train",
        weight_decay: float = 5e-4, momentum: float = 0.9, warmup: int = 0, clip_grad: float = 0.0,
        health=None, log_every: int = LOG_EVERY, amp: str = "off", find_unused: bool = False):
    """Train `model` on `dataset` (items from `dataset.item(index, rng)`); see the module docstring.

    `step_fn(model, batch, epoch) -> (loss, {name: float})`; `evaluate(model) -> {name: float}`
    runs on rank 0 after each epoch; `health(record) -> message or None` after it (rank 0).
    `warmup`: iterations of linear warm-up; `clip_grad`: max gradient norm (0: no clipping);
    `amp`: a resolved --amp (wsss.run.resolve_amp), which `evaluate` runs under too.
    Returns the bare trained module.
    """
    with cudnn_autotune(torch_device(device)):
        return _fit(model, dataset, step_fn, out_dir, epochs=epochs, batch_size=batch_size, lr=lr, device=device,
                    seed=seed, workers=workers, param_groups=param_groups, evaluate=evaluate, desc=desc,
                    weight_decay=weight_decay, momentum=momentum, warmup=warmup, clip_grad=clip_grad, health=health,
                    log_every=log_every, amp=amp, find_unused=find_unused)


def _fit(model, dataset, step_fn, out_dir, *, epochs, batch_size, lr, device, seed, workers, param_groups, evaluate,
         desc, weight_decay, momentum, warmup, clip_grad, health, log_every, amp, find_unused):
    out_dir = Path(out_dir)
    init_distributed(device)
    dev = torch_device(device)
    model = model.to(dev)
    groups = param_groups(lr) if param_groups else [{"params": model.parameters(), "lr": lr}]
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)

    # fp16's narrow range: the loss is scaled up for backward, the gradients unscaled before clipping
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" and dev.type == "cuda" else None
    start_epoch = 0
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.is_file():
        state = io.load_checkpoint(ckpt_path, map_location=dev)
        model.load_state_dict(state["model"])
        start_epoch = state["epoch"]
        if start_epoch >= epochs:
            if is_main_process() and not any(r.get("epoch") == start_epoch for r in read_metrics(out_dir)):
                raise StageError(f"{ckpt_path}: training finished at epoch {start_epoch} but "
                                 f"{out_dir / METRICS} has no line for it (a run killed between the two "
                                 f"writes by an older version); the epoch cannot be redone from the final "
                                 f"weights: pass --force to redo the stage")
            return model
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        log.info("%s: resuming from %s after epoch %d", desc, ckpt_path, start_epoch)
    if is_main_process():  # lines of epochs after the checkpoint's (killed before its write) are redone
        _keep_metrics(out_dir / METRICS, start_epoch)

    world = rank_world()[1]
    if batch_size % world:
        raise ValueError(f"{desc}: batch size {batch_size} is not a multiple of the {world} processes")
    rank_batch = batch_size // world
    seeded = EpochSeeded(dataset, seed)
    sampler = DistributedSampler(seeded, shuffle=True, seed=seed, drop_last=True) if distributed() else None
    iters_per_epoch = (len(sampler) if sampler is not None else len(seeded)) // rank_batch
    if iters_per_epoch == 0:
        raise ValueError(f"{desc}: {len(dataset)} training images is fewer than one batch of {batch_size}")
    total = iters_per_epoch * epochs
    net = model
    if distributed():
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=find_unused)
    precision = autocast(amp, dev.type)
    skipped = 0
    # Reading a figure off the GPU waits for every queued kernel: there the loss and gradient norm stay
    # on the device and are checked and read every `log_every` iterations; a CPU has no queue to drain.
    check_every = 1 if dev.type != "cuda" or scaler is not None else log_every
    order = EpochOrder(len(seeded), seed, sampler)
    loader = DataLoader(seeded, batch_size=rank_batch, sampler=order, num_workers=workers, drop_last=True,
                        pin_memory=dev.type == "cuda", worker_init_fn=_seed_worker, persistent_workers=workers > 0)

    for epoch in range(start_epoch, epochs):
        seeded.epoch = epoch
        order.set_epoch(epoch)
        net.train()
        sums: dict[str, float | torch.Tensor] = {}
        nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        t0 = time.time()
        iterations: list[dict] = []
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", disable=not is_main_process(), leave=False)
        with phase("train"):
            for it, batch in enumerate(bar):
                step = epoch * iters_per_epoch + it
                torch.manual_seed(step_seed(seed, step))  # dropout / stochastic depth: the same after a resume
                for g in optimizer.param_groups:
                    g["lr"] = scheduled_lr(g["initial_lr"], step, total, warmup)
                batch = to_device(batch, dev)
                with precision:
                    loss, logs = step_fn(net, batch, epoch)
                where = f"epoch {epoch + 1}, iteration {it + 1} of {iters_per_epoch}"
                if check_every == 1 and not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: the loss became {loss.item()} at {where}; "
                                             f"lower --lr or raise --warmup")
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], clip_grad if clip_grad > 0 else math.inf)
                grad_norm = float(norm) if check_every == 1 else math.nan
                if scaler is not None:  # an fp16 overflow skips the step and lowers the scale; only a run of them is fatal
                    skipped = 0 if math.isfinite(grad_norm) else skipped + 1
                    if skipped > MAX_SKIPPED:
                        raise FloatingPointError(f"{desc}: the fp16 gradients overflowed {skipped} steps in a row at "
                                                 f"{where}; lower --lr, raise --warmup or use --amp bf16/off")
                    scaler.step(optimizer)
                    scaler.update()
                elif check_every == 1 and not math.isfinite(grad_norm):
                    raise FloatingPointError(f"{desc}: the gradient norm became {grad_norm} at {where}; "
                                             f"lower --lr or raise --warmup")
                else:
                    optimizer.step()
                logs = {"loss": loss.detach(), **logs}
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else v)  # as float()
                if check_every > 1:
                    nonfinite |= ~(torch.isfinite(logs["loss"]) & torch.isfinite(norm))
                if step % log_every == 0 or it + 1 == iters_per_epoch:
                    if check_every > 1 and bool(nonfinite):  # the one read of the device in log_every steps
                        raise FloatingPointError(f"{desc}: the loss or gradient norm became non-finite by {where} (checked "
                                                 f"every {check_every} iterations); lower --lr or raise --warmup")
                    if step % log_every == 0:
                        iterations.append({"epoch": epoch + 1, "iter": step + 1, **{k: float(v) for k, v in logs.items()},
                                           "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(norm)})
                        if is_main_process():
                            tblog.scalars(f"{desc}/iter", step + 1, iterations[-1])
                    bar.set_postfix(loss=f"{float(sums['loss']) / (it + 1):.4f}")
            sums = {k: float(v) for k, v in sums.items()}  # waits for the epoch's last kernels: the phase ends after
            count_images(iters_per_epoch * batch_size)
        if distributed():  # the epoch's figures over every rank's images, not rank 0's share
            totals = torch.tensor(list(sums.values()), dtype=torch.float64)
            dist.all_reduce(totals)
            sums = dict(zip(sums, (totals / world).tolist(), strict=True))
        record = {"epoch": epoch + 1, "steps": (epoch + 1) * iters_per_epoch,
                  **{k: v / iters_per_epoch for k, v in sums.items()},
                  "seconds": round(time.time() - t0, 1)}
        if is_main_process():
            if evaluate is not None:
                net.eval()
                with precision, phase("epoch-val"):
                    record.update(evaluate(model))
            problem = health(record) if health is not None else None
            # the epoch's lines first, its checkpoint second: a kill between the two leaves lines the
            # resumed run replaces when it redoes the epoch, never a checkpoint without its epoch's line
            _append_metrics(out_dir / METRICS, iterations + [record])
            if problem is None and epoch + 1 == epochs:
                io.save_checkpoint(ckpt_path, {"model": final_weights(model), "epoch": epoch + 1})
            elif problem is None:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1}
                if scaler is not None:
                    state["scaler"] = scaler.state_dict()
                io.save_checkpoint(ckpt_path, state)
            tblog.scalars(f"{desc}/epoch", epoch + 1, record)
            log.info("%s epoch %d/%d: %s", desc, epoch + 1, epochs,
                     ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if problem is not None:
                raise TrainingCollapsed(f"{desc}: {problem} (after epoch {epoch + 1}; the loss per iteration is "
                                        f"in {out_dir / METRICS})")
        if distributed():
            dist.barrier()
    if not is_main_process():
        final_weights(model)  # rank 0 rounded its copy when it saved it
    return model


def final_weights(model: torch.nn.Module) -> dict:
    """Round the trained parameters to float16 in place and return the state dict to save.

    A finished training's checkpoint is kept for good and needs no optimizer state: its weights in
    float16 take a quarter of the disk of float32 weights + momentum (a VOC run keeps several nets).
    The net in memory is rounded too, so what follows the training (CAMs, predictions, the next
    net's init) is the same whether it used this net or the one reloaded by a resumed run."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    params = {name for name, _ in model.named_parameters()}
    return {k: v.half() if k in params else v for k, v in model.state_dict().items()}


def _append_metrics(path: Path, records: list[dict]) -> None:
    """Append an epoch's lines; lines of epochs a resumed run redoes are replaced, not repeated."""
    epoch = records[-1]["epoch"]
    lines = [r for r in read_metrics(path.parent, iterations=True) if r.get("epoch", math.inf) < epoch] + records
    io.write_bytes(path, "".join(json.dumps(r) + "\n" for r in lines).encode())


def _keep_metrics(path: Path, last_epoch: int) -> None:
    """Drop the lines of epochs after `last_epoch` (those of the checkpoint's epochs stay)."""
    if not path.is_file():
        return
    lines = read_metrics(path.parent, iterations=True)
    kept = [r for r in lines if r.get("epoch", 0) <= last_epoch]
    if len(kept) < len(lines):
        io.write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def epoch_metrics(out_dir, epoch: int) -> dict:
    """The epoch line of `epoch` (1-based) in out_dir/metrics.jsonl, found by its number."""
    found = [r for r in read_metrics(out_dir) if r.get("epoch") == epoch]
    if not found:
        raise StageError(f"{Path(out_dir) / METRICS}: no line for epoch {epoch}; pass --force to redo the stage")
    return found[-1]


def read_metrics(out_dir, iterations: bool = False) -> list[dict]:
    """The epoch lines of out_dir/metrics.jsonl (with `iterations`, the "iter" lines too)."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines if iterations else [r for r in lines if "iter" not in r]
