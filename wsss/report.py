"""The run report: one static page, `outputs/RUN/report.html`, showing what a run made.

    python -m wsss.report --run NAME [--outputs outputs] [--sample 12] [--worst 8]

It is built from the run's artifacts (the layout in README.md) and, for the images and the ground
truth, from the dataset the stages' config names. For a sample of training images: the image, the
CAM of every erasing step (over the image as that step saw it, earlier regions erased), the mined
union, the saliency, the fused and the CRF pseudo-masks (titled with the fusion rule that made
them) and the ground truth; for a sample of val images: the image, the prediction of every stage-3
folder and the ground truth; per-class IoU bars from each `eval.json`; where each stage-3 net fails
on val (`wsss.image_scores`): its worst images by per-image IoU beside their ground truth, the
confusion matrix as a picture and every image's scores in `report/scores-STAGE.json`; the training
curves of every `metrics.jsonl`; the config and the summary figures of every stage's manifest.
Tables of pictures fit a 1,400 px window (wider ones scroll in their own box).

Every picture is a PNG under `outputs/RUN/report/`, referenced by a path relative to the page, so
the page opens from disk (no server, no script) and `report.html` + `report/` can be copied
elsewhere. Pictures left from an earlier report are removed. A stage that has not run is shown as
"not run" and a missing file as "missing": the report works on a partial run.
"""
from __future__ import annotations

import argparse
import html
import io as _io
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from tqdm import tqdm

from wsss import io, layout
from wsss.data.voc import DatasetError, VOCDataset
from wsss.errors import StageError
from wsss.fusion import fusion_of
from wsss.image_scores import score_images
from wsss.layout import RunLayout, Stage1Folder, Stage2Folder, Stage3Folder, item
from wsss.mining import erase
from wsss.run import safe_name
from wsss.scoremaps import read_cams
from wsss.viz import colorize, heatmap, resize, to_rgb

log = logging.getLogger("wsss")
PAGE = layout.REPORT_PAGE
THUMB_HEIGHT = 128  # panels are written at this height: small files, a row of 9 panels fits a screen
# metrics.jsonl keys that are not training curves
NOT_CURVES = {"epoch", "seconds", "net", "steps", "val_classes", "val_class"}


# ---------------------------------------------------------------- the run on disk

@dataclass
class StageStatus:
    """What the report knows of one stage folder (not an open stage: wsss.stage.Stage is that)."""

    name: str
    path: Path
    status: str  # "complete" | "unfinished" (folder without a manifest) | "not run"
    config: dict | None
    manifest: dict | None

    @property
    def ran(self) -> bool:
        return self.status != "not run"


def read_stage(run: Path, name: str) -> StageStatus:
    path = RunLayout(run).stage(name)
    manifest = _read_json(path / layout.MANIFEST)
    config = manifest["config"] if manifest and "config" in manifest else _read_json(path / layout.CONFIG)
    if not path.is_dir():
        status = "not run"
    elif manifest and manifest.get("complete"):
        status = "complete"
    else:
        status = "unfinished"
    return StageStatus(name, path, status, config, manifest)


def stage_names(run: Path) -> list[str]:
    """stage1, stage2, stage3 (always, so a missing one shows as not run), then stage3-TAG variants."""
    variants = sorted(p.name for p in run.glob(layout.stage3_name("*")) if p.is_dir())
    return [*layout.STAGES, *variants]


def _read_json(path: Path):
    try:
        return io.read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); left out of the report", path, e)
        return None


