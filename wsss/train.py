"""The training loop shared by stage 1 (classifier) and stage 3 (segmentation nets).

One loop, so every network gets the same guarantees: SGD with poly learning rate (DeepLab,
IRN) after a linear warm-up, gradient-norm clipping, mixed precision on CUDA (`--amp`: bf16, or fp16
with a gradient scaler whose gradients are unscaled before clipping), DistributedDataParallel
when launched by torchrun, a checkpoint after every epoch written atomically (the last one holds the
weights alone: `final_weights`) after the epoch's metrics line, and resume from it
after a kill (an interrupted epoch is redone from the last finished one, with the same data order
as an uninterrupted run).

`fit(model, dataset, step_fn, out_dir, TrainConfig(...))` reads as torchvision's reference scripts:
`make_optimizer`, `resume`, `prepare_loader`, then per epoch `train_one_epoch` (one `train_step` a
batch) and `end_epoch` (val figures, health, metrics lines, checkpoint).

Training never fails silently: a non-finite loss or gradient stops it at once, and after each
epoch `health(record)` (the caller's test for a dead net, e.g. `wsss.segment`'s "every val pixel
is one class while the loss sits at the constant predictor's level") may stop it with
`TrainingCollapsed`, after the epoch's line is written so the collapse can be seen.
`metrics.jsonl` holds one line per epoch and, every `log_every` iterations, a line with "iter"
(loss, learning rate, gradient norm before clipping): the moment a net dies is visible there.

DDP runs without `find_unused_parameters` (a second autograd pass over the graph each step): every
net here uses all its parameters in its loss (tests/test_train.py checks it); a net that does not
sets `TrainConfig.find_unused`.

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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one training (`fit`); the stages make it from their flags.

    `seed`: the data order, the augmentation and the per-step torch seed; `workers`: loader
    processes; `desc`: the name in the log, the progress bar and the error messages; `warmup`:
    iterations of linear warm-up; `clip_grad`: max gradient norm (0: no clipping); `log_every`:
    iterations between "iter" lines (and, on CUDA, between reads of the device); `amp`: a resolved
    --amp (wsss.run.resolve_amp), which `evaluate` runs under too; `find_unused`: DDP's
    find_unused_parameters, for a net whose loss leaves some parameters out."""

    epochs: int
    batch_size: int
    lr: float
    device: str
    seed: int
    workers: int = 0
    desc: str = "train"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup: int = 0
    clip_grad: float = 0.0
    log_every: int = LOG_EVERY
    amp: str = "off"
    find_unused: bool = False


@dataclass
class Loop:
    """What the steps of one training share: the bare module and the one that runs (DDP under
    torchrun), the optimizer, the fp16 scaler and the count of overflowing steps in a row."""

    config: TrainConfig
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    dev: torch.device
    iters_per_epoch: int
    skipped: int = 0

    @property
    def total(self) -> int:
        return self.iters_per_epoch * self.config.epochs

    @property
    def precision(self):
        return autocast(self.config.amp, self.dev.type)

    @property
    def check_every(self) -> int:
        """Reading a figure off the GPU waits for every queued kernel: there the loss and gradient
        norm stay on the device and are checked and read every `log_every` iterations; a CPU has no
        queue to drain, and fp16 reads the gradient norm every step to count its overflows."""
        return 1 if self.dev.type != "cuda" or self.scaler is not None else self.config.log_every


def fit(model, dataset, step_fn, out_dir, config: TrainConfig, *, param_groups=None, evaluate=None, health=None):
    """Train `model` on `dataset` (items from `dataset.item(index, rng)`); see the module docstring.

    `step_fn(model, batch, epoch) -> (loss, {name: float})`; `param_groups(lr)`: the optimizer's
    groups (default: every parameter at `config.lr`); `evaluate(model) -> {name: float}` runs on
    rank 0 after each epoch; `health(record) -> message or None` after it (rank 0).
    Returns the bare trained module.
    """
    out_dir = Path(out_dir)
    with cudnn_autotune(torch_device(config.device)):
        init_distributed(config.device)
        dev = torch_device(config.device)
        model = model.to(dev)
        optimizer = make_optimizer(model, config, param_groups)
        # fp16's narrow range: the loss is scaled up for backward, the gradients unscaled before clipping
        scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" and dev.type == "cuda" else None
        start_epoch = resume(out_dir, config, model, optimizer, scaler, dev)
        if start_epoch >= config.epochs:
            return model
        loader = prepare_loader(dataset, config, dev)
        loop = Loop(config, model, wrap_distributed(model, dev, config.find_unused), optimizer, scaler, dev,
                    iters_per_epoch=len(loader))
        for epoch in range(start_epoch, config.epochs):
            t0 = time.time()
            sums, iterations = train_one_epoch(loop, loader, step_fn, epoch)
            record = epoch_record(sums, epoch, loop.iters_per_epoch, t0)
            if is_main_process():
                end_epoch(loop, out_dir, iterations, record, evaluate, health)
            if distributed():
                dist.barrier()
        if not is_main_process():
            final_weights(model)  # rank 0 rounded its copy when it saved it
        return model


