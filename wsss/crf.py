"""Dense CRF (Kraehenbuehl & Koltun 2011, via pydensecrf) over an image's own labels (wsss.workers
runs it over many images in a process pool).

Why only the image's labels: mean-field inference passes one message per label per iteration.
A VOC image carries 1-3 of the 20 classes, and a CRF over background + those classes gives the
same labels as one over all 21 when the absent classes have (near) zero probability: they never
win the argmax, and with a Potts compatibility the messages they send are weighted by their own
(near-zero) marginals. It costs about half the CPU on VOC photos (pydensecrf also has a large
per-iteration cost that does not depend on the labels; see bench/bench_crf.py), and images spread
over a process pool use all cores.

Parameters. `dense_crf` defaults to DeepLab's / PSA's (`CRF_DEFAULTS`: gaussian sxy 3 compat 3;
bilateral sxy 80 srgb 13 compat 10; 10 iterations), made for a network's confident softmax.
`crf_labels`, which starts from a hard label map whose unaries are weak by design (gt_prob 0.7),
defaults to DeepLab v2's test-time kernels (`LABEL_CRF_DEFAULTS`: gaussian sxy 1 compat 3;
bilateral sxy 67 srgb 3 compat 4): with the stronger PSA kernels the bilateral term outweighs such
unaries and drags whole regions of similar colour to one label.

How ignore (255) pixels of a hard label map are treated (`crf_labels`):
  * in the unary, an ignore pixel gets a uniform distribution over the image's labels (or, when
    soft CAM/saliency scores are given, those scores mixed half-and-half with uniform): it casts
    no vote of its own, so the pairwise terms decide it from similar-looking neighbours; a
    labelled pixel gets `gt_prob` on its label and the rest spread evenly over the others;
  * after inference, a pixel whose largest marginal is below `confidence` is 255 (off by default:
    the marginals are close to 1 almost everywhere, so a threshold cannot pick out the CRF's
    mistakes);
  * then, in mode "agree" (the default), a pixel keeps its input label only where the CRF's label
    is the same; where the CRF disagrees, and wherever the input was 255, the output is 255. In
    mode "fill" the CRF's labels are taken everywhere, ignore pixels filled from their neighbours.
Why "agree", and these kernels: `python -m bench.bench_crf` simulates stage 2's fused masks on the
48 real VOC photos (mined regions spilling over object borders or cut short, the built-in saliency
of each photo for the background; 20% of the pixels ignored). As a check, the CRF removes labels
that disagree with the image's edges: mIoU of the labelled pixels 82.7 -> 84.7 and 79.2 -> 81.1
(two kinds of mined regions) for 1.5 points more ignored pixels. Filling the ignore pixels instead
drops it to 64, and the near-1 marginals cannot tell the wrong fills apart; with the PSA kernels
even "agree" loses (78.8, 76.9). Soft scores change nothing in mode "agree" (stage 2 leaves them
off). Figures: bench/results/crf.json.
"""
from __future__ import annotations

import numpy as np

from wsss.errors import StageError
from wsss.labels import IGNORE

CRF_DEFAULTS = {"iterations": 10, "gauss_sxy": 3.0, "gauss_compat": 3.0,
                "bi_sxy": 80.0, "bi_srgb": 13.0, "bi_compat": 10.0}
