import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss import eval as ev
from wsss.io import read_mask, write_json, write_mask, write_npz

VOC = Path(__file__).resolve().parents[2] / "shared" / "voc12"

GT = np.array([[0, 0, 1],
               [1, 255, 2]], dtype=np.uint8)
PRED = np.array([[0, 1, 1],
                 [1, 0, 0]], dtype=np.uint8)
# valid pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,0); the 255 pixel is not counted
CONF = np.array([[1, 1, 0],
                 [0, 2, 0],
                 [1, 0, 0]])


def write_plain(path, mask):
    Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").save(path)


def make_folder(folder, masks: dict, palette=True):
    folder.mkdir(parents=True, exist_ok=True)
    for id_, mask in masks.items():
        (write_mask if palette else write_plain)(folder / f"{id_}.png", mask)
    return folder


# ---------------------------------------------------------------- confusion matrix and formulas

def test_confusion_matrix_by_hand_ignores_gt_255():
    assert np.array_equal(ev.confusion_matrix(GT, PRED, 3), CONF)


def test_scores_formulas_by_hand():
    s = ev.scores(CONF)
    # IoU = TP / (TP + FP + FN): bg 1/(1+1+1), class 1 2/(2+1+0), class 2 0/(0+0+1)
    assert s["iou"] == pytest.approx([100 / 3, 200 / 3, 0])
    assert s["miou"] == pytest.approx(100 / 3)
    assert s["pixel_acc"] == pytest.approx(60)  # 3 of 5
    assert s["class_acc"] == pytest.approx([50, 100, 0])
    assert s["mean_class_acc"] == pytest.approx(50)
    assert s["fwiou"] == pytest.approx(100 * (2 / 5 * 1 / 3 + 2 / 5 * 2 / 3 + 1 / 5 * 0))
    assert s["pixels"] == 5


def test_class_absent_from_gt_and_prediction_is_left_out_of_the_mean():
    s = ev.scores(ev.confusion_matrix(GT, PRED, 4))
    assert s["iou"][3] is None and s["class_acc"][3] is None
    assert s["miou"] == pytest.approx(100 / 3)


def test_class_predicted_but_absent_from_gt_counts_as_zero():
    pred = PRED.copy()
    pred[0, 0] = 3
    s = ev.scores(ev.confusion_matrix(GT, pred, 4))
    assert s["iou"][3] == 0
    assert s["iou"][0] == pytest.approx(0)  # bg: TP 0, FP 1, FN 2
    assert s["miou"] == pytest.approx((0 + 200 / 3 + 0 + 0) / 4)
    assert s["class_acc"][3] is None  # no GT pixel of class 3


def test_perfect_prediction_is_100():
    pred = GT.copy()
    pred[GT == 255] = 0  # anything may stand where the GT is ignored
    s = ev.scores(ev.confusion_matrix(GT, pred, 3))
    assert s["miou"] == s["pixel_acc"] == s["mean_class_acc"] == s["fwiou"] == 100


def test_all_background_prediction():
    gt = np.zeros((10, 10), np.uint8)
    gt[:3] = 1  # 30 px class 1
    gt[9, :5] = 2  # 5 px class 2
    s = ev.scores(ev.confusion_matrix(gt, np.zeros_like(gt), 3))
    assert s["iou"] == pytest.approx([100 * 65 / 100, 0, 0])
    assert s["miou"] == pytest.approx(65 / 3)
    assert s["pixel_acc"] == pytest.approx(65)
    assert s["fwiou"] == pytest.approx(65 * 0.65)


def test_empty_matrix_gives_no_scores():
    s = ev.scores(np.zeros((3, 3), int))
    assert s["miou"] is None and s["pixel_acc"] is None and s["fwiou"] is None


def test_ignore_pred_leaves_unlabelled_pixels_out():
    pred = PRED.copy()
    pred[0, 1] = 255  # the bg pixel wrongly called 1 is now unlabelled
    conf = ev.confusion_matrix(GT, pred, 3, ignore_pred=True)
    assert np.array_equal(conf, [[1, 0, 0], [0, 2, 0], [1, 0, 0]])


