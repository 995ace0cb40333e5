"""Device and precision choice (wsss.run): never a silent fallback, never a wrong precision."""
from __future__ import annotations

import pytest
import torch

from wsss.errors import DeviceError, WsssError
from wsss.run import AMP_CHOICES, common_parser, device_choice, environment, resolve_amp, seed_everything

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


@no_cuda
def test_device_cuda_without_cuda_is_an_error_naming_the_cause():
    with pytest.raises(DeviceError) as e:
        device_choice("cuda")
    message = str(e.value)
    assert message.startswith("--device cuda: ") and isinstance(e.value, WsssError)
    assert any(w in message for w in ("CPU-only build", "CUDA cannot start", "no CUDA device is visible"))


@no_cuda
def test_a_device_error_is_one_error_line_of_the_command_lines(tmp_path, capsys):
    """Library code raises DeviceError; the stage scripts and wsss.predict print it as one line."""
    from wsss.cli import stage3
    from wsss.predict import main as predict

    with pytest.raises(SystemExit, match=r"^error: --device cuda: \S"):
        stage3(["--data", str(tmp_path), "--run", "r", "--outputs", str(tmp_path / "out"), "--device", "cuda"])
    (tmp_path / "photos").mkdir()
    assert predict(["--model", str(tmp_path / "model.pt"), "--images", str(tmp_path / "photos"), "--out",
                    str(tmp_path / "masks"), "--device", "cuda"]) == 1
    assert capsys.readouterr().err.startswith("error: --device cuda: ")


@no_cuda
def test_device_auto_says_why_it_chose_the_cpu():
    device, why = device_choice("auto")
    assert device == "cpu" and why.startswith("--device auto: ") and len(why) > len("--device auto: ")


@pytest.mark.parametrize("amp", AMP_CHOICES)
def test_mixed_precision_is_off_on_a_cpu(amp):
    assert resolve_amp(amp, "cpu") == "off"


def test_cudnn_determinism_is_a_flag_not_forced():
    seed_everything(0)
    assert not torch.backends.cudnn.deterministic
    seed_everything(0, deterministic=True)
    assert torch.backends.cudnn.deterministic
    seed_everything(0)


def test_the_environment_names_device_precision_versions_and_commit():
    args = common_parser("test").parse_args(["--device", "cpu", "--amp", "bf16"])
    env = environment(args)
    assert env["device"] == "cpu" and env["amp"] == "off" and env["torch"] == torch.__version__
    assert {"cuda", "cudnn", "git_commit", "device_reason", "deterministic"} <= set(env)


def test_spread_takes_evenly_spaced_items_and_all_for_zero():
    from wsss.run import spread

    items = list(range(10))
    assert spread(items, 3) == [0, 4, 9] and spread(items, 1) == [0]
    assert spread(items, 0) == items and spread(items, 50) == items and spread([], 5) == []


def test_device_takes_a_gpu_index_and_refuses_other_names():
    from wsss.run import common_parser, resolve_device

    p = common_parser("test")
    assert p.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        p.parse_args(["--device", "gpu"])
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"^--device cuda:0: "):
            resolve_device("cuda:0")