# Test-time CRF kernels published with each DeepLab net, cross-validated on VOC val by its authors
# (their names: pos_w = gauss_compat, pos_xy_std = gauss_sxy, bi_w = bi_compat, bi_xy_std = bi_sxy,
# bi_rgb_std = bi_srgb; 10 mean-field iterations in both releases):
# - DeepLab v1 (Chen et al., ICLR 2015), DeepLab-CRF-LargeFOV on VGG16, the net of AE-PSL and STC:
#   bi_w 4, bi_xy_std 121, bi_rgb_std 5, pos_w 3, pos_xy_std 3 (the "FOV" line of the DeepLab v1
#   release's CRF settings, deeplab-public run_densecrf.sh / README);
# - DeepLab v2 (Chen et al., TPAMI 2018), DeepLab-ASPP on VGG16: bi_w 4, bi_xy_std 65,
#   bi_rgb_std 3, pos_w 2, pos_xy_std 2; on ResNet-101: bi_w 4, bi_xy_std 67, bi_rgb_std 3, pos_w 3,
#   pos_xy_std 1 (deeplab-public-ver2 run_densecrf.sh; kazuto1011/deeplab-pytorch configs/voc12.yaml
#   keeps the ResNet-101 ones). Nets without published kernels (ResNet-50, EfficientNet-Lite) take
#   ResNet-101's, the closest net.
TEST_CRF = {
    "deeplab-v1-largefov-vgg16": {"iterations": 10, "gauss_sxy": 3.0, "gauss_compat": 3.0,
                                  "bi_sxy": 121.0, "bi_srgb": 5.0, "bi_compat": 4.0},
    "deeplab-v2-aspp-vgg16": {"iterations": 10, "gauss_sxy": 2.0, "gauss_compat": 2.0,
                              "bi_sxy": 65.0, "bi_srgb": 3.0, "bi_compat": 4.0},
    "deeplab-v2-aspp-resnet101": {"iterations": 10, "gauss_sxy": 1.0, "gauss_compat": 3.0,
                                  "bi_sxy": 67.0, "bi_srgb": 3.0, "bi_compat": 4.0},
}


# IRN's CRF for the confident regions of CAMs (Ahn et al., CVPR 2019, imutils.crf_inference_label: gaussian
# sxy 3 compat 3, bilateral sxy 50 srgb 5 compat 10, 10 iterations, labels at gt_prob 0.7): it grows or
# shrinks a thresholded CAM blob to the edges of the image before the blob becomes affinity labels.
CONFIDENT_CRF = {"iterations": 10, "gauss_sxy": 3.0, "gauss_compat": 3.0, "bi_sxy": 50.0, "bi_srgb": 5.0,
                 "bi_compat": 10.0}


def net_crf_params(backbone: str, head: str) -> dict:
    """The published test-time CRF kernels (`TEST_CRF`) of a segmentation net: its backbone and
    its head ("largefov" or "aspp", resolved)."""
    if backbone == "vgg16":
        return dict(TEST_CRF["deeplab-v1-largefov-vgg16" if head == "largefov" else "deeplab-v2-aspp-vgg16"])
    return dict(TEST_CRF["deeplab-v2-aspp-resnet101"])


# `crf_labels` (stage 2) uses DeepLab v2's ResNet-101 kernels whatever the net (module docstring says why)
LABEL_CRF_DEFAULTS = TEST_CRF["deeplab-v2-aspp-resnet101"]


def crf_params_of(config: dict) -> dict:
    """The dense-CRF kernels of a stage-2 config (its --crf-* flags; stage 2's defaults for a flag
    it lacks, e.g. a config written before the flag existed)."""
    return {k: float(config.get(f"crf_{k}", v)) if k != "iterations" else int(config.get("crf_iterations", v))
            for k, v in LABEL_CRF_DEFAULTS.items()}


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ImportError("the dense CRF needs pydensecrf: pip install pydensecrf2") from e
    return dcrf


def check_crf(who: str, off: str) -> None:
    """Fail before any work when a dense CRF the user asked for cannot run (`off`: the flag that
    goes without): a mask silently left unrefined would pass for a refined one."""
    try:
        _densecrf()
    except ImportError as e:
        raise StageError(f"{who}: {e}; or pass {off} to go without the CRF") from e


def dense_crf(image: np.ndarray, prob: np.ndarray, *, iterations: int = 10,
              gauss_sxy: float = 3.0, gauss_compat: float = 3.0,
              bi_sxy: float = 80.0, bi_srgb: float = 13.0, bi_compat: float = 10.0,
              min_prob: float = 1e-5) -> np.ndarray:
    """Posterior marginals float32 (n, H, W) of a dense CRF with unary -log(prob).

    `image` is RGB uint8 HxWx3, `prob` float (n, H, W) per-label probabilities (clipped below at
    `min_prob` so that a zero does not become an infinite energy).
    """
    image = np.asarray(image)
    prob = np.asarray(prob, dtype=np.float32)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf: image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    if prob.ndim != 3 or prob.shape[1:] != image.shape[:2]:
        raise ValueError(f"dense_crf: prob must be (n, {image.shape[0]}, {image.shape[1]}), got {prob.shape}")
    n, h, w = prob.shape
    if n == 1:
        return np.ones_like(prob)
    dcrf = _densecrf()
    crf = dcrf.DenseCRF2D(w, h, n)
    unary = -np.log(np.clip(prob, min_prob, None)).reshape(n, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=np.require(image, requirements=["C", "W"]),
                              compat=bi_compat)  # pydensecrf wants a writable buffer
    return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(n, h, w)