def read_run_metrics(run: Path) -> dict[str, dict[str, list[dict]]]:
    """{stage: {source: epoch records}} from every metrics.jsonl under the run.

    A source is the folder of one training (stage1/step2, stage3/psl), "(discarded)" added for an
    erasing step stage 1 dropped. stage3/metrics.jsonl gathers its nets' lines tagged with "net";
    those are split by net and used only where the net's own file is gone, so no curve is drawn twice.
    """
    own, gathered = {}, {}
    for path in sorted(run.rglob(layout.METRICS)):
        if layout.REPORT_FOLDER in path.relative_to(run).parts:
            continue
        source = path.parent.relative_to(run).as_posix()
        for r in _read_jsonl(path):
            if "net" in r:
                gathered.setdefault(f"{source}/{r['net']}", []).append(r)
            else:
                own.setdefault(source, []).append(r)
    by_stage: dict[str, dict[str, list[dict]]] = {}
    for source, records in {**gathered, **own}.items():
        if "/" not in source:  # a stage folder's own lines without "net" are not one training
            continue
        done = _read_json(run / source / layout.DONE) or {}  # stage 1 marks discarded erasing steps
        label = f"{source} (discarded)" if done.get("kept") is False else source
        by_stage.setdefault(source.split("/")[0], {})[label] = records
    return {stage: dict(sorted(sources.items())) for stage, sources in sorted(by_stage.items())}


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            log.warning("%s: line %d is not a JSON object; skipped", path, n)
    return records


def dataset_of_stages(stages: dict[str, StageStatus], split_key: str) -> tuple[VOCDataset | None, str]:
    """The dataset split the run used (from the first stage config naming it), or None and why."""
    for stage in stages.values():
        config = stage.config or {}
        if config.get("data") and config.get(split_key):
            try:
                return VOCDataset(config["data"], config[split_key]), ""
            except DatasetError as e:
                return None, f"dataset not readable ({e}; run the report where the stages ran)"
    return None, "no stage config names the dataset"


def sample_ids(ids: list[str], count: int) -> list[str]:
    """`count` ids evenly spread over the list (deterministic, covers the whole split); none for a
    count <= 0 (where wsss.run.spread, which picks what to draw, takes them all)."""
    if count <= 0 or not ids:
        return []
    picks = np.linspace(0, len(ids) - 1, min(count, len(ids))).round().astype(int)
    return [ids[i] for i in sorted(set(picks.tolist()))]


# ---------------------------------------------------------------- pictures

class Pictures:
    """Writes the report's PNGs under outputs/RUN/report/ and remembers them, so that pictures of an
    earlier report (another sample, a stage since removed) can be deleted at the end: those the run
    folder's journal (io.journal, kept while the report holds the run's lock) records, and no file
    the report did not write, whatever its name."""

    def __init__(self, run: Path):
        self.run, self.root = run, RunLayout(run).report
        self.written: set[Path] = set()

    def panel(self, name: str, rgb: np.ndarray, nearest: bool = False) -> str:
        rgb = to_rgb(rgb)
        h, w = rgb.shape[:2]
        width = max(1, round(w * THUMB_HEIGHT / h))
        return self._write(name, lambda path: io.write_png(path, resize(rgb, (THUMB_HEIGHT, width), nearest)))

    def figure(self, name: str, fig) -> str:
        import matplotlib.pyplot as plt

        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        return self._write(name, lambda path: io.write_bytes(path, buf.getvalue()))

    def data(self, name: str, obj) -> str:
        return self._write(name, lambda path: io.write_json(path, obj))

    def _write(self, name: str, write: Callable[[Path], None]) -> str:
        path = self.root / name
        write(path)
        self.written.add(path)
        return path.relative_to(self.run).as_posix()

    def remove_stale(self, page: Path) -> None:
        """The files earlier reports wrote that this one did not (and `page`, this one's page) go;
        a user's own files stay."""
        keep = {p.relative_to(self.run).as_posix() for p in (*self.written, page)}
        io.remove_journaled(self.run, keep=keep)


@dataclass
class Cell:
    """One table cell: a picture (src relative to the page) or a note saying why there is none."""
    src: str | None = None
    note: str = ""


@dataclass
class Column:
    """A column of the image tables: `render(id)` gives (RGB array, is a label mask) or None when
    its artifact is missing; `absent` says why the whole column is empty (e.g. "not run")."""
    title: str
    key: str  # file-name part of the column's pictures
    render: Callable[[str], tuple[np.ndarray, bool] | None]
    absent: str = ""


def _mask(path: Path):
    return (colorize(io.read_mask(path)), True) if path.is_file() else None


def _grey(path: Path):
    return (io.read_mask(path), False) if path.is_file() else None