def test_bad_values_and_shapes_are_errors():
    with pytest.raises(ev.EvalError, match=r"\[3\] outside 0..2"):
        ev.confusion_matrix(GT, np.full_like(GT, 3), 3)
    with pytest.raises(ev.EvalError, match="label ids \\[7\\]"):
        ev.confusion_matrix(np.full_like(GT, 7), PRED, 3)
    with pytest.raises(ev.EvalError, match="--ignore-pred"):
        ev.confusion_matrix(GT, np.full_like(GT, 255), 3)
    with pytest.raises(ev.EvalError, match="shape"):
        ev.confusion_matrix(GT, PRED[:, :2], 3)
    # 255 where the GT is 255 too is fine: a GT folder scores as a prediction
    assert ev.scores(ev.confusion_matrix(GT, GT, 3))["miou"] == 100


# ---------------------------------------------------------------- folders of PNGs

def random_set(n, rng, num_classes=4, size=(7, 9)):
    gts, preds = {}, {}
    for k in range(n):
        gt = rng.integers(0, num_classes, size).astype(np.uint8)
        gt[rng.random(size) < 0.1] = 255
        gts[f"im{k:03d}"] = gt
        preds[f"im{k:03d}"] = rng.integers(0, num_classes, size).astype(np.uint8)
    return gts, preds


def naive_iou(gts, preds, num_classes):
    """The per-class boolean-mask way, as a reference."""
    tp, fp, fn = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for id_, gt in gts.items():
        valid = gt != 255
        for c in range(num_classes):
            tp[c] += np.sum((gt == c) & (preds[id_] == c) & valid)
            fp[c] += np.sum((gt != c) & (preds[id_] == c) & valid)
            fn[c] += np.sum((gt == c) & (preds[id_] != c) & valid)
    return 100 * tp / (tp + fp + fn)


def test_evaluate_accumulates_one_matrix_over_chunks_and_threads(tmp_path):
    gts, preds = random_set(75, np.random.default_rng(0))  # > 2 chunks
    gt_dir, pred_dir = make_folder(tmp_path / "gt", gts), make_folder(tmp_path / "pred", preds)
    result = ev.evaluate(pred_dir, gt_dir, list(gts), 4, workers=2)
    expected = sum(ev.confusion_matrix(gts[i], preds[i], 4) for i in gts)
    assert np.array_equal(result["confusion"], expected)
    assert result["iou"] == pytest.approx(naive_iou(gts, preds, 4))
    assert result["num_images"] == 75 and result["missing"] == 0


def test_palette_and_plain_predictions_score_the_same(tmp_path):
    gts, preds = random_set(5, np.random.default_rng(1))
    gt_dir = make_folder(tmp_path / "gt", gts)
    palette = ev.evaluate(make_folder(tmp_path / "p", preds), gt_dir, list(gts), 4)
    plain = ev.evaluate(make_folder(tmp_path / "g", preds, palette=False), gt_dir, list(gts), 4)
    assert Image.open(tmp_path / "p" / "im000.png").mode == "P"
    assert Image.open(tmp_path / "g" / "im000.png").mode == "L"
    assert palette["confusion"] == plain["confusion"] and palette["miou"] == plain["miou"]


def test_missing_predictions_are_listed_or_counted_as_background(tmp_path):
    gts, preds = random_set(8, np.random.default_rng(2))
    gt_dir = make_folder(tmp_path / "gt", gts)
    ids = list(gts)
    missing = ids[1:8]
    pred_dir = make_folder(tmp_path / "pred", {i: preds[i] for i in ids if i not in missing})
    with pytest.raises(ev.EvalError) as err:
        ev.evaluate(pred_dir, gt_dir, ids, 4)
    message = str(err.value)
    assert "7 of 8 predictions missing" in message and "--allow-missing" in message
    assert all(i in message for i in missing[:5]) and missing[5] not in message

    result = ev.evaluate(pred_dir, gt_dir, ids, 4, allow_missing=True)
    as_background = {i: (np.zeros_like(gts[i]) if i in missing else preds[i]) for i in ids}
    expected = sum(ev.confusion_matrix(gts[i], as_background[i], 4) for i in ids)
    assert np.array_equal(result["confusion"], expected) and result["missing"] == 7


