"""Optional TensorBoard logging (`--tensorboard`): live curves beside `metrics.jsonl`, which stays the record.

A stage opens one writer for its folder (`STAGE/tensorboard/`, so `tensorboard --logdir outputs/RUN`
shows every stage of a run); the training loop sends its logged iterations and epochs, stage 3's
per-epoch val score a few of its predictions. Without `--tensorboard` every call is a no-op, and
nothing imports TensorBoard.
"""
from __future__ import annotations

from pathlib import Path

from wsss.errors import WsssError

FOLDER = "tensorboard"
IMAGES = 3  # val predictions shown per epoch

_writer = None
_steps: dict[str, int] = {}  # per image tag, how many times it was logged (its x axis)


def start(stage_dir: Path) -> None:
    """Open the writer of a stage folder; a missing TensorBoard is an error before any work."""
    global _writer
    stop()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise WsssError(f"--tensorboard needs the tensorboard package ({e}): pip install tensorboard, "
                        f"or run without --tensorboard") from e
    _writer = SummaryWriter(str(Path(stage_dir) / FOLDER))


def active() -> bool:
    return _writer is not None


def scalars(prefix: str, step: int, values: dict) -> None:
    """`values`' numbers as `prefix/name` at `step` (non-numbers are skipped)."""
    if _writer is None:
        return
    for name, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            _writer.add_scalar(f"{prefix}/{name}", value, step)
    _writer.flush()


def images(tag: str, pictures) -> None:
    """RGB uint8 pictures (H, W, 3) under `tag`, at the tag's next step (one step an epoch)."""
    if _writer is None:
        return
    step = _steps.get(tag, 0) + 1
    _steps[tag] = step
    for i, picture in enumerate(pictures):
        _writer.add_image(f"{tag}/{i}", picture, step, dataformats="HWC")
    _writer.flush()


def stop() -> None:
    global _writer
    if _writer is not None:
        _writer.close()
    _writer = None
    _steps.clear()
