"""Few input shapes for inference: pad each view to a size divisor, batch the images that share one.

A GPU pays for every new input shape: cuDNN builds execution plans per shape (seconds for a depthwise
net), and an image of its own size is a batch of one. PASCAL VOC has hundreds of image sizes, so
inference over it (CAMs, predictions) padded nothing and batched little. Here every view (an image at
one scale) is padded at its bottom and right to the next multiple of a size divisor, as
mmsegmentation's `size_divisor` does, and images whose views all pad to the same shapes form one bucket
that is batched together; the outputs are cropped back to each view's own extent before they are
resized to the image, so the padding never reaches a result, and near the padded border the net sees
the mean pixel (zero after normalisation), as it does at any zero-padded convolution border.

The divisor (at scale 1; a view at scale s pads to the divisor times s) is a runtime choice, not a
setting of what is made: 64 on CUDA (VOC's train_aug sizes fall into a few dozen shapes per scale,
`bench/bench_shapes.py`) and 1 on a CPU, where a new shape costs
nothing and padding would only add pixels to compute. Results of the two agree within the tolerance
`tests/test_shapes.py` states.

Pure arithmetic: no torch, no paths.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

# Per device type: 64 keeps VOC's train_aug sizes to 33-34 shapes per scale at 9.5 % more pixels
# (32: 90 shapes, 6 %; bench/bench_shapes.py), and is a multiple of every backbone's output stride;
# 1 = no padding.
SIZE_DIVISOR = {"cuda": 64, "cpu": 1}


# The longest side a photo is processed at (CAMs, saliency, fusion and CRF, predictions); larger photos
# are scaled down to it and their outputs brought back to full size. VOC's photos (500 px) are far
# below it; a 6000x4000 photo at full size took about 8 GB in stages 2 and 3.
MAX_SIDE = 1024


def size_divisor(device_type: str) -> int:
    """The size divisor inference pads to on `device_type` ("cuda", "cpu", ...)."""
    return SIZE_DIVISOR.get(device_type, 1)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(h, w) of an image of `size` (h, w) at `scale`, at least one pixel a side."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def fitted_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(h, w) of an image of `size` scaled down so that its longer side is at most `max_side`."""
    h, w = size
    if max(h, w) <= max_side:
        return h, w
    return max(1, round(h * max_side / max(h, w))), max(1, round(w * max_side / max(h, w)))


def padded_size(size: tuple[int, int], divisor: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of `divisor` (1: unchanged)."""
    if divisor < 1:
        raise ValueError(f"size divisor {divisor}: expected a positive integer")
    return -(-size[0] // divisor) * divisor, -(-size[1] // divisor) * divisor


def view_divisor(divisor: int, scale: float) -> int:
    """The divisor of a view at `scale`: `divisor` scaled with it, so that an image's views pad
    alike (a 500x375 image: 256x192 at 0.5, 512x384 at 1, 768x576 at 1.5) and its bucket follows
    from its padded full size; one divisor for every scale would give scale 2 three times the shapes.
    Divisor 1 pads no view: an odd view padded to even would move the border padding of nets with
    "same" padding, and change their maps."""
    return 1 if divisor == 1 else max(1, round(divisor * scale))


def bucket(size: tuple[int, int], scales: Sequence[float], divisor: int) -> tuple[tuple[int, int], ...]:
    """The padded shape of each view of an image of `size`: images with the same bucket batch together."""
    return tuple(padded_size(scaled_size(size, s), view_divisor(divisor, s)) for s in scales)


def batches(items: Iterable, key: Callable[[object], Hashable], batch_size: int) -> list[list]:
    """`items` grouped by `key` into batches of at most `batch_size`; groups in order of first
    appearance, items in their order within a group (deterministic for a given input order)."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}: expected a positive integer")
    groups: dict[Hashable, list] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def shard_batches(batches_: Sequence[list], rank: int, world: int) -> list[list]:
    """This rank's share of `batches_`: a contiguous run of about len/world batches, so that with the
    batches grouped by bucket each rank meets few shapes, and the ranks' loads differ by one batch."""
    n = len(batches_)
    return list(batches_[rank * n // world:(rank + 1) * n // world])