def _erased_by(stage1: Path, id_: str, earlier_steps: list[int], image: np.ndarray) -> np.ndarray:
    """The image as an erasing step saw it (`wsss.mining.erase` of the regions mined in earlier steps;
    a missing or mis-sized region file erases nothing, where stage 1 would stop)."""
    mined = np.zeros(image.shape[:2], bool)
    for k in earlier_steps:
        path = item(Stage1Folder(stage1).step_regions(k), id_)
        if path.is_file():
            region = io.read_mask(path)
            if region.shape == image.shape[:2]:
                mined |= region != 0
    return erase(image, mined)


def _cam(stage1: Path, step: int, earlier: list[int], dataset: VOCDataset | None):
    """Heat map of the max over the labelled classes' CAMs of one step, over the erased image."""
    def render(id_: str):
        path = item(Stage1Folder(stage1).cams(step), id_, ".npz")
        if not path.is_file():
            return None
        # without the dataset the image's size is unknown: the map as stored
        cam, _ = read_cams(path, None if dataset is None else dataset.image_size(id_)[::-1])
        shape = cam.shape[1:]
        top = cam.max(axis=0) if len(cam) else np.zeros(shape, np.float32)
        if dataset is None:
            return heatmap(top), False
        return heatmap(top, _erased_by(stage1, id_, earlier, dataset.image(id_))), False
    return render


def train_columns(stages: dict[str, StageStatus], dataset: VOCDataset | None, why_no_data: str) -> list[Column]:
    s1, s2 = stages[layout.STAGE1], stages[layout.STAGE2]
    f1, f2 = Stage1Folder(s1.path), Stage2Folder(s2.path)
    steps = sorted(k for p in s1.path.glob(f"{layout.STEP_GLOB}/{layout.CAMS}")
                   if (k := layout.step_number(p.parent.name)) is not None)
    rule = fusion_of(s2.config) if s2.config else ""  # which fusion rule made the pseudo-masks
    crf = ("CRF" if s2.config.get("crf", True) else "no CRF") if s2.config else ""
    columns = [_image_column(dataset, why_no_data)]
    if steps:
        columns += [Column(f"CAM step {k}", f"cam{k}", _cam(s1.path, k, steps[:i], dataset))
                    for i, k in enumerate(steps)]
    else:
        columns.append(Column("CAM", "cam", lambda i: None, "not run" if not s1.ran else "no CAM yet"))
    columns += [
        Column("mined union", "union", lambda i: _mask(item(f1.regions, i)),
               "" if s1.ran else "not run"),
        Column("saliency", "saliency", lambda i: _grey(item(f2.saliency, i)),
               "" if s2.ran else "not run"),
        Column(f"fused ({rule})" if rule else "fused", "fused", lambda i: _mask(item(f2.fused, i)),
               "" if s2.ran else "not run"),
        Column(f"pseudo-mask ({crf})" if crf else "pseudo-mask", "pseudo",
               lambda i: _mask(item(f2.pseudo, i)), "" if s2.ran else "not run"),
        _gt_column(dataset, why_no_data),
    ]
    return columns


def val_columns(stages: dict[str, StageStatus], dataset: VOCDataset | None, why_no_data: str) -> list[Column]:
    columns = [_image_column(dataset, why_no_data)]
    for stage in stages.values():
        if layout.is_stage3(stage.name) and (stage.ran or stage.name == layout.STAGE3):
            columns.append(Column(f"prediction ({stage.name})", stage.name,
                                  lambda i, s=stage: _mask(item(Stage3Folder(s.path).pred(), i)),
                                  "" if stage.ran else "not run"))
    columns.append(_gt_column(dataset, why_no_data))
    return columns


def _image_column(dataset, why_no_data) -> Column:
    return Column("image", "image", lambda i: (dataset.image(i), False), "" if dataset else why_no_data)


def _gt_column(dataset, why_no_data) -> Column:
    def render(id_: str):
        return (colorize(dataset.mask(id_)), True) if dataset.has_mask(id_) else None
    return Column("ground truth", "gt", render, "" if dataset else why_no_data)


