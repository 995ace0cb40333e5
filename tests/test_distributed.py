"""torchrun with 2 CPU processes (gloo): stages 1-3 train with DistributedDataParallel and share
the images out across ranks, which gives the artifacts of one process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss import io

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_gloo_available(),
                                                   reason="torch built without gloo")]
STAGES = Path(__file__).resolve().parents[1] / "stages"
# efficientnet-lite0's offline ImageNet weights: BN frozen
STAGE1 = ("--epochs", "2", "--iterations", "0", "--batch-size", "4", "--crop", "32", "--cam-scales", "1.0,1.5",
          "--ae-steps", "2", "--ae-stop-loss", "100", "--overlays", "0")
STAGE3 = ("--epochs", "1", "--batch-size", "4", "--crop", "32", "--tag", "ddp")


def launch(stage: str, data: Path, outputs: Path, run: str, *flags: str, processes: int = 1) -> None:
    """stages/STAGE.py in one process, or under torchrun in `processes` processes."""
    script = [str(STAGES / f"{stage}.py"), "--data", str(data), "--outputs", str(outputs), "--name", run,
              "--device", "cpu", "--workers", "1", *flags]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(STAGES.parent)}
    done = subprocess.run([sys.executable, *launcher, *script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{stage} ({processes} processes) failed:\n{done.stderr[-4000:]}"


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: io.read_mask(p) for p in sorted(folder.glob("*.png"))}


def test_two_processes_share_the_images_and_give_the_pseudo_masks_of_one(tiny_voc_factory, tmp_path):
    data = tiny_voc_factory("data", n_train=8, n_val=2)
    ids = (data / "ImageSets/Segmentation/train.txt").read_text().split()
    one, two, same = (tmp_path / name for name in ("one", "two", "same"))  # --outputs; the run is "r" in each
    for outputs, processes in ((one, 1), (two, 2)):
        launch("stage1", data, outputs, "r", *STAGE1, processes=processes)
        launch("stage2", data, outputs, "r", processes=processes)
    for folder in ("stage1/regions", "stage2/pseudo"):  # each rank wrote its share, together every image
        assert sorted(masks(two / "r" / folder)) == sorted(ids)
    for name in ("stage1", "stage2"):
        assert io.read_json(two / "r" / name / "manifest.json")["complete"]
    losses = [io.read_json(out / "r/stage1/step1/done.json")["final_loss"] for out in (one, two)]
    assert losses[1] == pytest.approx(losses[0], abs=0.02)  # the loss of all images, not of rank 0's half

    # From the same trained classifiers (the one-process checkpoints; training is then skipped), the
    # sharded CAMs, mined regions and CRF give exactly the one-process artifacts. (Training itself
    # differs by stochastic depth's random draws, which depend on how the batch is split.)
    shutil.copytree(one / "r/stage1", same / "r/stage1",
                    ignore=shutil.ignore_patterns("cam", "regions", "done.json", "manifest.json", "overlay"))
    launch("stage1", data, same, "r", *STAGE1, processes=2)
    launch("stage2", data, same, "r", processes=2)
    for folder in ("stage1/step1/regions", "stage1/step2/regions", "stage1/regions", "stage2/fused", "stage2/pseudo"):
        expected, got = masks(one / "r" / folder), masks(same / "r" / folder)
        assert sorted(got) == sorted(ids), folder
        assert all(np.array_equal(got[i], expected[i]) for i in ids), folder
    def outputs(run: Path) -> dict:  # the figures, without the phases' timings
        return {k: v for k, v in io.read_json(run / "r/stage2/manifest.json")["outputs"].items() if k != "phases"}

    assert outputs(same) == outputs(one)


def test_stage3_trains_with_ddp_and_predicts_every_val_image(tiny_voc_factory, tmp_path):
    data = tiny_voc_factory("data", n_train=8, n_val=3)
    outputs = tmp_path / "outputs"
    stage2 = outputs / "r" / "stage2"
    for id_ in (data / "ImageSets/Segmentation/train.txt").read_text().split():  # stage 2 as written by it
        io.write_mask(stage2 / "pseudo" / f"{id_}.png", io.read_mask(data / "SegmentationClassAug" / f"{id_}.png"))
    io.write_manifest(stage2, {"hand-made": True})
    launch("stage3", data, outputs, "r", *STAGE3, "--psl-plus", processes=2)

    stage = outputs / "r" / "stage3-ddp"
    manifest = io.read_json(stage / "manifest.json")
    assert manifest["complete"] and manifest["outputs"]["final_net"] == "psl-plus"
    assert sorted(p.stem for p in (stage / "pred-nogate").glob("*.png")) == \
        sorted((data / "ImageSets/Segmentation/val.txt").read_text().split())
    assert len(list((stage / "psl" / "train-crf").glob("*.png"))) == 8  # PSL+'s CRF, shared by the ranks
