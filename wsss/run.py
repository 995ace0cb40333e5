"""A run: `outputs/<run>/`, the flags every stage shares (and their kinds), seeding, logging, ranks.

The skip/resume rule of a stage folder lives in wsss.stage."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from wsss.config import declared_defaults
from wsss.errors import DeviceError
from wsss.layout import RunLayout, is_safe_name, log_file

log = logging.getLogger("wsss")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


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
    "runtime" | "test-time"), section (`args._sections`, `wsss.config.add_section`) and declared
    default (`args._defaults`), so that a stage tells its config from the rest by the flags' own
    declarations (stage 2's --crf is config, stage 3's test-time --crf is not; `wsss.config`). With
    `--preset` flags (`wsss.preset.add_args`), the preset's values become the defaults before the parse."""

    preset_section: str | None = None

    def format_help(self) -> str:
        for a in self._actions:  # the formatter adds a default only to a flag with help text: give every one
            if a.help is None and a.option_strings and a.default not in (None, argparse.SUPPRESS):
                a.help = "default: %(default)s"
        return super().format_help()

    def parse_known_args(self, args=None, namespace=None):
        defaults = declared_defaults(self)  # before a preset replaces them
        if self.preset_section is not None:
            from wsss import preset

            pre = preset.pre_parse(sys.argv[1:] if args is None else list(args))
            try:
                preset.apply(self, self.preset_section, pre.preset, pre.smoke)
            except preset.PresetError as e:
                self.error(str(e))
        namespace, rest = super().parse_known_args(args, namespace)
        _flatten_scales(namespace, self._actions)
        namespace._kinds = {a.dest: a.kind for a in self._actions if hasattr(a, "kind")}
        namespace._sections = {a.dest: a.section for a in self._actions if hasattr(a, "section")}
        namespace._defaults = defaults
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


def scale_list(text: str) -> tuple[float, ...]:
    """argparse type of one token of a scales flag: "1.0" or "0.5,1.0,1.5"."""
    try:
        scales = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected numbers, e.g. 0.5,1,1.5 or 0.5 1 1.5") from None
    if not scales or min(scales) <= 0 or max(scales) == float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}': expected a positive number (or several: 0.5,1,1.5)")
    return scales


def add_scales(parser, *names, container=list, **kwargs) -> argparse.Action:
    """A scales flag that takes both spellings, `0.5,1,1.5` and `0.5 1 1.5`; its value is a flat
    `container` of floats (what a config records, whichever spelling was typed)."""
    action = parser.add_argument(*names, nargs="+", type=scale_list, **kwargs)
    action.flatten = container
    return action


def _flatten_scales(namespace, actions) -> None:
    for a in actions:
        container = getattr(a, "flatten", None)
        value = getattr(namespace, a.dest, None)
        if container is not None and isinstance(value, list | tuple):
            flat = [float(x) for v in value for x in (v if isinstance(v, list | tuple) else [v])]
            setattr(namespace, a.dest, container(flat))


def safe_name(text: str) -> str:
    """argparse type of --run and --tag."""
    if not is_safe_name(text):
        raise argparse.ArgumentTypeError(f"'{text}': use letters, digits and -_. only (no '/', no '..')")
    return text


def _run_flags(p) -> None:
    runtime(p.add_argument("--run", "--name", dest="run", default="demo", type=safe_name,
                           help="run name: artifacts go to <outputs>/<run>/ (--name for torchrun, whose "
                                "--run-path shadows --run)"))
    runtime(p.add_argument("--outputs", default="outputs", help="folder holding all runs"))


def _device_flag(p) -> None:
    runtime(p.add_argument("--device", default="auto", type=device_flag, metavar="{auto,cpu,cuda,cuda:N}",
                           help="auto: cuda when it works, else cpu (the log says which and why)"))


def _workers_flag(p) -> None:
    runtime(p.add_argument("--workers", type=int, default=cpu_count(),
                           help="worker processes for data loading, CAMs on a CPU, saliency and CRFs "
                                "(default: the cores this process may use)"))


