"""The improvements beyond the paper (issue 14), each against an expectation worked out in the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.cam.gradcam import averaged_gradcam, multi_layer_gradcam
from wsss.data import augment
from wsss.data.background import white_mask
from wsss.errors import WsssError
from wsss.models.resnet38 import ResNet38Classifier
from wsss.stages.pseudo_masks import PmMethod


def _pixelwise_cams(model, x, layers, size):
    """A toy "Grad-CAM": class c's map is input channel c, resized to ``size``. It commutes with
    mirroring, and on an image that is constant per channel it does not depend on the input scale."""
    cam = F.interpolate(x[:, :2], size=size, mode="bilinear", align_corners=False)
    return {layer: cam * (i + 1) for i, layer in enumerate(layers)}


def test_multi_scale_cams_of_a_scale_invariant_model_equal_single_scale():
    x = torch.ones(2, 3, 16, 16) * torch.tensor([0.2, 0.7, 0.4]).view(1, 3, 1, 1)
    single = averaged_gradcam(None, x, ("b4_5", "bn7"), (24, 24), gradcam=_pixelwise_cams)
    multi = averaged_gradcam(None, x, ("b4_5", "bn7"), (24, 24), scales=(0.5, 0.75, 1.0, 1.5), flip=True,
                             gradcam=_pixelwise_cams)
    for layer in ("b4_5", "bn7"):
        assert torch.allclose(single[layer], multi[layer], atol=1e-6)
        assert torch.allclose(single[layer][:, 1], torch.full((2, 24, 24), 0.7 * (1 if layer == "b4_5" else 2)))


def test_flip_views_are_mirrored_back_before_averaging():
    x = torch.rand(1, 3, 8, 8)
    plain = averaged_gradcam(None, x, ("b5_2",), (8, 8), gradcam=_pixelwise_cams)["b5_2"]
    both = averaged_gradcam(None, x, ("b5_2",), (8, 8), flip=True, gradcam=_pixelwise_cams)["b5_2"]
    assert torch.allclose(plain, x[:, :2])
    assert torch.allclose(both, plain, atol=1e-6)  # the mirrored view, un-mirrored, is the same map

    # a map that is NOT mirror-symmetric in its response: the average is the mean of the two views
    def shifted(model, x, layers, size):
        return {layer: x[:, :2, :, 1:].mean(dim=-1, keepdim=True).expand(-1, -1, *size) for layer in layers}

    avg = averaged_gradcam(None, x, ("b5_2",), (8, 8), flip=True, gradcam=shifted)["b5_2"]
    expected = (x[:, :2, :, 1:].mean(-1, keepdim=True) + x.flip(-1)[:, :2, :, 1:].mean(-1, keepdim=True)) / 2
    assert torch.allclose(avg, expected.expand(-1, -1, 8, 8), atol=1e-6)


def test_averaged_gradcam_with_one_view_is_the_plain_gradcam():
    torch.manual_seed(0)
    model = ResNet38Classifier(3, width=0.0625).eval()
    x = torch.rand(2, 3, 32, 32)
    plain = multi_layer_gradcam(model, x, ("b4_5", "b5_2", "bn7"), size=(40, 40))
    same = averaged_gradcam(model, x, ("b4_5", "b5_2", "bn7"), (40, 40))
    for layer in plain:
        assert torch.equal(plain[layer], same[layer])


def test_bad_pm_methods_are_user_errors():
    with pytest.raises(WsssError, match="--scales"):
        PmMethod(scales=(0.1,))
    with pytest.raises(WsssError, match="--white-rule"):
        PmMethod(white_rule="bright")
    with pytest.raises(WsssError, match="--tie-rule"):
        PmMethod(tie_rule="first")


def test_glass_rule_keeps_pale_tissue_that_the_grey_rule_calls_background():
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, :10] = (235, 235, 232)  # glass: bright and colourless (chroma 3)
    image[:, 10:] = (250, 205, 225)  # pale eosin: grey 221 > 200, but pink (chroma 45)
    grey = white_mask(image, rule="grey")
    glass = white_mask(image, rule="glass")
    assert grey.all()  # the reference's rule: everything is background
    assert glass[:, :10].all() and not glass[:, 10:].any()


def test_d4_moves_image_and_masks_together_and_covers_all_eight_symmetries():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    mask = image[..., 0].copy()
    seen = set()
    torch.manual_seed(0)
    for _ in range(200):
        out_image, out_mask = augment.geometric([image, mask], "d4")
        assert np.array_equal(out_image[..., 0], out_mask)
        seen.add(out_mask.tobytes())
    # the 8 symmetries of a square, written out by hand
    expected = set()
    for k in range(4):
        for m in (mask, mask[:, ::-1]):
            expected.add(np.ascontiguousarray(np.rot90(m, k)).tobytes())
    assert seen == expected and len(expected) == 8


def test_flip_mode_never_rotates():
    mask = np.arange(9, dtype=np.uint8).reshape(3, 3)
    torch.manual_seed(1)
    allowed = {m.tobytes() for m in (mask, mask[:, ::-1], mask[::-1], mask[::-1, ::-1])}
    assert all(augment.geometric([mask], "flip")[0].tobytes() in allowed for _ in range(50))


def test_stain_jitter_changes_stain_densities_not_layout():
    rng = np.random.default_rng(0)
    image = rng.integers(60, 230, (16, 16, 3), dtype=np.uint8)
    assert augment.stain_jitter(image, 0.0) is image
    torch.manual_seed(0)
    out = augment.stain_jitter(image, 0.05)
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    # small strength, small change; the darkest pixel stays the darkest (densities only scale/shift)
    assert np.abs(out.astype(int) - image).mean() < 20
    od_in = -np.log(np.maximum(image, 1) / 255.0).sum(-1)
    od_out = -np.log(np.maximum(out, 1) / 255.0).sum(-1)
    assert np.corrcoef(od_in.ravel(), od_out.ravel())[0, 1] > 0.95
