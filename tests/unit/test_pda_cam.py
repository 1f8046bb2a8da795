"""PDA attention and schedule, CAM resizing, normalisation and segmentation, on hand-checked numbers."""

from __future__ import annotations

import pytest
import torch

from wsss.cam.cam import cam_to_segmentation, cams_from_features, minmax_normalise, upsample_cams
from wsss.cam.pda import PdaSchedule, pda_attention
from wsss.errors import WsssError


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    """Features (1, 2, 2, 2) and an identity classifier, so cams = relu(features)."""
    features = torch.tensor([[[[4.0, 2.0], [1.0, 0.0]], [[-1.0, 3.0], [6.0, 3.0]]]])
    return features, torch.eye(2)


def test_pda_attention_hand_computed():
    features, weight = _tiny()
    # class 0: cam [[4,2],[1,0]], max 4, gamma 0.5 -> drop > 2 -> [[0,2],[1,0]]
    # class 1: cam [[0,3],[6,3]], max 6, gamma 0.5 -> drop > 3 -> [[0,3],[0,3]]
    expected = torch.tensor([[[[0.0, 2.5], [0.5, 1.5]]]])
    assert torch.allclose(pda_attention(features, weight, 0.5), expected)
    assert torch.allclose(pda_attention(features, weight[:, :, None, None], 0.5), expected)


def test_pda_gamma_one_drops_nothing():
    features, weight = _tiny()
    expected = torch.relu(features).mean(dim=1, keepdim=True)
    assert torch.allclose(pda_attention(features, weight, 1.0), expected)


def test_pda_all_zero_class_contributes_zeros():
    features = torch.tensor([[[[2.0, 1.0]], [[-1.0, -5.0]]]])  # class 1 never fires: max 0
    att = pda_attention(features, torch.eye(2), 0.5)
    assert torch.allclose(att, torch.tensor([[[[0.0, 0.5]]]]))  # (0 + 0) / 2, (1 + 0) / 2
    silent = pda_attention(-features.abs(), torch.eye(2), 0.5)
    assert torch.equal(silent, torch.zeros_like(silent))


def test_pda_threshold_is_per_image():
    features, weight = _tiny()
    batch = torch.cat([features, 10 * features])
    att = pda_attention(batch, weight, 0.5)
    assert torch.allclose(att[1], 10 * att[0])


def test_pda_passes_gradients_to_features_and_weight():
    features, weight = _tiny()
    features.requires_grad_(True)
    weight.requires_grad_(True)
    (features * pda_attention(features, weight, 0.5)).sum().backward()
    assert features.grad is not None and weight.grad is not None


def test_schedule_defaults_follow_reference():
    sched = PdaSchedule()
    assert [sched.gamma_at(e) for e in range(3)] == [None, None, None]
    # decay counts from epoch 0: the reference multiplies after every epoch, PDA or not
    assert sched.gamma_at(3) == pytest.approx(0.98**3)  # 0.941192
    assert sched.gamma_at(19) == pytest.approx(0.98**19)
    assert sched.gamma_at(21) == pytest.approx(0.98**21)  # 0.6543 > 0.65: one more step
    assert sched.gamma_at(22) == pytest.approx(0.98**22)  # 0.6412
    assert sched.gamma_at(30) == pytest.approx(0.98**22)  # stopped below the floor


def test_schedule_floor_and_first_epoch():
    sched = PdaSchedule(start=1.0, decay=0.5, floor=0.3, first_epoch=0)
    assert [sched.gamma_at(e) for e in range(5)] == [1.0, 0.5, 0.25, 0.25, 0.25]
    assert PdaSchedule(first_epoch=1).gamma_at(1) == pytest.approx(0.98)


@pytest.mark.parametrize("kwargs", [{"decay": 0.0}, {"decay": 1.5}, {"start": 0.0}, {"first_epoch": -1}])
def test_schedule_rejects_bad_values(kwargs):
    with pytest.raises(WsssError):
        PdaSchedule(**kwargs)