def runtime_parser(description: str) -> argparse.ArgumentParser:
    """The flags of a command that reads a finished run and makes nothing of a stage's (predict):
    the run, the device, the workers; no dataset, seed or --force, which it would ignore."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _run_flags(p)
    _device_flag(p)
    _workers_flag(p)
    return p


def common_parser(description: str, section: str | None = None) -> argparse.ArgumentParser:
    """Flags shared by every stage script; each stage adds its own. `section` ("stage1"...): the
    preset section the script reads (`--preset`, `--smoke`; see wsss.preset)."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if section is not None:  # see wsss.preset: the preset's name is runtime, its effective values are config
        from wsss import preset

        p.preset_section = section
        runtime(p.add_argument("--preset", default=None, metavar="NAME|FILE",
                               help=f"flags of a published setting as defaults (explicit flags override): "
                                    f"{preset.describe()}"))
        runtime(p.add_argument("--smoke", action="store_true",
                               help="shrink the run to minutes on a CPU (few images, 1 epoch, small crops, random "
                                    "weights, one scale): checks a preset end to end, says nothing of quality"))
    p.add_argument("--data", default="data/synthetic", help="dataset root in the VOC layout")
    _run_flags(p)
    p.add_argument("--train-split", default="train", help="list of training images (train_aug on VOC)")
    p.add_argument("--val-split", default="val")
    p.add_argument("--limit", type=int, default=0,
                   help="use only the first N images of each split (0: all; smoke runs)")
    _device_flag(p)
    runtime(p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                           help="mixed precision on CUDA for training, CAMs and predictions: auto = bf16 where "
                                "the GPU supports it, else fp16 with a gradient scaler; always off on a CPU"))
    runtime(p.add_argument("--deterministic", action="store_true",
                           help="deterministic cuDNN algorithms on a GPU (slower; CPU runs are deterministic "
                                "anyway)"))
    p.add_argument("--seed", type=int, default=0)
    _workers_flag(p)
    runtime(p.add_argument("--tensorboard", action="store_true",
                           help="also write TensorBoard curves to outputs/RUN/STAGE/tensorboard/ (pip install "
                                "tensorboard; then tensorboard --logdir outputs/RUN)"))
    runtime(p.add_argument("--force", action="store_true",
                           help="redo the stage in place: removes what it wrote before (and only that)"))
    return p


# The val images a training scores after every epoch, to watch it and to catch a collapse: a sample
# does both, while the whole split every epoch took a sixth of the demo's training time; the
# stage's own figures (stage 3's val predictions, `python -m wsss.eval`) always use every image.
EPOCH_VAL = 50


def add_epoch_val(parser: argparse.ArgumentParser) -> None:
    runtime(parser.add_argument("--epoch-val", type=int, default=EPOCH_VAL, metavar="N",
                                help="score at most N val images (spread over the list) after each training "
                                     "epoch; 0: all. The stage's final scores use every image"))


def spread(items: list, count: int) -> list:
    """`count` items spread evenly over `items` (first and last included); count <= 0: all of them."""
    if count <= 0 or count >= len(items):
        return list(items)
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, count).round().astype(int)))]


def run_dir(args) -> Path:
    return layout(args).path


def layout(args) -> RunLayout:
    """The folders of the run the flags --outputs and --run name."""
    return RunLayout.of(args.outputs, args.run)


def stage_dir(args, stage: str) -> Path:
    return run_dir(args) / stage


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here (None when it can): a CPU-only torch build, no driver or a
    driver too old for the build, no visible device."""
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA wheel (README, 'GPU')"
    if torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - torch's own message is the cause (no driver, too old...)
        return f"CUDA cannot start: {str(e).strip().splitlines()[0]}"
    if torch.cuda.device_count() == 0:
        return f"no CUDA device is visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
    return "torch.cuda.is_available() is False"


def device_flag(text: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N (the N-th visible GPU)."""
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"'{text}': choose auto, cpu, cuda or cuda:N")


def device_choice(name: str) -> tuple[str, str]:
    """(device, why) for --device; `cuda` without a working CUDA is an error naming the cause. With
    `cuda:N` the N-th GPU becomes this process's current one (torchrun's ranks take their LOCAL_RANK)."""
    if name == "cpu":
        return "cpu", "--device cpu"
    problem = cuda_problem()
    if name.startswith("cuda"):
        if problem:
            raise DeviceError(f"--device {name}: {problem}")
        if ":" in name and not distributed():
            import torch

            index = int(name.split(":")[1])
            if index >= torch.cuda.device_count():
                raise DeviceError(f"--device {name}: {torch.cuda.device_count()} GPUs are visible (0.."
                                  f"{torch.cuda.device_count() - 1})")
            torch.cuda.set_device(index)
        return "cuda", f"--device {name}"
    return ("cpu", f"--device auto: {problem}") if problem else ("cuda", "--device auto: CUDA works")


def resolve_device(name: str) -> str:
    return device_choice(name)[0]



def resolve_amp(name: str, device: str) -> str:
    """The precision of --amp on `device`: "bf16", "fp16" or "off" (always off on a CPU)."""
    if name not in AMP_CHOICES:
        raise ValueError(f"--amp {name!r}: choose one of {', '.join(AMP_CHOICES)}")
    if device != "cuda" or name == "off":
        return "off"
    import torch

    if name == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--amp bf16: {torch.cuda.get_device_name()} does not support bfloat16; "
                          f"use --amp fp16 or auto")
    return name


