"""Class activation maps (Zhou et al., CVPR 2016) at several scales with horizontal flip.

The CAM of class c is the classifier's 1x1 conv for c applied to the feature map before global
average pooling. As in PSA and IRN, the maps of the image at scales 0.5..2.0 and of its mirror
image are added, so small objects get a response from the large scales and large objects a
complete one from the small scales: ReLU keeps each view's positive evidence (each scale, the
image and its mirror, separately, as PSA's and IRN's make_cam do: summed raw scores would let one
view's negative evidence cancel another's positive), each scale's map (flip undone) is upsampled
bilinearly to the image size, the maps are summed, and each class is divided by its maximum
(+1e-5) so that a threshold means the same for every class and image.

Speed: `torch.inference_mode()`, `channels_last` tensors, only the image's labelled classes are
upsampled, and a scale's image and its mirror go through the network in one batch.
`multiscale_cams_batch` also batches the images of one bucket (`wsss.shapes`: views padded to a size
divisor on a GPU, so that few shapes reach cuDNN): that fills a GPU, while on a CPU batches beyond
image + mirror were slower (`python -m bench.bench_cam`; docs/results.md, "Speed").

On disk a CAM is `ID.npz` {"cam": the maps as `wsss.scoremaps` stores them, "keys": int64 (n,) mask
ids}; `save_cams` returns the maps as stored, which is what stage 1 mines, so that a resumed run
mines the same regions.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss.data.transforms import MEAN, STD
from wsss.layout import item
from wsss.run import autocast, inference_kernels
from wsss.scoremaps import CAMFileError, read_cams, write_cams  # noqa: F401 - CAMFileError: what load_cams raises
from wsss.shapes import bucket, scaled_size

SCALES = (0.5, 1.0, 1.5, 2.0)


def to_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """RGB uint8 (B, H, W, 3) -> ImageNet-normalised float (B, 3, H, W), channels_last."""
    x = torch.from_numpy(np.require(images, requirements=("C", "W"))).to(device)  # a decoded photo is read-only
    x = x.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def pad_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`x` (B, C, h, w) padded at its bottom and right with zeros (the mean pixel once normalised) to `size`."""
    h, w = x.shape[-2:]
    return x if (h, w) == tuple(size) else F.pad(x, (0, size[1] - w, 0, size[0] - h))


def scaled_views(xs, sizes, scale: float, flip: bool) -> list[torch.Tensor]:
    """Each input (1, 3, h, w) of an image of `sizes[i]` at `scale` (bilinear; unscaled as is), then,
    with `flip`, each mirrored: the views of one forward, in the order the outputs are read back."""
    views = [x if scaled_size(size, scale) == size else
             F.interpolate(x, scaled_size(size, scale), mode="bilinear", align_corners=False)
             for x, size in zip(xs, sizes, strict=True)]
    return views + [v.flip(-1) for v in views] if flip else views


def crop_to_view(out: torch.Tensor, view, padded) -> torch.Tensor:
    """The part of a net's output map (..., h, w) for a `padded` input that covers the `view` itself.

    The nets here shrink an input by their output stride rounding up (every strided layer pads
    "same"), so the kept part has the size the unpadded view's map has, on the same grid: what
    follows (flip, resize to the image) is the unpadded path's, and only the net's view of the
    image border (the mean pixel beyond it rather than its own zero padding) can differ."""
    if tuple(view) == tuple(padded):
        return out
    h, w = out.shape[-2:]
    return out[..., :math.ceil(view[0] * h / padded[0]), :math.ceil(view[1] * w / padded[1])]


