"""PSL: gating and online masks on hand-made tensors, the PSL loss schedule, and the losses it uses."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wsss.losses import IGNORE, cross_entropy, multilabel_soft_margin
from wsss.methods.psl import class_gates, make_step, merge_targets, online_masks, online_start

torch.set_num_threads(2)


def logits_favouring(order, h=2, w=3):
    """(1, C, h, w) seg logits whose per-pixel ranking of classes is `order` (best first)."""
    c = len(order)
    out = torch.zeros(1, c, h, w)
    for rank, cls in enumerate(order):
        out[0, cls] = float(c - rank)
    return out


def test_gates_background_one_objects_sigmoid_times_labels():
    cls = torch.tensor([[0.0, 2.0, -1.0]])
    g = class_gates(cls, torch.tensor([[1.0, 0.0, 1.0]]))
    assert torch.allclose(g, torch.tensor([[1.0, 0.5, 0.0, 1 / (1 + math.exp(1))]]))
    assert torch.allclose(class_gates(cls), torch.cat([torch.ones(1, 1), torch.sigmoid(cls)], 1))


def test_absent_class_never_in_the_online_mask():
    seg = logits_favouring([2, 1, 0, 3])  # class 2 wins everywhere without gates
    cls = torch.full((1, 3), 5.0)  # the classifier is sure of every class
    labels = torch.tensor([[1.0, 0.0, 0.0]])  # ... but the image is labelled with class 1 only
    mask = online_masks(seg, cls, labels)
    assert mask.shape == (1, 2, 3) and mask.dtype == torch.int64
    assert torch.all(mask == 1)  # class 2 is prohibited; 1 is next and allowed


def test_background_always_allowed():
    seg = logits_favouring([1, 2, 0])
    labels = torch.tensor([[0.0, 0.0]])  # no object labels: only background remains
    assert torch.all(online_masks(seg, torch.zeros(1, 2), labels) == 0)
    # a present class the classifier doubts is outweighed by background
    seg = torch.zeros(1, 3, 1, 1)
    seg[0, 1] = 0.5  # p(class 1) = 0.45, p(bg) = 0.27
    assert online_masks(seg, torch.tensor([[-5.0, 0.0]]), torch.tensor([[1.0, 0.0]])).item() == 0
    assert online_masks(seg, torch.tensor([[5.0, 0.0]]), torch.tensor([[1.0, 0.0]])).item() == 1


def test_online_mask_is_detached_and_ignores_padding():
    seg = torch.randn(2, 3, 4, 4, requires_grad=True)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[:, :, 3] = False
    mask = online_masks(seg, torch.zeros(2, 2, requires_grad=True), torch.ones(2, 2), valid)
    assert not mask.requires_grad
    assert torch.all(mask[:, :, 3] == IGNORE) and torch.all(mask[:, :, :3] < 3)


def test_cross_entropy_ignores_255():
    logits = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (1, 4, 4), generator=torch.Generator().manual_seed(1))
    target[0, :2] = IGNORE
    changed = logits.clone()
    changed[0, :, :2] = torch.randn(3, 2, 4) * 10  # other logits at the ignore pixels only
    assert cross_entropy(changed, target).item() == pytest.approx(cross_entropy(logits, target).item())
    expected = torch.nn.functional.cross_entropy(logits[..., 2:, :], target[..., 2:, :])
    assert cross_entropy(logits, target).item() == pytest.approx(expected.item())


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = cross_entropy(logits, torch.full((1, 2, 2), IGNORE))
    assert loss.item() == 0.0
    loss.backward()


def test_multilabel_soft_margin_hand_computation():
    logits, labels = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    sig = torch.sigmoid(logits)
    expected = -(torch.log(sig[0, 0]) + torch.log(1 - sig[0, 1])) / 2
    assert multilabel_soft_margin(logits, labels).item() == pytest.approx(expected.item())


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seg = torch.nn.Conv2d(3, 3, 1)
        self.cls = torch.nn.Linear(3, 2)

    def forward(self, x):
        return {"seg": self.seg(x), "cls": self.cls(x.mean((2, 3)))}


def psl_args(**kw):
    base = dict(psl_online="on", psl_online_start=None, psl_online_weight=1.0, psl_cls_weight=1.0, epochs=4)
    return SimpleNamespace(**{**base, **kw})


def test_online_term_starts_at_its_epoch_and_can_be_switched_off():
    assert online_start(psl_args()) == 3 and online_start(psl_args(psl_online_start=1)) == 1
    torch.manual_seed(0)
    batch = {"image": torch.randn(2, 3, 4, 4), "target": torch.randint(0, 3, (2, 4, 4)),
             "valid": torch.ones(2, 4, 4, dtype=torch.bool), "label": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    model, step = TwoHeads(), make_step(psl_args())
    loss1, logs1 = step(model, batch, epoch=1)  # 0-based: the second epoch
    loss2, logs2 = step(model, batch, epoch=2)
    assert "online_loss" not in logs1 and "online_loss" in logs2
    assert loss1.item() == pytest.approx(logs1["seg_loss"] + logs1["cls_loss"])
    assert loss2.item() == pytest.approx(logs2["seg_loss"] + logs2["cls_loss"] + logs2["online_loss"])
    _, logs = make_step(psl_args(psl_online="off"))(model, batch, epoch=3)
    assert "online_loss" not in logs
    loss, logs = make_step(psl_args(psl_cls_weight=0.5, psl_online_weight=2.0))(model, batch, epoch=3)
    assert loss.item() == pytest.approx(logs["seg_loss"] + 0.5 * logs["cls_loss"] + 2 * logs["online_loss"])


def test_psl_plus_merge_rules():
    """none: the net's mask; fill: its 255 pixels take the pseudo-mask's label (255 where that is
    255 too); grow: also the pseudo-mask's objects where the net says background, never the
    reverse (the net's objects stay, and its object labels win over another pseudo class)."""
    net = np.array([[1, 255, 0, 0], [255, 2, 255, 2]], np.uint8)
    pseudo = np.array([[0, 1, 1, 0], [255, 0, 2, 1]], np.uint8)
    assert merge_targets(net, pseudo, "none").tolist() == net.tolist()
    assert merge_targets(net, pseudo, "fill").tolist() == [[1, 1, 0, 0], [255, 2, 2, 2]]
    assert merge_targets(net, pseudo, "grow").tolist() == [[1, 1, 1, 0], [255, 2, 2, 2]]
    assert net.tolist() == [[1, 255, 0, 0], [255, 2, 255, 2]]  # the input is left alone
