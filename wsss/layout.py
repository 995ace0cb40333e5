"""The layout of a run, `OUTPUTS/RUN/`: every folder and file name the stages write there, spelled once.

Code that needs a path under a run asks this module for it instead of joining name literals, so that
a stage, the evaluator, the report and the benchmarks can never disagree on where an artifact lies.
Only names and paths live here: no flags, no torch, no reading or writing (the readers and writers of
each format are wsss.io and wsss.scoremaps; the life of a stage folder is wsss.stage).

    OUTPUTS/RUN/
      stage1/        step{k}/cam/ID.npz, step{k}/regions/ID.png, step{k}/checkpoint.pt, step{k}/done.json,
                     regions/ID.npz + ID.png (the union over the kept steps), overlay/ID.png,
                     with --rw: rw/labels/ID.png, rw/checkpoint.pt, rw/metrics.jsonl, rw/seeds/ID.npz + ID.png,
                     rw/done.json
      stage2/        saliency/ID.png, fused/ID.png, pseudo/ID.png, overlay/ID.png, contact_sheet.png
      stage3[-TAG]/  NET/checkpoint.pt, NET/metrics.jsonl, pred[-...]/ID.png, eval[-...].json, model.pt
      report/, report.html
    every stage folder: stage.json, config.json, manifest.json, STAGE.log, .lock, .written
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def is_safe_name(text: str) -> bool:
    """One folder or file name: letters, digits and -_. only, never '.', '..' or a path."""
    return bool(SAFE_NAME.fullmatch(text)) and text not in (".", "..")


# ---------------------------------------------------------------- the stages

STAGE1, STAGE2, STAGE3 = "stage1", "stage2", "stage3"
STAGES = (STAGE1, STAGE2, STAGE3)
READ_BY = {STAGE1: (STAGE2, STAGE3), STAGE2: (STAGE3,)}  # the stages that read a stage's artifacts


def stage3_name(tag: str = "") -> str:
    """Stage 3's folder: `stage3`, or `stage3-TAG` for a variant trained beside it."""
    return f"{STAGE3}-{tag}" if tag else STAGE3


def is_stage_name(name: str) -> bool:
    """A run's subfolder named like a stage's (stage1, stage3-TAG, a stage of a later version)."""
    return name.startswith("stage")


def is_stage3(name: str) -> bool:
    return name == STAGE3 or name.startswith(f"{STAGE3}-")


# ---------------------------------------------------------------- files of every stage folder

STAMP = "stage.json"  # the artifact config and input fingerprints the folder's artifacts belong to
CONFIG = "config.json"  # every flag of the run that made it
MANIFEST = "manifest.json"  # written last: the stage is complete
LOCK = ".lock"
JOURNAL = ".written"  # what the stage wrote there (what --force removes)


def log_file(name: str) -> str:
    return f"{name}.log"


# ---------------------------------------------------------------- entries of the stages

STEP_GLOB = "step*"
CAMS = "cam"  # stage 1, per erasing step: ID.npz
REGIONS = "regions"  # stage 1: a step's mined regions (ID.png); the union over the steps (ID.npz seeds + ID.png)
RW = "rw"  # stage 1 with --rw: the affinity head and its random-walk seeds
SEEDS = "seeds"  # stage 1's rw/: the random-walk seeds, ID.npz + ID.png
LABELS = "labels"  # stage 1's rw/: the affinity head's confident labels, ID.png
OVERLAY = "overlay"  # stages 1 and 2: pictures of a sample of the images
DONE = "done.json"  # stage 1: an erasing step's figures, written when it is complete
CHECKPOINT = "checkpoint.pt"  # a trained net's weights and optimiser state (an erasing step, a stage-3 net)
METRICS = "metrics.jsonl"  # a trained net's curves; stage 3 also keeps all of its nets' in one
SALIENCY = "saliency"  # stage 2: saliency maps, ID.png
FUSED = "fused"  # stage 2: pseudo-masks before the CRF
PSEUDO = "pseudo"  # stage 2: pseudo-masks after the CRF, what stage 3 trains on
CONTACT_SHEET = "contact_sheet.png"
PRED = "pred"  # stage 3: val predictions, one scale, no flip, no CRF, gate on (older versions' defaults)
PRED_DEFAULT = "pred-nogate"  # the same with the gate off, today's defaults (wsss.predict.pred_folder)
PRED_GLOB = "pred-*"
EVAL_GLOB = "eval*.json"
MODEL = "model.pt"  # stage 3's model file, beside its nets
REPORT_FOLDER, REPORT_PAGE = "report", "report.html"


def step_name(k: int) -> str:
    return f"step{k}"


def step_number(name: str) -> int | None:
    """k of a folder named step{k}, None for any other name."""
    rest = name[len("step"):] if name.startswith("step") else ""
    return int(rest) if rest.isdigit() else None


def eval_file(pred: str) -> str:
    """The scores of prediction folder `pred` (`pred` -> eval.json, `pred-flip` -> eval-flip.json)."""
    return f"eval{pred[len(PRED):]}.json"


def item(folder, id_: str, suffix: str = ".png") -> Path:
    """The file of image `id_` in a per-image folder (masks and maps ID.png, CAMs and seeds ID.npz)."""
    return Path(folder) / f"{id_}{suffix}"


# ---------------------------------------------------------------- paths

@dataclass(frozen=True)
class Stage1Folder:
    path: Path

    def step(self, k: int) -> Path:
        return self.path / step_name(k)

    def cams(self, k: int) -> Path:
        return self.step(k) / CAMS

    def step_regions(self, k: int) -> Path:
        return self.step(k) / REGIONS

    def checkpoint(self, k: int) -> Path:
        return self.step(k) / CHECKPOINT

    @property
    def regions(self) -> Path:
        return self.path / REGIONS

    @property
    def rw(self) -> Path:
        return self.path / RW

    @property
    def rw_seeds(self) -> Path:
        return self.rw / SEEDS

    @property
    def rw_labels(self) -> Path:
        return self.rw / LABELS

    @property
    def overlay(self) -> Path:
        return self.path / OVERLAY


@dataclass(frozen=True)
class Stage2Folder:
    path: Path

    @property
    def saliency(self) -> Path:
        return self.path / SALIENCY

    @property
    def fused(self) -> Path:
        return self.path / FUSED

    @property
    def pseudo(self) -> Path:
        return self.path / PSEUDO

    @property
    def overlay(self) -> Path:
        return self.path / OVERLAY


@dataclass(frozen=True)
class Stage3Folder:
    path: Path

    def net(self, name: str) -> Path:
        """A trained net's folder (`psl`, `stc/i`...)."""
        return self.path / name

    def checkpoint(self, net: str) -> Path:
        return self.net(net) / CHECKPOINT

    def pred(self, folder: str = PRED) -> Path:
        return self.path / folder

    @property
    def model(self) -> Path:
        return self.path / MODEL


@dataclass(frozen=True)
class RunLayout:
    """OUTPUTS/RUN and its stage folders."""

    path: Path

    @classmethod
    def of(cls, outputs, run: str) -> RunLayout:
        return cls(Path(outputs) / run)

    def stage(self, name: str) -> Path:
        return self.path / name

    @property
    def stage1(self) -> Stage1Folder:
        return Stage1Folder(self.path / STAGE1)

    @property
    def stage2(self) -> Stage2Folder:
        return Stage2Folder(self.path / STAGE2)

    def stage3(self, tag: str = "") -> Stage3Folder:
        return Stage3Folder(self.path / stage3_name(tag))

    @property
    def report(self) -> Path:
        return self.path / REPORT_FOLDER
