"""The fusion rules, the CRF's soft evidence and the STC soft target, on hand-made arrays."""
import numpy as np
import pytest

from wsss.fusion import FUSION_RULES, fuse_with_saliency, regions_label_map, soft_scores, stc_soft_target

# Eight pixels in a row, two classes (mask ids 3 and 7):
#   pixel        0     1     2      3      4     5     6     7
#   region 3     x     x     x      .      .     .     .     x
#   region 7     .     .     x      x      .     .     .     x
#   score 3     .9    .9    .8     .      .     .     .    .2
#   score 7     .     .     .3    .6      .     .     .    .7
#   saliency    .9   .02    .9    .9    .02    .5    .9    .9
KEYS = np.array([3, 7])
REGIONS = np.array([[[1, 1, 1, 0, 0, 0, 0, 1]], [[0, 0, 1, 1, 0, 0, 0, 1]]], bool)
SCORE = np.array([[[.9, .9, .8, 0, 0, 0, 0, .2]], [[0, 0, .3, .6, 0, 0, 0, .7]]], np.float32)
SALIENCY = np.array([[.9, .02, .9, .9, .02, .5, .9, .9]], np.float32)


def test_every_branch_of_the_mined_first_rule():
    out = fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY, bg_threshold=0.1, conflict="score", rule="mined-first")
    assert out.dtype == np.uint8
    assert out[0].tolist() == [
        3,    # in one region
        3,    # in a region with low saliency: the object region wins
        3,    # claimed by 3 and 7: 3 has the higher score
        7,    # in one region
        0,    # in no region, saliency below the threshold: background
        255,  # in no region, saliency in between: ignored
        255,  # salient but mined for no class: ignored
        7,    # claimed by both: 7 has the higher score
    ]


def test_conflicts_ignored_on_request():
    out = fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY, bg_threshold=0.1, conflict="ignore", rule="mined-first")
    assert out[0].tolist() == [3, 3, 255, 7, 0, 255, 255, 255]


def test_bg_threshold_moves_the_background():
    out = fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY, bg_threshold=0.6, rule="mined-first")
    assert out[0, 5] == 0 and out[0, 6] == 255


@pytest.mark.parametrize("rule", sorted(set(FUSION_RULES) - {"seeds"}))
def test_no_class_regions_leaves_saliency_only(rule):
    empty = np.zeros((0, 1, 8), bool)
    out = fuse_with_saliency(empty, [], np.zeros((0, 1, 8), np.float32), SALIENCY, bg_threshold=0.1, rule=rule)
    assert out[0].tolist() == [255, 0, 255, 255, 0, 255, 255, 255]


def test_the_seeds_rule_ignores_saliency():
    empty = np.zeros((0, 1, 8), bool)
    out = fuse_with_saliency(empty, [], np.zeros((0, 1, 8), np.float32), SALIENCY, bg_threshold=0.1, rule="seeds")
    assert out[0].tolist() == [0] * 8


def test_regions_label_map_is_stage1s_union():
    assert regions_label_map(REGIONS, KEYS, SCORE)[0].tolist() == [3, 3, 3, 7, 0, 0, 0, 7]


def test_shape_errors():
    with pytest.raises(ValueError, match="saliency shape"):
        fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY[:, :4])
    with pytest.raises(ValueError, match="n = len"):
        fuse_with_saliency(REGIONS, KEYS[:1], SCORE, SALIENCY)
    with pytest.raises(ValueError, match="conflict"):
        fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY, conflict="max")
    with pytest.raises(ValueError, match="fusion rule must be one of"):
        fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY, rule="saliency")
    with pytest.raises(ValueError, match="below bg_threshold"):
        fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY, bg_threshold=0.6, fg_threshold=0.5, rule="saliency-first")


# ---------------------------------------------------------------- every rule on the cases of issue 15
# One row of pixels per case: the mined regions (x), the normalised CAM scores and the saliency, with
# --bg-threshold 0.1 and --fg-threshold 0.5, and what each rule makes of every pixel.

def fused_row(rule, regions, scores, saliency, keys, **kwargs) -> list[int]:
    regions = np.array([[[c == "x" for c in row]] for row in regions])
    out = fuse_with_saliency(regions, keys, np.array(scores, np.float32)[:, None], np.array([saliency], np.float32),
                             bg_threshold=0.1, fg_threshold=0.5, rule=rule, **kwargs)
    return out[0].tolist()