def image_rows(pictures: Pictures, part: str, ids: list[str], columns: list[Column],
               dataset: VOCDataset | None, problems: list[str]) -> list[tuple[str, str, list[Cell]]]:
    """(id, its class names, cells) for each sampled image; unreadable files become notes and problems."""
    rows = []
    for id_ in tqdm(ids, desc=f"report: {part} images", leave=False):
        cells = []
        for col in columns:
            if col.absent:
                cells.append(Cell(note=col.absent))
                continue
            try:
                picture = col.render(id_)
            except (OSError, ValueError, KeyError) as e:  # DatasetError is a ValueError
                problems.append(f"{part} {id_}, {col.title}: {e}")
                cells.append(Cell(note="unreadable"))
                continue
            if picture is None:
                cells.append(Cell(note="missing"))
            else:
                rgb, nearest = picture
                cells.append(Cell(src=pictures.panel(f"{part}/{id_}-{col.key}.png", rgb, nearest)))
        rows.append((id_, _label_names(dataset, id_), cells))
    return rows


def _label_names(dataset: VOCDataset | None, id_: str) -> str:
    if dataset is None:
        return ""
    try:
        names = [dataset.class_names[k] for k in dataset.label_ids(id_)]
    except (DatasetError, IndexError):
        return ""
    return ", ".join(names) or "no label"


# ---------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def iou_figure(result: dict, title: str):
    """Bars of the per-class IoU (percent) with the mIoU as a dashed line; 0/0 classes marked n/a."""
    plt = _pyplot()
    ious = result["iou"]
    names = result.get("class_names") or [str(i) for i in range(len(ious))]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(ious) + 2), 4))
    x = np.arange(len(ious))
    values = [0.0 if v is None else v for v in ious]
    colours = [tuple(c / 255 for c in io.PALETTE[i]) for i in range(len(ious))]
    ax.bar(x, values, color=colours, edgecolor="black", linewidth=0.5)
    for xi, v in zip(x, ious, strict=True):
        ax.text(xi, (v or 0) + 1, "n/a" if v is None else f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    if result.get("miou") is not None:
        ax.axhline(result["miou"], color="black", linestyle="--", linewidth=1)
        ax.text(len(ious) - 0.5, result["miou"] + 1, f"mIoU {result['miou']:.1f}", ha="right", fontsize=8)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("IoU (%)")
    ax.set_title(title)
    return fig


def confusion_figure(conf: np.ndarray, names, title: str):
    """The confusion matrix as a picture: each ground-truth row as percent of its pixels, at most ~1,300 px wide."""
    plt = _pyplot()
    n = len(names)
    rows = conf.sum(1, keepdims=True)
    share = np.divide(conf * 100.0, rows, out=np.zeros(conf.shape), where=rows > 0)
    size = min(12.5, 2.5 + 0.42 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    if n <= 25:
        for i, j in zip(*np.nonzero(share >= 0.5), strict=True):
            ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=6 if n > 12 else 8,
                    color="white" if share[i, j] > 60 else "black")
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the ground-truth class's pixels")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def curves_figure(sources: dict[str, list[dict]], title: str):
    """One subplot per logged quantity (loss, seg_loss, val_mAP, val_miou...), one line per training,
    and the loss every few iterations (the "iter" lines), where a net that dies shows the moment."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    iterations = {source: [r for r in records if "iter" in r] for source, records in sources.items()}
    sources = {source: [r for r in records if "iter" not in r] for source, records in sources.items()}
    keys = []
    for records in sources.values():
        for r in records:
            keys += [k for k, v in r.items() if k not in NOT_CURVES and k not in keys
                     and isinstance(v, (int, float)) and not isinstance(v, bool)]
    panels = len(keys) + any(iterations.values())
    cols = min(3, max(1, panels))
    rows = max(1, -(-panels // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    if any(iterations.values()):
        ax = list(axes.flat)[len(keys)]
        for source, records in iterations.items():
            if records:
                ax.plot([r["iter"] for r in records], [r["loss"] for r in records], linewidth=0.8, label=source)
        ax.set_title("loss per iteration")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax, key in zip(axes.flat, keys, strict=False):
        for source, records in sources.items():
            points = [(r["epoch"], r[key]) for r in records if key in r and "epoch" in r and r[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=source)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        epochs = sorted({r["epoch"] for records in sources.values() for r in records if key in r and "epoch" in r})
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- HTML

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1360px; }
img { max-width: 100%; }
.scroll { overflow-x: auto; max-width: 100%; }
h1 { margin-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; font-size: 13px; }
th { background: #f0f0f0; }
table.images td { padding: 2px; text-align: center; vertical-align: middle; }
table.images img { display: block; max-width: 128px; height: auto; }
td.note { color: #999; font-style: italic; min-width: 90px; }
.status-complete { color: #176f2c; } .status-unfinished { color: #b36b00; } .status-not-run { color: #999; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #666; margin: 0 3px 0 10px; }
.problems { background: #fff3f3; border: 1px solid #d99; padding: 0.5em 1em; }
code, .value { font-family: monospace; white-space: pre-wrap; overflow-wrap: anywhere; }
"""


def esc(value) -> str:
    return html.escape(str(value))


def img(src: str, alt: str) -> str:
    return f'<img src="{esc(quote(src))}" alt="{esc(alt)}">'


def _when(seconds_since_epoch) -> str:
    if not isinstance(seconds_since_epoch, (int, float)):
        return ""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds_since_epoch))