def label_unary(labels: np.ndarray, label_set: np.ndarray, gt_prob: float,
                soft: np.ndarray | None = None, soft_weight: float = 0.5) -> np.ndarray:
    """Probabilities (n, H, W) over `label_set` from a hard label map (255 = ignore).

    A labelled pixel: `gt_prob` on its label, the rest evenly on the others. An ignore pixel:
    uniform, or `soft_weight * soft + (1 - soft_weight) * uniform` when soft scores are given
    (at weight 0.5 never more confident than 0.5 + 0.5 / n, i.e. below a hard label's gt_prob).
    """
    n = len(label_set)
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must lie in (0, 1), got {gt_prob}")
    lut = np.full(256, -1, dtype=np.int64)
    lut[label_set] = np.arange(n)
    index = lut[labels]
    unknown = (index < 0) & (labels != IGNORE)
    if unknown.any():
        raise ValueError(f"label map holds ids {np.unique(labels[unknown]).tolist()} outside the "
                         f"image's labels {label_set.tolist()} and 255")
    prob = np.full((n,) + labels.shape, (1 - gt_prob) / (n - 1), dtype=np.float32)
    known = index >= 0
    rows, cols = np.nonzero(known)
    prob[index[known], rows, cols] = gt_prob
    ignore = ~known
    if soft is None:
        prob[:, ignore] = 1.0 / n
    else:
        soft = np.asarray(soft, dtype=np.float32)
        if soft.shape != prob.shape:
            raise ValueError(f"soft scores must have shape {prob.shape}, got {soft.shape}")
        total = np.maximum(soft.sum(0, keepdims=True), 1e-6)
        mixed = soft_weight * soft / total + (1 - soft_weight) / n
        prob[:, ignore] = mixed[:, ignore]
    return prob


def crf_labels(image: np.ndarray, labels: np.ndarray, keys, *, gt_prob: float = 0.7,
               confidence: float = 0.0, mode: str = "agree", soft: np.ndarray | None = None,
               soft_weight: float = 0.5, **crf_params) -> np.ndarray:
    """Refine a hard label map (uint8 HxW, 0 = bg, `keys`, 255 = ignore) with a dense CRF.

    The CRF runs over background + `keys` only (the image's own classes), with
    `LABEL_CRF_DEFAULTS` unless `crf_params` say otherwise. `soft`, optional,
    float (1 + len(keys), H, W) scores over the same labels, informs the ignore pixels. Returns
    uint8 HxW mask ids, 255 where the largest posterior stays below `confidence` and, in mode
    "agree", wherever the CRF's label differs from the input's (module docstring).
    """
    if mode not in ("agree", "fill"):
        raise ValueError(f"crf_labels: mode must be 'agree' or 'fill', got {mode!r}")
    labels = np.asarray(labels)
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > IGNORE):
            raise ValueError("crf_labels: label ids must lie in 0..255")
        labels = labels.astype(np.uint8)
    if labels.ndim != 2 or labels.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"crf_labels: label map {labels.shape} does not match image {np.asarray(image).shape}")
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if np.any((keys <= 0) | (keys >= IGNORE)) or len(np.unique(keys)) != len(keys):
        raise ValueError(f"crf_labels: keys must be distinct object ids in 1..254, got {keys.tolist()}")
    label_set = np.concatenate([[0], keys])
    if len(label_set) == 1:  # background only: nothing to decide
        out = np.zeros_like(labels, dtype=np.uint8)
        return np.where(labels == 0, out, IGNORE).astype(np.uint8) if mode == "agree" else out
    prob = label_unary(labels, label_set, gt_prob, soft, soft_weight)
    post = dense_crf(image, prob, **{**LABEL_CRF_DEFAULTS, **crf_params})
    out = label_set[post.argmax(0)].astype(np.uint8)
    out[post.max(0) < confidence] = IGNORE
    if mode == "agree":
        out[out != labels] = IGNORE
    return out