def test_missing_ground_truth_is_always_an_error(tmp_path):
    gt_dir = make_folder(tmp_path / "gt", {"a": GT})
    pred_dir = make_folder(tmp_path / "pred", {"a": PRED, "b": PRED})
    with pytest.raises(ev.EvalError, match=r"gt: 1 of 2 ground-truth masks missing \(b\)$"):
        ev.evaluate(pred_dir, gt_dir, ["a", "b"], 3, allow_missing=True)
    with pytest.raises(ev.EvalError, match="empty"):
        ev.evaluate(pred_dir, gt_dir, [], 3)


def test_size_mismatch_names_the_file(tmp_path):
    gt_dir = make_folder(tmp_path / "gt", {"a": GT})
    pred_dir = make_folder(tmp_path / "pred", {"a": np.zeros((3, 2), np.uint8)})
    with pytest.raises(ev.EvalError, match=r"pred/a.png: prediction is 2x3 but its ground truth .* is 3x2"):
        ev.evaluate(pred_dir, gt_dir, ["a"], 3)


def test_out_of_range_prediction_names_the_file(tmp_path):
    gt_dir = make_folder(tmp_path / "gt", {"a": GT})
    pred_dir = make_folder(tmp_path / "pred", {"a": np.full_like(GT, 9)})
    with pytest.raises(ev.EvalError, match=r"pred/a.png: prediction has label ids \[9\]"):
        ev.evaluate(pred_dir, gt_dir, ["a"], 3)


def test_ignore_pred_counts_unlabelled_as_background_and_reports_labelled_only_beside(tmp_path):
    gt = np.array([[0, 0, 1, 1], [1, 1, 255, 255]], np.uint8)  # 6 valid pixels
    pseudo = np.array([[0, 255, 1, 255], [1, 1, 255, 0]], np.uint8)  # 2 valid pixels unlabelled
    gt_dir, pred_dir = make_folder(tmp_path / "gt", {"a": gt}), make_folder(tmp_path / "ps", {"a": pseudo})
    with pytest.raises(ev.EvalError, match="ps/a.png: .*2 pixels .* unlabelled"):
        ev.evaluate(pred_dir, gt_dir, ["a"], 2)
    result = ev.evaluate(pred_dir, gt_dir, ["a"], 2, ignore_pred=True)
    assert result["ignored"] == pytest.approx(100 * 2 / 6)
    # headline (IRN/SEAM): the unlabelled bg pixel is right, the unlabelled class-1 pixel is called bg
    assert result["confusion"] == [[2, 0], [1, 3]]
    assert result["iou"] == pytest.approx([100 * 2 / 3, 100 * 3 / 4])
    assert result["miou"] == pytest.approx(100 * (2 / 3 + 3 / 4) / 2)
    # over labelled pixels only: [[1, 0], [0, 3]], perfect
    assert result["labelled"]["miou"] == 100 and result["labelled"]["pixel_acc"] == 100
    assert "over labelled pixels only: mIoU 100.00, 33.33% of valid pixels unlabelled" in ev.format_table(result)


# ---------------------------------------------------------------- CAM sweep

def irn_style_sweep(cams, gts, thresholds, num_classes):
    """Reference: per threshold, pad a constant background plane and take the argmax."""
    out = []
    for t in thresholds:
        conf = 0
        for id_, gt in gts.items():
            cam, keys = cams[id_]
            scored = np.concatenate([np.full((1,) + gt.shape, t), cam.astype(np.float64)])
            pred = np.concatenate([[0], keys])[scored.argmax(axis=0)]
            conf = conf + ev.confusion_matrix(gt, pred, num_classes)
        out.append(ev.scores(conf)["miou"])
    return out