def _rounded(value):
    """Floats to 4 significant digits (inside lists and dicts too), for reading, not for computing."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _value(value, rounded: bool) -> str:
    text = value if isinstance(value, str) else json.dumps(_rounded(value) if rounded else value, sort_keys=True)
    return f'<span class="value">{esc(text)}</span>'


def key_value_table(mapping: dict, rounded: bool = False) -> str:
    """Keys and values (JSON), floats to 4 significant digits when `rounded` (figures, not configs)."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{_value(v, rounded)}</td></tr>" for k, v in mapping.items())
    return f"<table>{rows}</table>"


def status_html(stage: StageStatus) -> str:
    return f'<span class="status-{stage.status.replace(" ", "-")}">{esc(stage.status)}</span>'


def summary_table(stages: dict[str, StageStatus], evals: dict[str, dict]) -> str:
    rows = []
    for s in stages.values():
        m = s.manifest or {}
        score = evals.get(s.name, {}).get("miou")
        rows.append(f"<tr><td>{esc(s.name)}</td><td>{status_html(s)}</td><td>{esc(_when(m.get('finished')))}</td>"
                    f"<td>{esc(m.get('seconds', '') or '')}</td>"
                    f"<td>{'' if score is None else f'{score:.1f}'}</td></tr>")
    return ("<table><tr><th>stage</th><th>status</th><th>finished</th><th>seconds</th><th>val mIoU (%)</th></tr>"
            + "".join(rows) + "</table>")


def legend(dataset: VOCDataset | None) -> str:
    if dataset is None:
        return ""
    swatches = "".join(f'<span class="swatch" style="background:#{"".join(f"{c:02x}" for c in io.PALETTE[i])}">'
                       f"</span>{esc(name)}" for i, name in enumerate(dataset.class_names))
    return (f"<p>Masks: {swatches}<span class=\"swatch\" style=\"background:#ffffff\"></span>ignored (255). "
            "CAMs: blue low, red high; saliency: black low, white high.</p>")


def images_table(columns: list[Column], rows) -> str:
    head = "<tr><th>image id</th>" + "".join(f"<th>{esc(c.title)}</th>" for c in columns) + "</tr>"
    body = []
    for id_, labels, cells in rows:
        tds = "".join(f"<td>{img(c.src, c.src)}</td>" if c.src else f'<td class="note">{esc(c.note)}</td>'
                      for c in cells)
        body.append(f"<tr><th>{esc(id_)}<br><small>{esc(labels)}</small></th>{tds}</tr>")
    return f'<div class="scroll"><table class="images">{head}{"".join(body)}</table></div>'