def make_optimizer(model, config: TrainConfig, param_groups=None) -> torch.optim.SGD:
    """SGD over `param_groups(lr)` (or every parameter at lr); each group keeps its base rate in
    "initial_lr" for the schedule."""
    groups = param_groups(config.lr) if param_groups else [{"params": model.parameters(), "lr": config.lr}]
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def resume(out_dir: Path, config: TrainConfig, model, optimizer, scaler, dev: torch.device) -> int:
    """Load out_dir's checkpoint into the model, optimizer and scaler; returns the epochs it holds
    (0 without one). A finished training's checkpoint holds the weights alone: the model gets them
    and the caller returns it. Metrics lines of epochs after the checkpoint's are dropped (they are redone)."""
    start_epoch = 0
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.is_file():
        state = io.load_checkpoint(ckpt_path, map_location=dev)
        model.load_state_dict(state["model"])
        start_epoch = state["epoch"]
        if start_epoch >= config.epochs:
            if is_main_process() and not any(r.get("epoch") == start_epoch for r in read_metrics(out_dir)):
                raise StageError(f"{ckpt_path}: training finished at epoch {start_epoch} but "
                                 f"{out_dir / METRICS} has no line for it (a run killed between the two "
                                 f"writes by an older version); the epoch cannot be redone from the final "
                                 f"weights: pass --force to redo the stage")
            return start_epoch
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        log.info("%s: resuming from %s after epoch %d", config.desc, ckpt_path, start_epoch)
    if is_main_process():  # lines of epochs after the checkpoint's (killed before its write) are redone
        _keep_metrics(out_dir / METRICS, start_epoch)
    return start_epoch


def prepare_loader(dataset, config: TrainConfig, dev: torch.device) -> DataLoader:
    """The loader of this rank's share of each global batch: an `EpochSeeded` set walked in
    `EpochOrder` (`loader.dataset`, `loader.sampler`), the incomplete last batch dropped."""
    world = rank_world()[1]
    if config.batch_size % world:
        raise ValueError(f"{config.desc}: batch size {config.batch_size} is not a multiple of the {world} processes")
    rank_batch = config.batch_size // world
    seeded = EpochSeeded(dataset, config.seed)
    sampler = DistributedSampler(seeded, shuffle=True, seed=config.seed, drop_last=True) if distributed() else None
    order = EpochOrder(len(seeded), config.seed, sampler)
    if len(order) < rank_batch:
        raise ValueError(f"{config.desc}: {len(dataset)} training images is fewer than one batch of "
                         f"{config.batch_size}")
    return DataLoader(seeded, batch_size=rank_batch, sampler=order, num_workers=config.workers, drop_last=True,
                      pin_memory=dev.type == "cuda", worker_init_fn=_seed_worker,
                      persistent_workers=config.workers > 0)


def wrap_distributed(model, dev: torch.device, find_unused: bool) -> torch.nn.Module:
    """The module that trains: DistributedDataParallel under torchrun, the model itself otherwise."""
    if not distributed():
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=find_unused)


def train_one_epoch(loop: Loop, loader: DataLoader, step_fn, epoch: int) -> tuple[dict[str, float], list[dict]]:
    """One pass over the loader; returns the epoch's summed logs and its "iter" lines."""
    config, n = loop.config, loop.iters_per_epoch
    loader.dataset.epoch = epoch
    loader.sampler.set_epoch(epoch)
    loop.net.train()
    sums: dict[str, float | torch.Tensor] = {}
    nonfinite = torch.zeros((), dtype=torch.bool, device=loop.dev)
    iterations: list[dict] = []
    bar = tqdm(loader, desc=f"{config.desc} {epoch + 1}/{config.epochs}", disable=not is_main_process(), leave=False)
    with phase("train"):
        for it, batch in enumerate(bar):
            step = epoch * n + it
            where = f"epoch {epoch + 1}, iteration {it + 1} of {n}"
            logs, norm = train_step(loop, step_fn, batch, epoch, step, where)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else v)  # as float()
            if loop.check_every > 1:
                nonfinite |= ~(torch.isfinite(logs["loss"]) & torch.isfinite(norm))
            if step % config.log_every == 0 or it + 1 == n:
                if loop.check_every > 1 and bool(nonfinite):  # the one read of the device in log_every steps
                    raise FloatingPointError(f"{config.desc}: the loss or gradient norm became non-finite by {where} "
                                             f"(checked every {loop.check_every} iterations); lower --lr or raise "
                                             f"--warmup")
                if step % config.log_every == 0:
                    iterations.append({"epoch": epoch + 1, "iter": step + 1, **{k: float(v) for k, v in logs.items()},
                                       "lr": loop.optimizer.param_groups[0]["lr"], "grad_norm": float(norm)})
                    if is_main_process():
                        tblog.scalars(f"{config.desc}/iter", step + 1, iterations[-1])
                bar.set_postfix(loss=f"{float(sums['loss']) / (it + 1):.4f}")
        sums = {k: float(v) for k, v in sums.items()}  # waits for the epoch's last kernels: the phase ends after
        count_images(n * config.batch_size)
    return sums, iterations


