"""The AE-PSL fusion rule, the CRF's soft evidence and the STC soft target, on hand-made arrays."""
import numpy as np
import pytest

from wsss.pseudo import fuse_with_saliency, regions_label_map, soft_scores, stc_soft_target

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


def test_every_branch_of_the_rule():
    out = fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY, bg_threshold=0.1, conflict="score")
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
    out = fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY, bg_threshold=0.1, conflict="ignore")
    assert out[0].tolist() == [3, 3, 255, 7, 0, 255, 255, 255]


def test_bg_threshold_moves_the_background():
    out = fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY, bg_threshold=0.6)
    assert out[0, 5] == 0 and out[0, 6] == 255


def test_no_class_regions_leaves_saliency_only():
    empty = np.zeros((0, 1, 8), bool)
    out = fuse_with_saliency(empty, [], np.zeros((0, 1, 8), np.float32), SALIENCY, bg_threshold=0.1)
    assert out[0].tolist() == [255, 0, 255, 255, 0, 255, 255, 255]


def test_regions_label_map_is_stage1s_union():
    assert regions_label_map(REGIONS, KEYS, SCORE)[0].tolist() == [3, 3, 3, 7, 0, 0, 0, 7]


def test_shape_errors():
    with pytest.raises(ValueError, match="saliency shape"):
        fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY[:, :4])
    with pytest.raises(ValueError, match="n = len"):
        fuse_with_saliency(REGIONS, KEYS[:1], SCORE, SALIENCY)
    with pytest.raises(ValueError, match="conflict"):
        fuse_with_saliency(REGIONS, KEYS, SCORE, SALIENCY, conflict="max")


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