SINGLE = {  # one label (3): the object seen by both, by saliency only, background, unsure
    "regions": ["x..."], "scores": [[.9, .4, 0, .1]], "saliency": [.9, .9, .02, .3], "keys": [3],
    "expected": {"mined-first": [3, 255, 0, 255], "ae-psl": [3, 255, 0, 255], "saliency-first": [3, 3, 0, 255],
                 "saliency-seeds": [3, 3, 0, 255], "seeds": [3, 0, 0, 0]},
}
TWO = {  # labels 3 and 7: mined for 3, mined for both (7 scores higher), salient and mined for neither,
    # 7 on low saliency
    "regions": ["xx..", ".x.x"], "scores": [[.9, .6, .2, 0], [.1, .8, .5, .9]], "saliency": [.9, .9, .8, .02],
    "keys": [3, 7],
    "expected": {"mined-first": [3, 7, 255, 7], "ae-psl": [3, 7, 255, 255], "saliency-first": [3, 7, 7, 0],
                 "saliency-seeds": [3, 7, 7, 255], "seeds": [3, 7, 0, 7]},
}
SALIENCY_MISSES_OBJECT = {  # the object is mined, its saliency low, then in between; a background pixel
    "regions": ["xx."], "scores": [[.9, .8, 0]], "saliency": [.05, .3, .05], "keys": [3],
    "expected": {"mined-first": [3, 3, 0], "ae-psl": [255, 3, 0], "saliency-first": [0, 255, 0],
                 "saliency-seeds": [255, 255, 0], "seeds": [3, 3, 0]},
}
CAM_OUTSIDE_SALIENCY = {  # object mined; object salient, CAM weak; mined spill on background; CAM on background;
    # a salient region that misses every CAM
    "regions": ["x.x.."], "scores": [[.9, .3, .8, .5, 0]], "saliency": [.9, .9, .05, .05, .9], "keys": [3],
    "expected": {"mined-first": [3, 255, 3, 0, 255], "ae-psl": [3, 255, 255, 0, 255],
                 "saliency-first": [3, 3, 0, 0, 255], "saliency-seeds": [3, 3, 255, 0, 255], "seeds": [3, 0, 3, 0, 0]},
}
CASES = {"single label": SINGLE, "two labels": TWO, "saliency misses the object": SALIENCY_MISSES_OBJECT,
         "CAM outside the salient region": CAM_OUTSIDE_SALIENCY}


@pytest.mark.parametrize("rule", sorted(FUSION_RULES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_rules_on_the_cases_of_issue_15(case, rule):
    c = CASES[case]
    assert fused_row(rule, c["regions"], c["scores"], c["saliency"], c["keys"]) == c["expected"][rule]


def test_two_labels_with_conflicts_ignored():
    c = TWO
    row = {rule: fused_row(rule, c["regions"], c["scores"], c["saliency"], c["keys"], conflict="ignore")
           for rule in FUSION_RULES}
    assert row["mined-first"] == [3, 255, 255, 7] and row["ae-psl"] == [3, 255, 255, 255]
    assert row["seeds"] == [3, 255, 0, 7]
    assert row["saliency-first"] == c["expected"]["saliency-first"]  # no mined overlap to resolve


def test_saliency_first_thresholds():
    regions, scores, keys = ["...."], [[.5, .5, .5, .5]], [3]
    saliency = [.05, .2, .45, .6]
    out = fuse_with_saliency(np.zeros((1, 1, 4), bool), keys, np.array(scores, np.float32)[:, None],
                             np.array([saliency], np.float32), bg_threshold=0.3, fg_threshold=0.3,
                             rule="saliency-first")
    assert out[0].tolist() == [0, 0, 3, 3]  # fg == bg: no ignore band
    assert fused_row("saliency-first", regions, scores, saliency, keys) == [0, 255, 255, 3]


def test_the_classes_of_saliency_first_come_from_the_scores_not_the_regions():
    # pixel 0 is mined for 3 but 7 scores higher there; pixel 1 is mined for nothing
    row = fused_row("saliency-first", ["x.", ".."], [[.4, .3], [.6, .2]], [.9, .9], [3, 7])
    assert row == [7, 3]


def test_soft_scores_split_the_salient_mass_by_cam_score():
    soft = soft_scores(SCORE, SALIENCY)
    assert soft.shape == (3, 1, 8)
    np.testing.assert_allclose(soft.sum(0), 1, atol=1e-6)
    np.testing.assert_allclose(soft[:, 0, 0], [0.1, 0.9, 0.0], atol=1e-6)
    np.testing.assert_allclose(soft[:, 0, 6], [0.1, 0.45, 0.45], atol=1e-6)  # no score: split evenly


def test_stc_soft_target():
    sal = np.array([[0, 255], [51, 204]], np.uint8)
    target = stc_soft_target(sal, class_id=2, num_classes=4)
    assert target.shape == (4, 2, 2) and target.dtype == np.float32
    np.testing.assert_allclose(target[2], sal / 255, atol=1e-6)
    np.testing.assert_allclose(target[0], 1 - sal / 255, atol=1e-6)
    assert not target[[1, 3]].any()
    np.testing.assert_allclose(stc_soft_target(sal / 255.0, 2, 4), target, atol=1e-6)
    with pytest.raises(ValueError, match="object class"):
        stc_soft_target(sal, class_id=0, num_classes=4)