def multiscale_cams_batch(model, images, keys_list, scales=SCALES, flip: bool = True,
                          device="cpu", amp: str = "off", divisor: int = 1) -> list[np.ndarray]:
    """CAMs of several images of one bucket (`wsss.shapes`): one forward per scale for all of them.

    `images`: RGB uint8 arrays (H, W, 3) whose views pad to the same shapes at `divisor`
    (`wsss.shapes.bucket`; divisor 1: images of one size); `keys_list`: for each image the mask
    ids (1..C-1) of its labelled classes; `amp`: a resolved --amp (the net runs under it, the
    sums and normalisation in float32). A padded view's map is cropped to the view
    (`crop_to_view`) before it is resized to the image, so the padding never reaches a CAM. Returns for each image
    float32 (n, H, W) in [0, 1].
    """
    if len(images) == 0:
        return []
    images = [np.asarray(im) for im in images]
    for im in images:
        if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
            raise ValueError(f"images must be RGB uint8 (H, W, 3), got {im.shape} {im.dtype}")
    sizes = [im.shape[:2] for im in images]
    buckets = {bucket(size, scales, divisor) for size in sizes}
    if len(buckets) > 1:
        raise ValueError(f"images of sizes {sorted(set(sizes))} pad to different shapes at divisor {divisor}")
    keys_list = [np.asarray(k, dtype=np.int64).reshape(-1) for k in keys_list]
    if len(keys_list) != len(images):
        raise ValueError(f"{len(images)} images but {len(keys_list)} key lists")
    dev = torch.device(device)
    model = getattr(model, "module", model)  # DDP-wrapped or not
    model.eval().to(dev, memory_format=torch.channels_last)
    n = len(images)
    precision, kernels = autocast(amp, dev.type), inference_kernels(model, dev.type)
    with torch.inference_mode():
        xs_full = [to_input(im[None], dev) for im in images]
        sums = [None] * n
        for scale, padded in zip(scales, buckets.pop(), strict=True):
            views = scaled_views(xs_full, sizes, scale, flip)
            batch = torch.cat([pad_to(v, padded) for v in views]).contiguous(memory_format=torch.channels_last)
            with precision, kernels:
                raw = model.cams(batch).float()
            raw = F.relu(raw)  # per view, before the sum: no view's negative evidence cancels another's positive
            num_classes = raw.shape[1]
            for i, (keys, size) in enumerate(zip(keys_list, sizes, strict=True)):
                if keys.size and (keys.min() < 1 or keys.max() > num_classes):
                    raise ValueError(f"class ids {keys.tolist()} outside 1..{num_classes}")
                if keys.size == 0:
                    sums[i] = raw.new_zeros((0, *size))
                    continue
                up = _view_cam(raw, i, n, keys, size, scaled_size(size, scale), padded, flip)
                sums[i] = up if sums[i] is None else sums[i] + up
        out = []
        for cam in sums:
            cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-5)
            out.append(cam.cpu().numpy().astype(np.float32, copy=False))
    return out


def _view_cam(raw: torch.Tensor, i: int, n: int, keys: np.ndarray, size, view, padded, flip: bool) -> torch.Tensor:
    """Image i's map at one scale (its mirror's added back, flip undone) for `keys`, at the image `size`."""
    idx = torch.as_tensor(keys - 1, device=raw.device)
    maps = crop_to_view(raw[i:i + 1, idx], view, padded)
    if flip:
        maps = maps + crop_to_view(raw[n + i:n + i + 1, idx], view, padded).flip(-1)
    return F.interpolate(maps, size, mode="bilinear", align_corners=False)[0]


def multiscale_cams(model, image: np.ndarray, keys, scales=SCALES, flip: bool = True,
                    device="cpu", amp: str = "off") -> np.ndarray:
    """CAMs float32 (n, H, W) in [0, 1] of one RGB uint8 image for its labelled classes `keys`."""
    return multiscale_cams_batch(model, [image], [keys], scales, flip, device, amp)[0]


def cam_path(directory, id_: str) -> Path:
    return item(directory, id_, ".npz")


def save_cams(directory, id_: str, cam: np.ndarray, keys) -> np.ndarray:
    """Write `directory/ID.npz` (`wsss.scoremaps.write_cams`); returns the CAM as stored, float32
    (n, H, W), which is what callers must mine."""
    return write_cams(cam_path(directory, id_), cam, keys)


def load_cams(directory, id_: str, expected_shape) -> tuple[np.ndarray, np.ndarray]:
    """Read `directory/ID.npz` -> (cam float32 (n, H, W) at the image size `expected_shape`, keys
    int64 (n,)), checked: a CAM stored for any other size is an error, never used."""
    return read_cams(cam_path(directory, id_), expected_shape)
