"""Export a trained net for plain PyTorch or ONNX Runtime: `python -m wsss.export (--run RUN [--net NAME]
| --model FILE) --format torchscript|onnx --out FILE`.

The exported net takes a float tensor (N, 3, H, W) of any size, normalised as the model file says
(RGB scaled to 0-1, minus mean, over std) and returns a tuple: the segmentation logits
(N, C, H, W) at the input size, and for nets with PSL's classification branch the class logits
(N, C-1) too. `torch.jit.load(FILE)` (no wsss needed) or `onnxruntime.InferenceSession(FILE)` runs it.

Why not a plain `torch.jit.trace`: a trace records the Python ints a forward computes from its
input's shape as constants. EfficientNet-Lite's TensorFlow "SAME" convolutions compute their
padding from the input size, so a traced net pads every input as it padded the example: right for
inputs of the example's parity, silently wrong (shifted features) for others. The export form of a
net (`export_form`) replaces those convolutions with a scripted equivalent, whose padding stays
computed at run time, then traces the rest (whose shape arithmetic, the final resize to the input
size, the trace keeps dynamic).

An export is checked before it is written: the file, loaded back as a user would load it, must give
the eager net's outputs at `CHECK_SIZES` (odd and even, none a multiple of the output stride but
the first) within `TOLERANCE`, else nothing is written and the error says by how much they differ.
"""
from __future__ import annotations

import argparse
import copy
import io as _io
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsss import io
from wsss.layout import CONFIG

FORMATS = ("torchscript", "onnx")
CHECK_SIZES = ((224, 224), (321, 257), (180, 300))  # (H, W)
# allowed max |exported - eager| over every output: TOLERANCE x the largest |eager| output + FLOOR.
# The same float32 kernels in another graph (fused, reordered) differ in the last bits; a wrong
# padding or activation differs by percents
TOLERANCE, FLOOR = 1e-4, 1e-6
META = "wsss.json"  # the model file's info (classes, input, test_time...) inside the exported file


class ExportError(ValueError):
    """An export that cannot be made correctly (a missing package, outputs that differ from the net's)."""