def test_cams_from_features_is_relu_conv():
    features, weight = _tiny()
    assert torch.equal(cams_from_features(features, weight), torch.relu(features))


def test_upsample_cams_size_and_constant_maps():
    cams = torch.stack([torch.full((3, 5), 2.0), torch.zeros(3, 5)])[None]
    up = upsample_cams(cams, (12, 20))
    assert up.shape == (1, 2, 12, 20)
    assert torch.allclose(up[0, 0], torch.full((12, 20), 2.0)) and torch.equal(up[0, 1], torch.zeros(12, 20))
    ramp = upsample_cams(torch.tensor([[[[0.0, 4.0]]]]), (1, 4))
    assert torch.allclose(ramp, torch.tensor([[[[0.0, 1.0, 3.0, 4.0]]]]))  # align_corners=False


def test_minmax_normalise_joint_over_classes():
    maps = torch.tensor([[[[2.0, 4.0]], [[6.0, 10.0]]]])
    assert torch.allclose(minmax_normalise(maps), torch.tensor([[[[0.0, 0.25]], [[0.5, 1.0]]]]))
    assert torch.equal(minmax_normalise(torch.full((1, 2, 1, 2), 3.0)), torch.zeros(1, 2, 1, 2))


def test_segmentation_gates_classes_by_probability():
    # 3 classes, 1 x 4 pixels
    cams = torch.tensor([[[[1.0, 0.0, 0.2, 0.0]], [[0.0, 2.0, 0.1, 0.0]], [[0.0, 5.0, 0.3, 0.0]]]])
    probs = torch.tensor([[0.9, 0.6, 0.25]])  # class 2 is at the threshold: gated out
    seg = cam_to_segmentation(cams, probs)
    # pixel 0 -> class 0; pixel 1 -> class 1 (class 2 would win but is gated);
    # pixel 2 -> class 0 (0.2 > 0.1); pixel 3 all zero -> lowest kept class, 0
    assert seg.dtype == torch.long
    assert seg.tolist() == [[[0, 1, 0, 0]]]
    assert cam_to_segmentation(cams, probs, threshold=0.2).tolist() == [[[0, 2, 2, 0]]]


def test_segmentation_zero_class_never_wins_a_tie():
    cams = torch.tensor([[[[0.0, 3.0]], [[0.0, 1.0]]]])
    probs = torch.tensor([[0.1, 0.8]])  # class 0 gated: pixel 0 ties at 0 between the classes
    assert cam_to_segmentation(cams, probs).tolist() == [[[1, 1]]]


def test_segmentation_without_any_kept_class_uses_most_probable():
    cams = torch.rand(2, 3, 2, 2)
    probs = torch.tensor([[0.1, 0.2, 0.05], [0.9, 0.1, 0.1]])
    seg = cam_to_segmentation(cams, probs)
    assert torch.equal(seg[0], torch.ones(2, 2, dtype=torch.long))
    assert torch.equal(seg[1], torch.zeros(2, 2, dtype=torch.long))


def test_pda_max_norm_rescales_attention_to_unit_peak():
    import torch

    from wsss.cam.pda import pda_attention

    torch.manual_seed(0)
    features = torch.rand(2, 3, 4, 4) * 5
    weight = torch.rand(2, 3)
    raw = pda_attention(features, weight, 0.9)
    normed = pda_attention(features, weight, 0.9, norm="max")
    peak = raw.amax(dim=(2, 3), keepdim=True)
    assert torch.allclose(normed, raw / peak)
    assert torch.allclose(normed.amax(dim=(2, 3)), torch.ones(2, 1))
    # all-zero CAMs stay zero rather than NaN
    assert torch.equal(pda_attention(torch.zeros(1, 3, 2, 2), weight, 0.9, "max"), torch.zeros(1, 1, 2, 2))
    with pytest.raises(WsssError):
        pda_attention(features, weight, 0.9, norm="sum")
