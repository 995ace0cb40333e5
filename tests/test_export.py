"""wsss.export: an exported net matches the eager one at any input size, or is not written."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from wsss import export

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")
# none a multiple of the output stride (16) but the first; odd and even
SIZES = ((224, 224), (321, 257), (180, 300))
INFO = {"classes": ["background", "disc", "square", "bar"], "input": {"mean": [0.485, 0.456, 0.406]}}


@pytest.fixture(scope="module")
def net():
    from wsss.models.segnet import build_segnet

    torch.manual_seed(0)
    net = build_segnet("efficientnet-lite0", 4, output_stride=16, cls_branch=True, weights=None)
    with torch.no_grad():  # away from init: BN statistics and biases of a trained net, larger logits
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _max_differences(run, net, sizes):
    out = {}
    g = torch.Generator().manual_seed(1)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w, generator=g)
        with torch.no_grad():
            want = net(x)
            got = run(x)
        assert got[0].shape == (2, 4, h, w) and got[1].shape == (2, 3)
        out[(h, w)] = [(float((a - b).abs().max()), export.TOLERANCE * float(b.abs().max()) + export.FLOOR)
                       for a, b in zip(got, (want["seg"], want["cls"]), strict=True)]
    return out


def test_torchscript_loads_in_plain_torch_and_matches_the_net(net, tmp_path):
    out = tmp_path / "net.ts"
    report = export.export(net, INFO, "torchscript", out)
    assert set(report) == {f"{h}x{w}" for h, w in export.CHECK_SIZES}
    extra = {export.META: ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra[export.META]) == INFO
    # the check sizes, a batch of two, and sizes the trace never saw (odd, tiny)
    for size, diffs in _max_differences(loaded, net, (*SIZES, (33, 47), (17, 16))).items():
        for diff, allowed in diffs:
            assert diff <= allowed, (size, diff, allowed)


def test_a_trace_that_bakes_in_the_padding_is_refused(net, tmp_path, monkeypatch):
    """A plain trace of the net pads every input as it padded the example: the check catches it."""
    monkeypatch.setattr(export, "export_form", lambda net, onnx=False: export.ExportForm(copy.deepcopy(net)))
    out = tmp_path / "net.ts"
    with pytest.raises(export.ExportError, match=r"at input 321x257 .* differ .*not written"):
        export.export(net, INFO, "torchscript", out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_onnx_runs_in_onnxruntime_and_matches_the_net(net, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "net.onnx"
    export.export(net, INFO, "onnx", out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    run = lambda x: [torch.from_numpy(o) for o in session.run(None, {"image": x.numpy()})]  # noqa: E731
    for size, diffs in _max_differences(run, net, (*SIZES, (33, 47))).items():
        for diff, allowed in diffs:
            assert diff <= allowed, (size, diff, allowed)


def test_onnx_without_its_packages_says_what_to_install(net, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(export.ExportError, match="pip install"):
        export.export(net, INFO, "onnx", tmp_path / "net.onnx")
    assert not (tmp_path / "net.onnx").exists()
