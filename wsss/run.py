"""A run: `outputs/<run>/`, the flags every stage shares (and their kinds), seeding, logging, ranks.

The skip/resume rule of a stage folder lives in wsss.stage."""
from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("wsss")
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def runtime(action: argparse.Action) -> argparse.Action:
    """Declare a flag as runtime: it decides how a stage runs, never what it makes (not config)."""
    action.kind = "runtime"
    return action


def test_time(action: argparse.Action) -> argparse.Action:
    """Declare a stage-3 flag as test-time: it names the prediction folder, never touches the training."""
    action.kind = "test-time"
    return action


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose namespace carries each declared flag's kind (`args._kinds`, dest ->
    "runtime" | "test-time"), so that a stage tells its config from the rest by the flags' own
    declarations (stage 2's --crf is config, stage 3's test-time --crf is not)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        namespace._kinds = {a.dest: a.kind for a in self._actions if hasattr(a, "kind")}
        return namespace, rest


def positive_int(text: str) -> int:
    """argparse type of counts and sizes (epochs, batch, crop): 0 would give bogus output or a crash."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}': expected a positive integer")
    return value


def positive_float(text: str) -> float:
    """argparse type of a scale."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}': expected a positive number")
    return value


def is_safe_name(text: str) -> bool:
    """One folder or file name: letters, digits and -_. only, never '.', '..' or a path."""
    return bool(SAFE_NAME.fullmatch(text)) and text not in (".", "..")


def safe_name(text: str) -> str:
    """argparse type of --run and --tag."""
    if not is_safe_name(text):
        raise argparse.ArgumentTypeError(f"'{text}': use letters, digits and -_. only (no '/', no '..')")
    return text


def common_parser(description: str) -> argparse.ArgumentParser:
    """Flags shared by every stage script; each stage adds its own."""
    p = Parser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/synthetic", help="dataset root in the VOC layout")
    runtime(p.add_argument("--run", "--name", dest="run", default="demo", type=safe_name,
                           help="run name: artifacts go to <outputs>/<run>/ (--name for torchrun, whose "
                                "--run-path shadows --run)"))
    runtime(p.add_argument("--outputs", default="outputs", help="folder holding all runs"))
    p.add_argument("--train-split", default="train", help="list of training images (train_aug on VOC)")
    p.add_argument("--val-split", default="val")
    runtime(p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"]))
    p.add_argument("--seed", type=int, default=0)
    runtime(p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                           help="data-loading / CRF worker processes"))
    runtime(p.add_argument("--force", action="store_true",
                           help="redo the stage in place: removes what it wrote before (and only that)"))
    return p


def run_dir(args) -> Path:
    return Path(args.outputs) / args.run


def stage_dir(args, stage: str) -> Path:
    return run_dir(args) / stage


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) in a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank_world()[0] == 0


def distributed() -> bool:
    """Launched by torchrun with more than one process."""
    return rank_world()[1] > 1


def shard(items) -> list:
    """This rank's share of `items` (every world-th from its rank): under torchrun each process
    mines CAMs, runs CRFs and predicts its own images, and the files together are one run's."""
    rank, world = rank_world()
    return list(items)[rank::world]


def barrier() -> None:
    """Wait for every rank (a no-op in a plain process)."""
    if distributed():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a plain process)."""
    if not distributed():
        return [obj]
    import torch.distributed as dist

    objs: list = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def setup_logging(stage_dir: Path, name: str) -> None:
    """Log to stderr and to <stage_dir>/<name>.log (rank 0 only writes the file)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if is_main_process():
        stage_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(stage_dir / f"{name}.log"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def process_pool(workers: int, **kwargs):
    """A process pool whose workers are spawned, not forked: a fork taken after torch or OpenCV
    have started their thread pools can deadlock in the child (seen in the test suite)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), **kwargs)