def write_cams(folder, cams):
    for id_, (cam, keys) in cams.items():
        write_npz(folder / f"{id_}.npz", cam=cam.astype(np.float16), keys=np.asarray(keys, np.int64))


def test_cam_sweep_picks_the_threshold_that_separates_object_from_background(tmp_path):
    gt = np.array([[1, 1, 1, 0, 0, 0],
                   [2, 2, 0, 0, 0, 255]], np.uint8)
    cam = np.zeros((2, 2, 6), np.float32)
    cam[0, 0] = [0.625, 0.5625, 0.53125, 0.46875, 0.4375, 0.25]  # class 1 peaks above 0.5 on its pixels only
    cam[1, 1] = [0.75, 0.5625, 0.4375, 0.25, 0.125, 0.9]
    gt_dir = make_folder(tmp_path / "gt", {"a": gt})
    write_cams(tmp_path / "cam", {"a": (cam, [1, 2])})
    result = ev.evaluate_cams(tmp_path / "cam", gt_dir, ["a"], 3)
    assert result["best_threshold"] == 0.5 and result["miou"] == 100
    by_t = {s["threshold"]: s["miou"] for s in result["sweep"]}
    # t = 0.45: the bg pixel at 0.46875 becomes class 1: IoU bg 5/6, class 1 3/4, class 2 1
    assert by_t[0.45] == pytest.approx(100 * (5 / 6 + 3 / 4 + 1) / 3)
    assert len(result["sweep"]) == 19


def test_cam_sweep_matches_per_threshold_argmax_and_ties_go_to_background(tmp_path):
    rng = np.random.default_rng(3)
    gts, cams = {}, {}
    for k in range(40):
        gt = rng.integers(0, 4, (6, 5)).astype(np.uint8)
        gt[0, 0] = 255
        keys = rng.choice([1, 2, 3], size=rng.integers(0, 4), replace=False)
        cam = (rng.integers(0, 21, (keys.size, 6, 5)) / 20).astype(np.float16)  # hits thresholds exactly
        gts[f"i{k}"], cams[f"i{k}"] = gt, (cam, keys)
    gt_dir = make_folder(tmp_path / "gt", gts)
    write_cams(tmp_path / "cam", cams)
    thresholds = [0.1, 0.25, 0.5, 0.6, 0.8]
    result = ev.evaluate_cams(tmp_path / "cam", gt_dir, list(gts), 4, thresholds=thresholds, workers=2)
    ref = irn_style_sweep(cams, gts, thresholds, 4)  # 0.25 and 0.5 are hit exactly by some CAM values
    assert [s["miou"] for s in result["sweep"]] == pytest.approx(ref)
    assert result["best_threshold"] == thresholds[int(np.argmax(ref))]


def test_cam_errors(tmp_path):
    gt_dir = make_folder(tmp_path / "gt", {"a": GT, "b": GT})
    write_cams(tmp_path / "cam", {"a": (np.zeros((1, 2, 3)), [1])})
    with pytest.raises(ev.EvalError, match="1 of 2 CAM files missing \\(b\\)"):
        ev.evaluate_cams(tmp_path / "cam", gt_dir, ["a", "b"], 3)
    result = ev.evaluate_cams(tmp_path / "cam", gt_dir, ["a", "b"], 3, allow_missing=True)
    assert result["missing"] == 1 and result["iou"][0] == pytest.approx(100 * 2 / 5)
    write_cams(tmp_path / "bad", {"a": (np.zeros((1, 3, 2)), [1])})
    with pytest.raises(ev.EvalError, match="bad/a.npz: map size 2x3 differs from the image size 3x2"):
        ev.evaluate_cams(tmp_path / "bad", gt_dir, ["a"], 3)
    write_cams(tmp_path / "keys", {"a": (np.zeros((1, 2, 3)), [3])})
    with pytest.raises(ev.EvalError, match="keys/a.npz: keys \\[3\\] outside 1..2"):
        ev.evaluate_cams(tmp_path / "keys", gt_dir, ["a"], 3)