def failures_section(stages: dict[str, StageStatus], val: VOCDataset | None, why_no_val: str, pictures: Pictures,
                     problems: list[str], worst: int) -> str:
    """For each stage-3 folder with val predictions: its worst images, confusion matrix and per-image scores."""
    parts = []
    for s in stages.values():
        if not layout.is_stage3(s.name) or not Stage3Folder(s.path).pred().is_dir():
            continue
        head = f"<h3>{esc(s.name)}</h3>"
        if val is None:
            parts.append(f'{head}<p class="status-not-run">{esc(why_no_val)}</p>')
            continue
        try:
            rows, conf = score_images(Stage3Folder(s.path).pred(), val)
        except (OSError, ValueError) as e:  # DatasetError and EvalError are ValueErrors
            problems.append(f"{s.name}, per-image scores: {e}")
            continue
        if not rows:
            parts.append(f'{head}<p class="status-not-run">no val image has both a ground truth and a prediction</p>')
            continue
        scores_src = pictures.data(f"scores-{s.name}.json", {"stage": s.name, "images": rows})
        matrix_src = pictures.figure(f"confusion-{s.name}.png",
                                     confusion_figure(conf, val.class_names, f"{s.name}: confusion matrix (val)"))
        columns = [_image_column(val, ""), Column(f"prediction ({s.name})", s.name,
                                                  lambda i, s=s: _mask(item(Stage3Folder(s.path).pred(), i))),
                   _gt_column(val, "")]
        by_id = {r["id"]: r for r in rows}
        table = [(id_, f"IoU {by_id[id_]['miou']} % · {labels}", cells) for id_, labels, cells in
                 image_rows(pictures, f"worst-{s.name}", [r["id"] for r in rows[:worst]], columns, val, problems)]
        ious = [r["miou"] for r in rows if r["miou"] is not None]
        median = f"{np.median(ious):.1f} %" if ious else "n/a"
        parts.append(f"{head}<p>{len(rows)} val images scored one by one (mIoU over the classes in the image's ground "
                     f"truth or prediction): median {median}, the {len(table)} worst below; every "
                     f'image\'s scores in <a href="{esc(quote(scores_src))}">{esc(scores_src)}</a>.</p>'
                     f"{images_table(columns, table)}{img(matrix_src, matrix_src)}")
    return "".join(parts) or '<p class="status-not-run">no stage-3 val predictions</p>'


def stage_section(stage: StageStatus) -> str:
    parts = [f"<h3>{esc(stage.name)}: {status_html(stage)}</h3>"]
    if not stage.ran:
        return parts[0]
    m = stage.manifest or {}
    if m:
        parts.append(f"<p>finished {esc(_when(m.get('finished')))}, {esc(m.get('seconds'))} s</p>")
    if m.get("outputs"):
        parts.append("<h4>figures (manifest)</h4>" + key_value_table(m["outputs"], rounded=True))
    if stage.config:
        parts.append("<details><summary>config</summary>" + key_value_table(stage.config) + "</details>")
    if m.get("versions"):
        parts.append(f"<p><small>{esc(', '.join(f'{k} {v}' for k, v in m['versions'].items()))}</small></p>")
    return "\n".join(parts)


# ---------------------------------------------------------------- the page

def build(run: Path, sample: int = 12, worst: int = 8) -> Path:
    """Write run/report.html and its pictures; return the page's path. Two reports of one run at
    once would remove each other's pictures: the run folder is locked for it (wsss.stage)."""
    from wsss.stage import lock, release

    if not run.is_dir():
        raise FileNotFoundError(f"{run}: run folder not found")
    lock(run, "the report")  # outputs/RUN/.lock: the stages lock their own folders
    try:
        return _build(run, sample, worst)
    finally:
        release(run)


