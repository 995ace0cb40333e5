"""Affinity labels, the random walk on hand-made affinities, and the affinity head (wsss.affinity,
wsss.models.affinity)."""
import numpy as np
import pytest
import torch

from wsss.affinity import (
    confident_labels,
    pair_labels,
    pair_offsets,
    random_walk,
    shifted,
    to_grid,
    transition_matrix,
    walk_labels,
)
from wsss.labels import IGNORE
from wsss.models.affinity import AffinityNet, affinity_loss, pair_affinity
from wsss.models.classifier import build_classifier


def brute_pairs(h, w, radius):
    """Every (p, q) of cells closer than radius, p before q in reading order, by brute force."""
    cells = [(y, x) for y in range(h) for x in range(w)]
    return {(p, q) for p in cells for q in cells
            if (q[0] - p[0]) ** 2 + (q[1] - p[1]) ** 2 < radius ** 2 and (q[0], q[1]) > (p[0], p[1])}


def test_pair_offsets_and_shifted_cover_every_nearby_pair_once():
    h, w, radius = 6, 7, 3
    grid = np.arange(h * w).reshape(h, w)
    found = []
    for dy, dx in pair_offsets(radius):
        a, b = shifted(grid, dy, dx)
        found += [(divmod(int(i), w), divmod(int(j), w)) for i, j in zip(a.ravel(), b.ravel(), strict=True)]
    assert len(found) == len(set(found))
    assert set(found) == brute_pairs(h, w, radius)
    assert len(pair_offsets(5)) == 34  # PSA's and IRN's radius-5 neighbourhood, each pair once


def test_transition_matrix_is_the_dense_construction():
    rng = np.random.default_rng(0)
    features = rng.random((3, 4, 5)).astype(np.float32)
    beta, radius = 4.0, 3
    h, w = features.shape[1:]
    n = h * w
    flat = features.reshape(3, n)
    dense = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            if (yi - yj) ** 2 + (xi - xj) ** 2 < radius ** 2:
                dense[i, j] = np.exp(-np.abs(flat[:, i] - flat[:, j]).mean()) ** beta
    dense /= dense.sum(axis=0, keepdims=True)
    np.testing.assert_allclose(transition_matrix(features, beta, radius).toarray(), dense, rtol=1e-5, atol=1e-7)


def test_the_walk_spreads_a_seed_over_its_region_and_stops_at_the_boundary():
    # two regions of a 12 x 12 grid with features far apart: left half and right half
    features = np.zeros((4, 12, 12), np.float32)
    features[:, :, 6:] = 3.0  # affinity across: exp(-3) ** 10, about 1e-13
    cam = np.zeros((2, 12, 12), np.float32)
    cam[0, 5, 1] = 1.0  # class A: one confident cell on the left
    cam[1, 5, 10] = 1.0  # class B: one on the right
    walked = random_walk(cam, transition_matrix(features, beta=10, radius=5), steps=64)
    masks, score = walk_labels(walked, bg_threshold=0.05)
    assert walked[0, :, 6:].max() < 1e-6 and walked[1, :, :6].max() < 1e-6  # nothing crosses the boundary
    assert masks[0, :, :6].all() and not masks[0, :, 6:].any()
    assert masks[1, :, 6:].all() and not masks[1, :, :6].any()
    assert score.max() == pytest.approx(1.0)


def test_walk_labels_threshold_per_class_and_an_empty_image():
    walked = np.array([[[0.0, 2.0, 1.0]], [[0.5, 0.1, 0.0]]], np.float32)
    masks, score = walk_labels(walked, bg_threshold=0.4)
    np.testing.assert_allclose(score, [[[0, 1, 0.5]], [[1, 0.2, 0]]])
    assert masks.tolist() == [[[False, True, True]], [[True, False, False]]]
    masks, score = walk_labels(np.zeros((0, 2, 2), np.float32))
    assert masks.shape == score.shape == (0, 2, 2)


