"""Stage-2 losses: ignore index, perfect predictions, gradients, hand-checked values, layer weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.errors import WsssError
from wsss.losses import LOSSES, cross_entropy, dice, get_loss, lovasz_softmax, multi_mask_loss

BG = 4


def onehot_logits(target: torch.Tensor, classes: int = 4, scale: float = 30.0) -> torch.Tensor:
    """Logits (B, C, H, W) that predict ``target`` (background pixels predicted as class 0)."""
    labels = target.clamp(max=classes - 1)
    return (F.one_hot(labels, classes).permute(0, 3, 1, 2).float() * scale).requires_grad_()


@pytest.fixture
def target() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 4, (2, 6, 6), generator=g)
    t[:, 0] = BG  # a background row
    return t


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_perfect_prediction_is_near_zero(name, target):
    loss = get_loss(name, BG)(onehot_logits(target), target)
    assert math.isfinite(loss.item()) and abs(loss.item()) < 1e-4


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_with_gradients(name, target):
    logits = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = get_loss(name, BG)(logits, target)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_pixels_have_no_effect(name, target):
    base = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    changed = base.clone()
    changed[:, :, 0] = torch.randn(2, 4, 6) * 50  # only background pixels differ
    a, b = base.clone().requires_grad_(), changed.clone().requires_grad_()
    la, lb = get_loss(name, BG)(a, target), get_loss(name, BG)(b, target)
    la.backward()
    lb.backward()
    assert la.item() == pytest.approx(lb.item(), abs=1e-6)
    assert torch.all(a.grad[:, :, 0] == 0) and torch.allclose(a.grad, b.grad, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_pixels_ignored_gives_zero(name):
    logits = torch.randn(1, 4, 3, 3, requires_grad=True)
    loss = get_loss(name, BG)(logits, torch.full((1, 3, 3), BG))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_cross_entropy_hand_value():
    # One evaluated pixel with logits (0, log 3, 0, 0): p(class 1) = 3/6; one ignored pixel.
    logits = torch.zeros(1, 4, 1, 2)
    logits[0, 1, 0, 0] = math.log(3)
    target = torch.tensor([[[1, BG]]])
    assert cross_entropy(logits, target, BG).item() == pytest.approx(-math.log(0.5))


def test_hard_lovasz_and_dice_equal_their_set_versions():
    # Prediction ≈ one-hot: Lovász-softmax = mean over present classes of 1 - IoU,
    # Dice = 1 - mean over all classes of (2·TP + 1) / (|P| + |G| + 1).
    target = torch.tensor([[[0, 0, 1, 1, BG, 2]]])
    pred = torch.tensor([[[0, 1, 1, 1, 3, 2]]])
    logits = onehot_logits(pred, scale=60.0)
    iou = {0: 1 / 2, 1: 2 / 3, 2: 1.0}  # class 3 is predicted only on an ignored pixel
    assert lovasz_softmax(logits, target, BG).item() == pytest.approx(1 - sum(iou.values()) / 3, abs=1e-5)
    per_class = [(2 * 1 + 1) / (1 + 2 + 1), (2 * 2 + 1) / (3 + 2 + 1), (2 + 1) / (1 + 1 + 1), 1.0]
    assert dice(logits, target, BG).item() == pytest.approx(1 - sum(per_class) / 4, abs=1e-5)


def test_zero_weight_mask_has_no_effect(target):
    logits = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    other = torch.randint(0, 4, (2, 6, 6), generator=torch.Generator().manual_seed(4))
    for name in LOSSES:
        fn = get_loss(name, BG)
        results = []
        for third in (target, other):
            x = logits.clone().requires_grad_()
            loss = multi_mask_loss(x, torch.stack([target, other, third], dim=1), (0.7, 0.3, 0.0), fn)
            loss.backward()
            results.append((loss.detach(), x.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), name


def test_weights_combine_linearly(target):
    logits = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    masks = torch.stack([target, target.flip(-1), target.flip(-2)], dim=1)
    fn = get_loss("ce", BG)
    expected = sum(w * fn(logits, masks[:, i]) for i, w in enumerate((0.6, 0.2, 0.2)))
    assert multi_mask_loss(logits, masks, (0.6, 0.2, 0.2), fn).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError):
        multi_mask_loss(logits, masks, (1.0,), fn)


def test_unknown_loss_is_a_user_error():
    with pytest.raises(WsssError, match="lovasz"):
        get_loss("tversky", BG)