def _build(run: Path, sample: int, worst: int) -> Path:
    stages = {name: read_stage(run, name) for name in stage_names(run)}
    pictures = Pictures(run)
    problems: list[str] = []
    train, why_no_train = dataset_of_stages(stages, "train_split")
    val, why_no_val = dataset_of_stages(stages, "val_split")

    folders = RunLayout(run)
    train_ids = sample_ids(train.ids if train else _artifact_ids(folders.stage2.pseudo, folders.stage1.regions),
                           sample)
    columns = train_columns(stages, train, why_no_train)
    train_html = images_table(columns, image_rows(pictures, "train", train_ids, columns, train, problems))

    val_ids = sample_ids(val.ids if val else _artifact_ids(folders.stage3().pred()), sample)
    columns = val_columns(stages, val, why_no_val)
    val_html = images_table(columns, image_rows(pictures, "val", val_ids, columns, val, problems))

    evals, score_parts = {}, []
    for s in stages.values():
        if not layout.is_stage3(s.name):
            continue
        # the default test-time flags' scores: gate off, or gate on in a run made before that default
        result = _read_json(s.path / layout.eval_file(layout.PRED_DEFAULT)) or _read_json(
            s.path / layout.eval_file(layout.PRED))
        if result and isinstance(result.get("iou"), list):
            evals[s.name] = result
            src = pictures.figure(f"iou-{s.name}.png", iou_figure(result, f"{run.name} {s.name}: per-class IoU (val)"))
            figures = {k: result.get(k) for k in ("miou", "pixel_acc", "mean_class_acc", "fwiou", "num_images")}
            score_parts.append(f"<h3>{esc(s.name)}</h3>{img(src, src)}"
                               + key_value_table({k: v for k, v in figures.items() if v is not None}, rounded=True))
        elif s.ran or s.name == layout.STAGE3:
            note = "not run" if not s.ran else "no eval.json (not finished, or val has no ground truth)"
            score_parts.append(f"<h3>{esc(s.name)}</h3><p class=\"status-not-run\">{esc(note)}</p>")

    failures_html = failures_section(stages, val, why_no_val, pictures, problems, worst)

    curve_parts = []
    metrics = read_run_metrics(run)
    for s in stages.values():
        if s.name in metrics:
            src = pictures.figure(f"curves-{s.name}.png",
                                  curves_figure(metrics[s.name], f"{run.name} {s.name}: training curves"))
            curve_parts.append(f"<h3>{esc(s.name)}</h3>{img(src, src)}")
        elif s.name in (layout.STAGE1, layout.STAGE3):
            note = "not run" if not s.ran else "no metrics.jsonl yet"
            curve_parts.append(f"<h3>{esc(s.name)}</h3><p class=\"status-not-run\">{note}</p>")

    for p in problems:
        log.warning("%s", p)
    problems_html = ("<div class=\"problems\"><b>Problems</b><ul>"
                     + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul></div>") if problems else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>wsss report: {esc(run.name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>wsss run <code>{esc(run.name)}</code></h1>
<p>Generated {esc(_when(time.time()))} from <code>{esc(run)}</code>.</p>
{summary_table(stages, evals)}
{problems_html}
<h2>Validation scores</h2>
{"".join(score_parts)}
<h2>Where stage 3 fails (val)</h2>
{failures_html}
<h2>Training curves</h2>
{"".join(curve_parts)}
<h2>Training images: stages 1 and 2</h2>
{legend(train or val)}
{train_html if train_ids else "<p>no training images to show</p>"}
<h2>Validation images: stage 3</h2>
{val_html if val_ids else "<p>no validation images to show</p>"}
<h2>Stages</h2>
{"".join(stage_section(s) for s in stages.values())}
</body></html>
"""
    path = run / PAGE
    io.write_bytes(path, page.encode())
    pictures.remove_stale(path)
    return path


def _artifact_ids(*folders: Path) -> list[str]:
    """Image ids from the first folder of per-image PNGs that has any (when the dataset is unreadable)."""
    for folder in folders:
        ids = sorted(p.stem for p in folder.glob("*.png"))
        if ids:
            return ids
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write outputs/RUN/report.html: a static page of a run's artifacts.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="demo", type=safe_name, help="run name")
    p.add_argument("--outputs", type=Path, default=Path("outputs"), help="folder holding all runs")
    p.add_argument("--sample", type=int, default=12, help="training images and val images shown")
    p.add_argument("--worst", type=int, default=8, help="worst val images (per-image IoU) shown per stage-3 folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        path = build(args.outputs / args.run, args.sample, args.worst)
    except (FileNotFoundError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