def train_step(loop: Loop, step_fn, batch: dict, epoch: int, step: int, where: str) -> tuple[dict, torch.Tensor]:
    """One SGD step at global step `step`; returns its logs ("loss" first) and the gradient norm
    before clipping (on the device: read only where `loop.check_every` says)."""
    config, optimizer, scaler = loop.config, loop.optimizer, loop.scaler
    torch.manual_seed(step_seed(config.seed, step))  # dropout / stochastic depth: the same after a resume
    for g in optimizer.param_groups:
        g["lr"] = scheduled_lr(g["initial_lr"], step, loop.total, config.warmup)
    batch = to_device(batch, loop.dev)
    with loop.precision:
        loss, logs = step_fn(loop.net, batch, epoch)
    if loop.check_every == 1 and not torch.isfinite(loss):
        raise FloatingPointError(f"{config.desc}: the loss became {loss.item()} at {where}; "
                                 f"lower --lr or raise --warmup")
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(
        [p for g in optimizer.param_groups for p in g["params"]],
        config.clip_grad if config.clip_grad > 0 else math.inf)
    _optimizer_step(loop, float(norm) if loop.check_every == 1 else math.nan, where)
    return {"loss": loss.detach(), **logs}, norm


def _optimizer_step(loop: Loop, grad_norm: float, where: str) -> None:
    """Apply the step, or stop on a non-finite gradient norm (nan: not read this step)."""
    desc = loop.config.desc
    if loop.scaler is not None:  # an fp16 overflow skips the step and lowers the scale; only a run of them is fatal
        loop.skipped = 0 if math.isfinite(grad_norm) else loop.skipped + 1
        if loop.skipped > MAX_SKIPPED:
            raise FloatingPointError(f"{desc}: the fp16 gradients overflowed {loop.skipped} steps in a row at "
                                     f"{where}; lower --lr, raise --warmup or use --amp bf16/off")
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    elif loop.check_every == 1 and not math.isfinite(grad_norm):
        raise FloatingPointError(f"{desc}: the gradient norm became {grad_norm} at {where}; "
                                 f"lower --lr or raise --warmup")
    else:
        loop.optimizer.step()


def epoch_record(sums: dict[str, float], epoch: int, iters_per_epoch: int, t0: float) -> dict:
    """The epoch's metrics line: its mean logs over every rank's images, not rank 0's share."""
    if distributed():
        totals = torch.tensor(list(sums.values()), dtype=torch.float64)
        dist.all_reduce(totals)
        sums = dict(zip(sums, (totals / rank_world()[1]).tolist(), strict=True))
    return {"epoch": epoch + 1, "steps": (epoch + 1) * iters_per_epoch,
            **{k: v / iters_per_epoch for k, v in sums.items()},
            "seconds": round(time.time() - t0, 1)}


def end_epoch(loop: Loop, out_dir: Path, iterations: list[dict], record: dict, evaluate, health) -> None:
    """Rank 0 after an epoch: the val figures and the health check join the record, the epoch's
    lines are written, then its checkpoint (none when the net is found dead: that raises)."""
    config, epoch = loop.config, record["epoch"]
    if evaluate is not None:
        loop.net.eval()
        with loop.precision, phase("epoch-val"):
            record.update(evaluate(loop.model))
    problem = health(record) if health is not None else None
    # the epoch's lines first, its checkpoint second: a kill between the two leaves lines the
    # resumed run replaces when it redoes the epoch, never a checkpoint without its epoch's line
    _append_metrics(out_dir / METRICS, iterations + [record])
    if problem is None:
        save_checkpoint(loop, out_dir / CHECKPOINT, epoch)
    tblog.scalars(f"{config.desc}/epoch", epoch, record)
    log.info("%s epoch %d/%d: %s", config.desc, epoch, config.epochs,
             ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if problem is not None:
        raise TrainingCollapsed(f"{config.desc}: {problem} (after epoch {epoch}; the loss per iteration is "
                                f"in {out_dir / METRICS})")


def save_checkpoint(loop: Loop, path: Path, epoch: int) -> None:
    """After the last epoch the float16 weights alone (`final_weights`), else everything a resume needs."""
    if epoch == loop.config.epochs:
        io.save_checkpoint(path, {"model": final_weights(loop.model), "epoch": epoch})
        return
    state = {"model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(), "epoch": epoch}
    if loop.scaler is not None:
        state["scaler"] = loop.scaler.state_dict()
    io.save_checkpoint(path, state)


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