# ---------------------------------------------------------------- command line

def tiny_dataset(root, rng):
    gts, preds = random_set(6, rng, num_classes=3)
    make_folder(root / "SegmentationClass", gts)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(gts) + "\n")
    (root / "class_names.txt").write_text("background\ncircle\nsquare\n")
    return gts, preds


def test_main_end_to_end_on_a_tiny_dataset(tmp_path, capsys):
    gts, preds = tiny_dataset(tmp_path / "data", np.random.default_rng(4))
    make_folder(tmp_path / "pred", preds)
    rc = ev.main(["--pred", str(tmp_path / "pred"), "--data", str(tmp_path / "data"),
                  "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "square" in out and "mIoU" in out and "FWIoU" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["class_names"] == ["background", "circle", "square"]
    assert saved["iou"] == pytest.approx(naive_iou(gts, preds, 3))

    (tmp_path / "pred" / "im002.png").unlink()
    rc = ev.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "data" / "SegmentationClass"),
                  "--ids", "im000", "im001", "im002", "--num-classes", "3"])
    assert rc == 1 and "1 of 3 predictions missing (im002)" in capsys.readouterr().err


def test_main_run_shortcut_for_each_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gts, preds = tiny_dataset(tmp_path / "data", np.random.default_rng(5))
    run = tmp_path / "outputs" / "r"
    config = {"data": "data", "train_split": "train", "val_split": "val"}
    for stage in ("stage1", "stage2", "stage3"):
        write_json(run / stage / "config.json", config)
    make_folder(run / "stage3" / "pred", gts)
    pseudo = {i: np.where(np.arange(m.size).reshape(m.shape) % 3 == 0, 255, m).astype(np.uint8)
              for i, m in gts.items()}
    make_folder(run / "stage2" / "pseudo", pseudo)
    make_folder(run / "stage1" / "step1" / "regions", preds)
    make_folder(run / "stage1" / "regions", gts)
    write_cams(run / "stage1" / "step1" / "cam",
               {i: ((m == 1)[None] * 0.7, [1]) for i, m in gts.items()})
    for i, m in gts.items():  # the union's max CAM over steps: class 1 0.3 on its pixels, 0.2 elsewhere
        score = np.stack([np.where(m == 1, 0.3, 0.2), (m == 2) * 0.6]).astype(np.float16)
        write_npz(run / "stage1" / "regions" / f"{i}.npz", keys=np.array([1, 2]), masks=score > 0, score=score)

    assert ev.main(["--run", "r"]) == 0
    assert json.loads((run / "stage3" / "eval.json").read_text())["miou"] == 100

    assert ev.main(["--run", "r", "--stage", "stage2", "--json", "s2.json"]) == 0
    s2 = json.loads(Path("s2.json").read_text())
    assert s2["labelled"]["miou"] == 100 and 0 < s2["ignored"] < 50 and s2["miou"] < 100
    assert s2["split"] == "train"

    assert ev.main(["--run", "r", "--stage", "stage1"]) == 0
    s1 = json.loads((run / "stage1" / "eval.json").read_text())
    assert set(s1) == {"step1_regions", "union_regions", "cam_sweep", "union_sweep"}
    assert s1["union_regions"]["miou"] == 100
    assert s1["cam_sweep"]["iou"][1] == 100 and s1["cam_sweep"]["best_threshold"] == 0.05
    assert s1["union_sweep"]["miou"] == 100 and s1["union_sweep"]["best_threshold"] == 0.2
    out = capsys.readouterr().out
    assert "best threshold 0.05" in out and "union of steps" in out and "max over the erasing steps" in out

    assert ev.main(["--run", "nope"]) == 1
    assert "outputs/nope/stage3/config.json: not found" in capsys.readouterr().err