class SamePadConv(nn.Module):
    """TensorFlow "SAME" convolution (EfficientNet-Lite's `Conv2dDynamicSamePadding`) written for
    `torch.jit.script`: the padding is computed from the input size at run time, also in a trace."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.kernel = [int(k) for k in conv.weight.shape[-2:]]
        self.stride = [int(s) for s in conv.stride]
        self.dilation = [int(d) for d in conv.dilation]
        self.groups = int(conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size(-2), x.size(-1)
        sh, sw = self.stride[0], self.stride[1]
        ph = max(((ih + sh - 1) // sh - 1) * sh + (self.kernel[0] - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max(((iw + sw - 1) // sw - 1) * sw + (self.kernel[1] - 1) * self.dilation[1] + 1 - iw, 0)
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, [0, 0], self.dilation, self.groups)


class TracedSamePadConv(SamePadConv):
    """`SamePadConv` for the ONNX exporter, which traces (and cannot hold a scripted module): the
    padding is computed with tensor ops on the input's shape, which a trace records as such."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = torch._shape_as_tensor(x)[-2:]
        stride, span = torch.tensor(self.stride), torch.tensor([(k - 1) * d + 1 for k, d in zip(
            self.kernel, self.dilation, strict=True)])
        pad = (((size + stride - 1) // stride - 1) * stride + span - size).clamp(min=0)
        x = F.pad(x, [pad[1] // 2, pad[1] - pad[1] // 2, pad[0] // 2, pad[0] - pad[0] // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, [0, 0], self.dilation, self.groups)


class ExportForm(nn.Module):
    """A SegNet as exported: tensor in, tuple of tensors out (seg logits, and class logits for PSL)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        return (out["seg"], out["cls"]) if "cls" in out else (out["seg"],)


def export_form(net: nn.Module, onnx: bool = False) -> ExportForm:
    """A copy of `net` (eval mode, CPU, float32) in `ExportForm`, its size-dependent convolutions
    swapped for a scripted `SamePadConv` (for a trace), or `TracedSamePadConv` for the ONNX exporter."""
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding, MemoryEfficientSwish, Swish

    form = ExportForm(copy.deepcopy(net).float().cpu().eval())
    for module in list(form.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv2dDynamicSamePadding):
                same = TracedSamePadConv(child) if onnx else torch.jit.script(SamePadConv(child))
                setattr(module, name, same)
            elif isinstance(child, MemoryEfficientSwish):  # a custom autograd Function: no trace can hold it
                setattr(module, name, Swish())
    return form.requires_grad_(False)


def _inputs(sizes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, h, w, generator=g) for h, w in sizes]


def compare(run_exported, net: nn.Module, sizes=CHECK_SIZES) -> dict:
    """{"HxW": max |difference| over every output} of the exported net (`run_exported(x) -> tuple of
    tensors`) against the eager `net` at `sizes`; ExportError if any output differs in shape or by
    more than TOLERANCE x its largest |value| + FLOOR."""
    eager = ExportForm(net).float().cpu().eval()
    report = {}
    for x in _inputs(sizes):
        key = f"{x.shape[2]}x{x.shape[3]}"
        with torch.inference_mode():
            want = eager(x)
            got = run_exported(x)
        if len(got) != len(want):
            raise ExportError(f"{key}: the exported net returns {len(got)} outputs, the net {len(want)}")
        report[key] = 0.0
        for name, g, w in zip(("segmentation logits", "class logits"), got, want, strict=False):
            g = torch.as_tensor(g)
            if tuple(g.shape) != tuple(w.shape):
                raise ExportError(f"at input {key} the exported net's {name} have shape {tuple(g.shape)}, "
                                  f"the net's {tuple(w.shape)}; not written")
            diff, allowed = float((g.float() - w).abs().max()), TOLERANCE * float(w.abs().max()) + FLOOR
            if diff > allowed:
                raise ExportError(f"at input {key} the exported net's {name} differ from the net's by up to "
                                  f"{diff:.3g} (allowed {allowed:.3g}); not written")
            report[key] = max(report[key], diff)
    return report


def to_torchscript(net: nn.Module, info: dict, sizes=CHECK_SIZES) -> tuple[bytes, dict]:
    """(the TorchScript file's bytes, `compare`'s report) of a SegNet; `info` (the model file's,
    without weights) goes into the file as META, for `torch.jit.load(..., _extra_files=...)`."""
    example = torch.zeros(1, 3, *sizes[0])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation; the tracer's warnings: checked below
        form = export_form(net)
        traced = torch.jit.trace(form, example, check_trace=False)
        buf = _io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={META: json.dumps(info, default=str)})
        data = buf.getvalue()
        loaded = torch.jit.load(_io.BytesIO(data), map_location="cpu")
    return data, compare(loaded, net, sizes)


def to_onnx(net: nn.Module, info: dict, sizes=CHECK_SIZES, opset: int = 17) -> tuple[bytes, dict]:
    """(the ONNX file's bytes, `compare`'s report against onnxruntime) of a SegNet, with dynamic
    batch, height and width; `info` goes into the model's metadata as META."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"--format onnx needs the onnx and onnxruntime packages ({e.name} is missing): "
                          f"pip install 'wsss[export]' or pip install onnx onnxruntime") from e
    outputs = ["seg", "cls"] if getattr(net, "cls", None) is not None else ["seg"]
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "seg": {0: "batch", 2: "height", 3: "width"}}
    if "cls" in outputs:
        axes["cls"] = {0: "batch"}
    buf = _io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        form = export_form(net, onnx=True)
        torch.onnx.export(form, (torch.zeros(1, 3, *sizes[0]),), buf, input_names=["image"],
                          output_names=outputs, dynamic_axes=axes, opset_version=opset, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = META, json.dumps(info, default=str)
    data = model.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return data, compare(lambda x: [torch.from_numpy(o) for o in session.run(None, {"image": x.numpy()})],
                         net, sizes)


def export(net: nn.Module, info: dict, fmt: str, out, sizes=CHECK_SIZES) -> dict:
    """Export `net` to `out` in `fmt` (FORMATS) once it matches the eager net; returns `compare`'s report."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    data, report = (to_torchscript if fmt == "torchscript" else to_onnx)(net, info, sizes)
    io.write_bytes(out, data)
    return report


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    from wsss.run import safe_name

    p = argparse.ArgumentParser(
        prog="python -m wsss.export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Export a trained net to TorchScript (torch.jit.load) or ONNX (onnxruntime): input a "
                    "float tensor (N, 3, H, W) of any size, normalised as the model file says; output the "
                    "segmentation logits at the input size (and PSL nets' class logits). The export is "
                    f"checked against the net at {len(CHECK_SIZES)} input sizes before it is written.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path,
                     help="a model file (stage3/model.pt, or python -m wsss.modelfile)")
    src.add_argument("--run", type=safe_name, help="a run name: its stage-3 final net (or --net)")
    p.add_argument("--outputs", default="outputs", help="with --run: folder holding all runs")
    p.add_argument("--tag", default=None, type=safe_name, help="with --run: reads OUTPUTS/RUN/stage3-TAG")
    p.add_argument("--net", default=None, help="with --run: another net the stage trained, by folder")
    p.add_argument("--format", choices=FORMATS, default="torchscript")
    p.add_argument("--out", type=Path, required=True, help="the file to write")
    return p


def main(argv=None) -> int:
    from wsss import modelfile, nets
    from wsss.stage import StageError, error_line

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None and (args.net or args.tag):
        parser.error("--net and --tag go with --run")
    try:
        if args.model is not None:
            net, info = modelfile.load_model(args.model, "cpu")
        else:
            stage = nets.stage_path(args)
            config = io.read_json(stage / CONFIG)
            content = modelfile.from_run(stage, config, modelfile.run_classes(config, stage), args.net)
            net, info = modelfile.build(content, "cpu", str(stage))
        report = export(net, info, args.format, args.out)
    except (StageError, OSError, ValueError) as e:
        print(f"error: {error_line(e) or e}", file=sys.stderr)
        return 1
    checked = ", ".join(f"{k} {d:.2g}" for k, d in report.items())
    print(f"wrote {args.out} ({args.format}); max |difference| from the net: {checked} "
          f"(allowed: {TOLERANCE:g} x the largest output + {FLOOR:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
