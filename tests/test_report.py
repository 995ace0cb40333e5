"""The run report: built from a fake run's artifacts, every picture it references exists."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from PIL import Image

from wsss import io, layout
from wsss.data.voc import VOCDataset
from wsss.layout import RunLayout, item
from wsss.report import build, main, read_run_metrics


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(unquote(dict(attrs)["src"]))


def img_srcs(page: Path) -> list[str]:
    parser = Images()
    parser.feed(page.read_text())
    return parser.srcs


def write_metrics(folder: Path, records: list[dict]) -> None:
    io.write_bytes(folder / layout.METRICS, "".join(json.dumps(r) + "\n" for r in records).encode())


def fake_run(run: Path, data: Path, stages=layout.STAGES) -> Path:
    """The artifacts of a run over `data` (tiny_voc), for the stages named, as the stages lay them out."""
    train, val = VOCDataset(data, "train"), VOCDataset(data, "val")
    config = {"data": str(data), "train_split": "train", "val_split": "val", "seed": 0}
    rng = np.random.default_rng(0)
    folders = RunLayout(run)
    if layout.STAGE1 in stages:
        s1 = folders.stage1
        for k in (1, 2):
            write_metrics(s1.step(k), [{"epoch": e, "loss": 0.5 / e, "val_mAP": 0.5 + 0.1 * e, "seconds": 1.0}
                                            for e in (1, 2, 3)])
        for id_ in train.ids:
            h, w = train.image(id_).shape[:2]
            keys = train.label_ids(id_)
            masks = []
            for k in (1, 2):
                cam = rng.random((len(keys), h, w)).astype(np.float16)
                io.write_npz(item(s1.cams(k), id_, ".npz"), cam=cam, keys=keys)
                region = np.where(cam[0] > 0.8, keys[0], 0).astype(np.uint8)
                io.write_mask(item(s1.step_regions(k), id_), region)
                masks.append(cam > 0.8)
            union = np.any(masks, axis=0)
            io.write_npz(item(s1.regions, id_, ".npz"), keys=keys, masks=union, score=cam)
            io.write_mask(item(s1.regions, id_), np.where(union[0], keys[0], 0).astype(np.uint8))
        io.write_json(s1.path / layout.CONFIG, config)
        io.write_manifest(s1.path, config, outputs={"steps_done": 2, "union_coverage": 0.3})
    if layout.STAGE2 in stages:
        s2 = folders.stage2
        for id_ in train.ids:
            gt = train.mask(id_)
            io.write_png(item(s2.saliency, id_), ((gt > 0) * 200).astype(np.uint8))
            io.write_mask(item(s2.fused, id_), gt)
            io.write_mask(item(s2.pseudo, id_), gt)
        io.write_json(s2.path / layout.CONFIG, config)
        io.write_manifest(s2.path, config, outputs={"pseudo": {"miou_labelled": 80.0}})
    if layout.STAGE3 in stages:
        s3 = folders.stage3()
        records = [{"epoch": e, "loss": 1.0 / e, "seg_loss": 0.8 / e, "val_miou": 30.0 + e, "seconds": 2.0}
                   for e in (1, 2)]
        write_metrics(s3.net("psl"), records)
        write_metrics(s3.path, [{"net": "psl", **r} for r in records])
        for id_ in val.ids:
            io.write_mask(item(s3.pred(), id_), val.mask(id_))
        io.write_json(s3.path / layout.eval_file(layout.PRED),
                      {"miou": 55.0, "pixel_acc": 90.0, "iou": [90.0, 60.0, None, 15.0],
                       "class_names": list(train.class_names), "num_images": 2})
        io.write_json(s3.path / layout.CONFIG, {**config, "method": "psl"})
        io.write_manifest(s3.path, {**config, "method": "psl"}, outputs={"val_miou": 55.0})
    return run


def test_report_of_a_full_run_references_only_existing_pictures(tmp_path, tiny_voc):
    run = fake_run(tmp_path / "outputs" / "demo", tiny_voc)
    page = build(run, sample=3)
    assert page == run / "report.html"
    srcs = img_srcs(page)
    assert srcs, "the report shows no picture"
    for src in srcs:
        assert not Path(src).is_absolute() and (page.parent / src).is_file(), src
    assert {"report/iou-stage3.png", "report/curves-stage1.png", "report/curves-stage3.png"} <= set(srcs)
    text = page.read_text()
    assert "not run" not in text
    for column in ("CAM step 1", "CAM step 2", "mined union", "saliency", "fused (mined-first)", "pseudo-mask (CRF)",
                   "ground truth", "prediction (stage3)"):
        assert f"<th>{column}</th>" in text
    assert sum(s.startswith("report/train/") for s in srcs) == 3 * 8  # 3 images x 8 panels
    assert sum(s.startswith("report/val/") for s in srcs) == 2 * 3  # the 2 val images x 3 panels


def test_the_pseudo_mask_columns_name_the_fusion_rule_and_crf(tmp_path, tiny_voc):
    run = fake_run(tmp_path / "outputs" / "demo", tiny_voc, stages=("stage1", "stage2"))
    config = {**io.read_json(run / "stage2" / "config.json"), "fusion": "saliency-first", "crf": False}
    io.write_json(run / "stage2" / "config.json", config)
    io.write_manifest(run / "stage2", config, outputs={"fusion": "saliency-first"})
    text = build(run, sample=1).read_text()
    assert "<th>fused (saliency-first)</th>" in text and "<th>pseudo-mask (no CRF)</th>" in text


def test_partial_run_shows_missing_stages_as_not_run(tmp_path, tiny_voc):
    run = fake_run(tmp_path / "outputs" / "demo", tiny_voc, stages=("stage1",))
    page = build(run, sample=2)
    text = page.read_text()
    assert text.count("not run") >= 5  # saliency, fused, pseudo, prediction, scores, stage sections
    assert '<span class="status-not-run">not run</span></h3>' in text  # stage2 and stage3 sections
    srcs = img_srcs(page)
    assert "report/curves-stage1.png" in srcs and not any("iou" in s for s in srcs)
    for src in srcs:
        assert (page.parent / src).is_file(), src


def test_rebuild_removes_pictures_no_longer_referenced(tmp_path, tiny_voc):
    run = fake_run(tmp_path / "outputs" / "demo", tiny_voc)
    build(run, sample=4)
    page = build(run, sample=1)
    on_disk = {p.relative_to(run).as_posix() for p in (run / "report").rglob("*") if p.is_file()}
    assert on_disk == set(img_srcs(page)) | {"report/scores-stage3.json"}


def test_stage3_gathered_metrics_are_not_drawn_twice(tmp_path, tiny_voc):
    run = fake_run(tmp_path / "outputs" / "demo", tiny_voc)
    metrics = read_run_metrics(run)
    assert list(metrics) == ["stage1", "stage3"]
    assert list(metrics["stage1"]) == ["stage1/step1", "stage1/step2"]
    assert list(metrics["stage3"]) == ["stage3/psl"]


def test_command_line(tmp_path, tiny_voc, capsys):
    fake_run(tmp_path / "outputs" / "demo", tiny_voc, stages=("stage1", "stage2"))
    assert main(["--run", "demo", "--outputs", str(tmp_path / "outputs"), "--sample", "1"]) == 0
    assert "report.html" in capsys.readouterr().out
    assert main(["--run", "nothing", "--outputs", str(tmp_path / "outputs")]) == 1


def test_report_without_the_dataset_still_renders(tmp_path, tiny_voc):
    run = fake_run(tmp_path / "outputs" / "demo", tiny_voc)
    for path in (run / "stage1" / "config.json", run / "stage1" / io.MANIFEST):
        content = io.read_json(path)
        (content.get("config", content))["data"] = str(tmp_path / "gone")
        io.write_json(path, content)
    for stage in ("stage2", "stage3"):
        (run / stage / "config.json").unlink()
        (run / stage / io.MANIFEST).unlink()
    page = build(run, sample=2)
    text = page.read_text()
    assert "dataset not readable" in text
    for src in img_srcs(page):
        assert (page.parent / src).is_file(), src


def test_check_report_probe_page_resolves_pictures_against_the_run(tmp_path, tiny_voc):
    from bench.check_report import instrumented, parse

    run = fake_run(tmp_path / "outputs" / "demo", tiny_voc, stages=("stage1",))
    page = build(run, sample=1)
    probe = instrumented(page.read_text(), run)
    assert f'<base href="{run.resolve().as_uri()}/">' in probe and 'id = "img-status"' in probe
    assert parse(probe).srcs == img_srcs(page)
    status = parse('<div id="img-status" data-total="2" data-loaded="1" data-broken="[&quot;a b.png&quot;]">').status
    assert json.loads(status["data-broken"]) == ["a b.png"]


def test_unreadable_artifact_is_named_in_the_report(tmp_path, tiny_voc):
    run = fake_run(tmp_path / "outputs" / "demo", tiny_voc, stages=("stage1",))
    bad = run / "stage1" / "step2" / "cam" / "tiny_000.npz"
    bad.write_bytes(b"not a zip file")
    text = build(run, sample=4).read_text()
    assert "unreadable" in text and f"{bad}: cannot read CAM file" in text


def test_worst_val_images_confusion_matrix_and_per_image_scores(tmp_path, tiny_voc):
    run = fake_run(tmp_path / "outputs" / "demo", tiny_voc)
    val = VOCDataset(tiny_voc, "val")
    good, bad = val.ids
    io.write_mask(run / "stage3" / "pred" / f"{bad}.png", np.zeros_like(val.mask(bad)))  # all background
    page = build(run, sample=2, worst=1)
    scores = io.read_json(run / "report" / "scores-stage3.json")["images"]
    assert [r["id"] for r in scores] == [bad, good]  # worst first
    gt = val.mask(bad)
    fg = int(((gt > 0) & (gt < 255)).sum())
    bg_iou = (gt == 0).sum() / ((gt == 0).sum() + fg)  # the object classes score 0
    classes = np.unique(gt[gt < 255])
    assert scores[0]["miou"] == round(bg_iou * 100 / len(classes), 2) and scores[0]["pred"] == ["background"]
    assert scores[1]["miou"] == 100.0 and scores[1]["pixel_acc"] == 100.0
    srcs = img_srcs(page)
    assert "report/confusion-stage3.png" in srcs
    worst = [s for s in srcs if s.startswith("report/worst-stage3/")]
    assert worst == [f"report/worst-stage3/{bad}-{k}.png" for k in ("image", "stage3", "gt")]  # only the worst
    assert f"IoU {scores[0]['miou']} %" in page.read_text()


def test_report_tables_fit_a_1400_px_window(tmp_path, tiny_voc):
    """No picture wider than the window (the confusion matrix of many classes included); image tables scroll."""
    from PIL import Image

    page = build(fake_run(tmp_path / "outputs" / "demo", tiny_voc), sample=2)
    for src in img_srcs(page):
        assert Image.open(page.parent / src).width <= 1400, src
    assert '<div class="scroll"><table class="images">' in page.read_text()  # anything wider scrolls in its box


def test_rebuild_keeps_a_users_own_pictures_in_the_report_folder(tmp_path, tiny_voc):
    run = fake_run(tmp_path / "outputs" / "demo", tiny_voc)
    build(run, sample=4)
    mine = run / "report" / "my-annotated-figure.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(mine)
    (run / "report" / "drafts").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(run / "report" / "drafts" / "d.png")
    page = build(run, sample=1)
    assert mine.is_file() and (run / "report" / "drafts" / "d.png").is_file()
    on_disk = {p.relative_to(run).as_posix() for p in (run / "report").rglob("*.png")}
    assert on_disk == set(img_srcs(page)) | {"report/my-annotated-figure.png", "report/drafts/d.png"}