def test_confident_labels_snap_a_cam_blob_to_the_object():
    # a red square on grey; the CAM a blob centred on it that spills over its edges by 6 px
    image = np.full((48, 48, 3), 90, np.uint8)
    image[14:34, 14:34] = (220, 30, 30)
    yy, xx = np.mgrid[:48, :48]
    score = np.clip(1 - np.hypot(yy - 23.5, xx - 23.5) / 22, 0, 1)[None].astype(np.float32)
    labels = confident_labels(image, score, [5], fg=0.6, bg=0.3)
    square = np.zeros((48, 48), bool)
    square[14:34, 14:34] = True
    assert (labels[square] == 5).mean() > 0.9  # the blob above 0.6 covers only the square's middle
    assert not (labels[~square] == 5).any()  # nor does the CRF let it spill
    assert (labels[:4, :4] == 0).all() and set(np.unique(labels)) <= {0, 5, IGNORE}
    assert (confident_labels(image, np.zeros((0, 48, 48), np.float32), []) == IGNORE).all()


def test_pair_labels_against_brute_force():
    grid = np.array([[3, 3, 0], [IGNORE, 0, 7]], np.uint8)
    bg, fg, neg = pair_labels(grid, radius=2)  # radius 2: the right and the lower neighbour, and diagonals
    pairs = []
    for dy, dx in pair_offsets(2):
        a, b = shifted(grid, dy, dx)
        pairs += list(zip(a.ravel().tolist(), b.ravel().tolist(), strict=True))
    expected = [(x == y == 0, x == y != 0 and x != IGNORE, IGNORE not in (x, y) and x != y) for x, y in pairs]
    assert [tuple(t) for t in zip(bg.tolist(), fg.tolist(), neg.tolist(), strict=True)] == expected
    assert fg.sum() == 1 and bg.sum() == 1 and neg.sum() == 6


def test_to_grid_takes_cell_centres_and_pads_with_ignore():
    labels = np.arange(16 * 12, dtype=np.uint8).reshape(16, 12) % 200
    grid = to_grid(labels, 8, (2, 3))  # cells centred on rows 4, 12 and column 4; a 12-px row has no second
    assert grid[:, 0].tolist() == [labels[4, 4], labels[12, 4]]
    assert (grid[:, 1:] == IGNORE).all()


def test_pair_affinity_follows_pair_labels_order_and_the_loss_rewards_the_right_affinities():
    grid = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [2, 2, 0, 0]], np.uint8)
    onehot = torch.from_numpy(np.eye(3, dtype=np.float32)[grid].transpose(2, 0, 1))[None] * 50
    affinity = pair_affinity(onehot, radius=3)
    bg, fg, neg = (torch.from_numpy(x)[None] for x in pair_labels(grid, radius=3))
    assert affinity.shape == bg.shape
    assert torch.allclose(affinity[bg | fg], torch.ones(1)) and affinity[neg].max() < 1e-6
    good, terms = affinity_loss(affinity, bg, fg, neg)
    bad, _ = affinity_loss(1 - affinity, bg, fg, neg)
    assert good < 1e-3 < 1 < bad and set(terms) == {"bg", "fg", "neg"}


@pytest.mark.filterwarnings("ignore:.*randomly initialised:UserWarning")
def test_affinity_net_on_a_frozen_classifier():
    torch.manual_seed(0)
    classifier = build_classifier("efficientnet-lite0", 3, output_stride=16, weights=None)
    net = AffinityNet(classifier)
    assert sorted(net.taps) == [4, 8]
    out = net(torch.randn(2, 3, 50, 66))
    assert out.shape == (2, 448, 7, 9)
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"reduce", "fuse"}
    net.train()
    assert not net.classifier.training
    pair_affinity(out).mean().backward()
    assert all(p.grad is None for p in net.classifier.parameters())