def test_run_seeds_and_pseudo_masks_are_scored_on_voc_train_when_the_run_trained_on_more(tmp_path, capsys,
                                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(6)
    gts, _ = random_set(6, rng, num_classes=3)
    make_folder(tmp_path / "data" / "SegmentationClassAug", gts)
    lists = tmp_path / "data" / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    ids = sorted(gts)
    (lists / "train_aug.txt").write_text("\n".join(ids[:5]) + "\n")  # the run's split: 5 images
    (lists / "train.txt").write_text("\n".join(ids[:2] + ids[5:]) + "\n")  # VOC train: 2 of them + 1 outside
    run = tmp_path / "outputs" / "r" / "stage2"
    write_json(run / "config.json", {"data": "data", "train_split": "train_aug", "val_split": "val"})
    pseudo = {i: gts[i] for i in ids[:5]}  # artifacts exist for the run's images only
    pseudo[ids[0]] = np.where(gts[ids[0]] == 1, 255, gts[ids[0]]).astype(np.uint8)
    make_folder(run / "pseudo", pseudo)

    assert ev.main(["--run", "r", "--stage", "stage2", "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "scoring 2 images: split 'train' (the IRN/SEAM protocol, the 2 of its 3 in the run's split)" in out
    assert "the run trained on 'train_aug'" in out
    result = json.loads((run / "eval.json").read_text())
    assert result["num_images"] == 2 and result["split"] == "train" and result["labelled"]["miou"] == 100
    assert result["miou"] < 100 and result["ignored"] > 0

    (lists / "train.txt").unlink()  # no separate train list: the run's own split
    assert ev.main(["--run", "r", "--stage", "stage2", "--num-classes", "3"]) == 0
    assert "scoring 5 images: the run's split 'train_aug': the dataset has no separate 'train' list" in (
        capsys.readouterr().out)
    assert json.loads((run / "eval.json").read_text())["split"] == "train_aug"


def test_class_names_match_the_data_layer(tmp_path):
    from wsss.data import voc

    assert ev.VOC_CLASSES == voc.VOC_CLASSES
    (tmp_path / "class_names.txt").write_text("background\n a \n\nb\n")
    assert tuple(ev.read_class_names(tmp_path)) == voc.class_names(tmp_path)


def test_import_stays_light():
    code = "import sys, wsss.eval; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tqdm', 'scipy'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- real VOC val masks

def val_subset(n=100):
    if not (VOC / "SegmentationClassAug").is_dir():
        pytest.skip(f"{VOC} not present")
    return (VOC / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:n]


def test_real_gt_against_itself_is_100():
    ids = val_subset()
    gt_dir = VOC / "SegmentationClassAug"
    result = ev.evaluate(gt_dir, gt_dir, ids, 21, workers=2)
    assert result["miou"] == result["pixel_acc"] == result["mean_class_acc"] == result["fwiou"] == 100


def test_real_gt_with_one_class_erased_gives_the_expected_scores(tmp_path):
    ids = val_subset()
    gt_dir = VOC / "SegmentationClassAug"
    k = 15  # person
    n_bg = n_k = 0
    present = set()
    for id_ in ids:
        gt = read_mask(gt_dir / f"{id_}.png")
        n_bg += int(np.count_nonzero(gt == 0))
        n_k += int(np.count_nonzero(gt == k))
        present |= set(np.unique(gt).tolist()) - {255}
        pred = np.where(gt == k, 0, gt)
        pred[gt == 255] = 0
        write_plain(tmp_path / f"{id_}.png", pred)
    assert n_k > 0 and k in present
    result = ev.evaluate(tmp_path, gt_dir, ids, 21, workers=2)
    expected_bg = 100 * n_bg / (n_bg + n_k)  # TP n_bg, FP n_k (person called background), FN 0
    assert result["iou"][k] == 0
    assert result["iou"][0] == pytest.approx(expected_bg)
    others = [c for c in present if c not in (0, k)]
    assert all(result["iou"][c] == 100 for c in others)
    assert all(result["iou"][c] is None for c in range(21) if c not in present)
    assert result["miou"] == pytest.approx((expected_bg + 0 + 100 * len(others)) / len(present))