def autocast(amp: str, device_type: str = "cuda"):
    """The autocast context of a resolved --amp ("off": none)."""
    if amp == "off" or device_type != "cuda":
        return contextlib.nullcontext()
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def inference_kernels(model, device_type: str):
    """The convolution kernels of an inference pass: on CUDA, torch's own for a net with depthwise
    (grouped) convolutions, cuDNN's otherwise. cuDNN builds execution plans for every new input
    shape, and for depthwise convolutions that cost seconds a shape where torch's kernels start at
    once (docs/results.md, "GPU"): inference meets dozens of shapes even padded (`wsss.shapes`).
    Training keeps cuDNN: its crops have one shape."""
    if device_type != "cuda" or not any(getattr(m, "groups", 1) > 1 for m in model.modules()):
        return contextlib.nullcontext()
    import torch

    return torch.backends.cudnn.flags(enabled=False)


def environment(args) -> dict:
    """Where a stage runs, for its log and manifest: device (and why), precision, GPU, versions, commit."""
    import torch

    device, why = device_choice(args.device)
    env = {"device": device, "device_reason": why, "amp": resolve_amp(getattr(args, "amp", "off"), device),
           "deterministic": bool(getattr(args, "deterministic", False)), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
           "git_commit": git_commit()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["gpus"] = torch.cuda.device_count()
    return env


def git_commit() -> str | None:
    """The commit of the code that runs (with "+dirty" for uncommitted changes); None outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = False  # images of many sizes: autotuning each shape costs more than it saves
    torch.backends.cudnn.deterministic = deterministic


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
        handlers.append(logging.FileHandler(stage_dir / log_file(name)))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


# ---------------------------------------------------------------- phases

_phases: dict[str, dict] = {}  # this process's phase times since the last `phase_times()`
_active: list[dict] = []  # the phases under way, innermost last
_spans: list[tuple[str, float, float]] = []  # (name, start, end) of every phase this process ran


@contextlib.contextmanager
def phase(name: str):
    """Time one phase of a stage (training, CAMs, saliency, CRF, predictions): a stage's manifest
    and log say where its time went, and `bench.gpu_check` turns them into images per second and a
    projection of a full run. Phases of one name add up (each erasing step trains once); the code
    that does the work says how many images it did (`count_images`)."""
    start, t0 = time.time(), time.perf_counter()
    record = _phases.setdefault(name, {"start": round(start, 3), "seconds": 0.0, "images": 0})
    _active.append(record)
    try:
        yield record
    finally:
        _active.remove(record)
        record["seconds"] = round(record["seconds"] + time.perf_counter() - t0, 3)
        record["end"] = round(time.time(), 3)
        _spans.append((name, start, time.time()))


def phase_spans() -> list[tuple[str, float, float]]:
    """(name, start, end) wall-clock times of every phase this process has run (for utilisation samples)."""
    return list(_spans)


def count_images(n: int) -> None:
    """Add `n` images done to the innermost phase under way (none: nothing to count)."""
    if _active:
        _active[-1]["images"] += int(n)


def phase_times() -> dict[str, dict]:
    """The phases timed since the last call ({name: start, end, seconds, images}), and a fresh count."""
    times = {k: dict(v) for k, v in _phases.items()}
    _phases.clear()
    return times


# Each pool worker computes with one thread: a worker's BLAS, OpenMP, torch or OpenCV starting a thread
# per core, times one worker per core, made saliency 8x slower a worker on 16 cores (docs/results.md).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def cpu_count() -> int:
    """The cores this process may use (its affinity mask, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when its parent dies (Linux), so that a `kill -9` of a stage
    never leaves workers writing without its lock; elsewhere the pool's own shutdown is the guard."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _init_worker(parent: int, initializer, initargs) -> None:
    _die_with_parent(parent)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(1)
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def _one_thread_each():
    """The thread variables set to 1 while workers start (each reads them as its libraries load)."""
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def process_pool(workers: int, initializer=None, initargs=(), **kwargs):
    """A process pool for CPU work beside the main loop: workers spawned, not forked (a fork taken
    after torch or OpenCV have started their thread pools can deadlock in the child), each with one
    compute thread, and each killed with its parent. All start before this returns, so the thread
    variables can be set for their start alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(os.getpid(), initializer, initargs), **kwargs)
    with _one_thread_each():  # start every worker now: on demand, later ones would miss the variables
        while len(pool._processes) < workers:
            pool._spawn_process()
    return pool
