"""Batched multi-layer Grad-CAM against the definition, and the pseudo-mask fusion rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcam_oracle import BG, make_classifier, reference_fusion, slow_normalised
from wsss.cam.gradcam import (
    BACKGROUND_SCORE,
    GRADCAM_LAYERS,
    check_layers,
    fuse_pseudo_mask,
    multi_layer_gradcam,
)

@pytest.mark.parametrize("batched", [False, True])
def test_batched_gradcam_equals_the_definition(batched):
    model = make_classifier()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cams = multi_layer_gradcam(model, x, GRADCAM_LAYERS, size=(48, 48), batched=batched)
    for layer in GRADCAM_LAYERS:
        assert cams[layer].shape == (3, 4, 48, 48)
        for b in range(3):
            got = cams[layer][b].double().numpy()
            got = (got - got.min()) / (got.max() - got.min())
            want = slow_normalised(model, x[b:b + 1], layer, (48, 48))
            assert np.abs(got - want).max() <= 1e-4, (layer, b)
            # the maps are not degenerate: classes differ and pixels differ
            assert np.ptp(want, axis=(1, 2)).min() > 1e-3


def test_gradcam_leaves_no_trace_on_the_model():
    model = make_classifier()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # a caller's no_grad must not break it
        cams = multi_layer_gradcam(model, x)
    assert cams["b4_5"].shape == (2, 4, 4, 4)  # feature resolution without a size
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # input gradients only
    assert not any(m._forward_hooks for m in model.modules())
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        multi_layer_gradcam(model, x)


def test_bn7_weights_are_the_head_weights_over_hw():
    """At bn7 Grad-CAM is conv(features, fc8.weight) / (h·w): no gradient pass needed."""
    model = make_classifier()
    x = torch.rand(2, 3, 32, 32)
    cams = multi_layer_gradcam(model, x, ["bn7"])["bn7"]
    with torch.no_grad():
        feats = model.forward_features(x)["bn7"]
        want = F.conv2d(feats, model.fc8.weight) / (feats.shape[-2] * feats.shape[-1])
    torch.testing.assert_close(cams, want)


def test_layer_names_are_checked():
    assert check_layers(["bn7", "b4_5"]) == ("b4_5", "bn7")
    with pytest.raises(ValueError, match="b9"):
        check_layers(["b4_5", "b9"])


def test_fusion_hand_checked():
    # One patch, 1×3 pixels, labels TE and LYM. Raw maps span -1..3 → normalised (x + 1) / 4.
    cams = torch.tensor([[[[3.0, -1.0, 1.0]],     # TE   → 1.0, 0.0, 0.5
                          [[5.0 - 2, 2.0, 2.0]],  # NEC  (unlabelled; would win pixels 1, 2)
                          [[0.0, -1.0, 1.0]],     # LYM  → 0.25, 0.0, 0.5
                          [[-1.0, -1.0, -1.0]]]])  # TAS  (unlabelled)
    labels = torch.tensor([[True, False, True, False]])
    white = torch.tensor([[[False, False, True]]])
    # pixel 0: TE 1.0 > LYM 0.25; pixel 1: TE and LYM tie at 0.0 with background 0 → first, TE;
    # pixel 2: white → background 1.000001 beats the 0.5 tie.
    assert fuse_pseudo_mask(cams, labels, white, BG).tolist() == [[[0, 0, 4]]]
    # BCSS: no background channel, white is tissue → the tie goes to TE.
    assert fuse_pseudo_mask(cams, labels, None, BG).tolist() == [[[0, 0, 0]]]
    # only LYM labelled: LYM everywhere that is not white background
    assert fuse_pseudo_mask(cams, torch.tensor([[False, False, True, False]]), white, BG).tolist() == [[[2, 2, 4]]]
    assert BACKGROUND_SCORE > 1.0


def test_fusion_never_picks_an_unlabelled_class():
    g = torch.Generator().manual_seed(0)
    cams = torch.randn(16, 4, 12, 12, generator=g)
    labels = torch.rand(16, 4, generator=g) < 0.5
    labels[:, 0] |= ~labels.any(dim=1)  # every patch has a class
    white = torch.rand(16, 12, 12, generator=g) < 0.3
    for w in (white, None):
        masks = fuse_pseudo_mask(cams, labels, w, BG)
        for b in range(16):
            allowed = {int(c) for c in torch.nonzero(labels[b]).flatten()} | ({BG} if w is not None else set())
            assert set(masks[b].unique().tolist()) <= allowed
        if w is None:
            assert not (masks == BG).any()  # white is tissue: never background
        else:
            assert (masks[white] == BG).all() and not (masks[~white] == BG).any()


def test_fusion_matches_the_numpy_reference_and_handles_no_label():
    g = torch.Generator().manual_seed(3)
    cams = torch.randn(5, 4, 9, 9, generator=g)
    labels = torch.rand(5, 4, generator=g) < 0.6
    labels[0] = False  # a patch without classes: nothing to supervise, all background
    white = torch.rand(5, 9, 9, generator=g) < 0.2
    masks = fuse_pseudo_mask(cams, labels, white, BG).numpy()
    assert (masks[0] == BG).all()
    for b in range(1, 5):
        c = cams[b].double().numpy()
        scores = (c - c.min()) / (c.max() - c.min())
        np.testing.assert_array_equal(masks[b], reference_fusion(scores, labels[b].tolist(), white[b].numpy()))
