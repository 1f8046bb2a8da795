"""The method options beyond the paper (the cpu preset's improvements and the options measured with them),
each against an expectation worked out in the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.cam.gradcam import averaged_gradcam, fuse_pseudo_mask, multi_layer_gradcam
from wsss.data import augment
from wsss.data.background import white_mask
from wsss.data.seg_datasets import compose_mosaic as augment_mosaic
from wsss.errors import WsssError
from wsss.models.resnet38 import ResNet38Classifier
from wsss.cam.pseudo_mask import PmMethod


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
        # joint min-max over the two classes (0.2 and 0.7, times the layer's factor): 0 and 1
        assert torch.allclose(single[layer][:, 0], torch.zeros(2, 24, 24), atol=1e-6)
        assert torch.allclose(single[layer][:, 1], torch.ones(2, 24, 24), atol=1e-6)


def test_flip_views_are_mirrored_back_before_averaging():
    x = torch.rand(1, 3, 8, 8)
    plain = averaged_gradcam(None, x, ("b5_2",), (8, 8), gradcam=_pixelwise_cams)["b5_2"]
    both = averaged_gradcam(None, x, ("b5_2",), (8, 8), flip=True, gradcam=_pixelwise_cams)["b5_2"]
    lo, hi = x[:, :2].min(), x[:, :2].max()
    assert torch.allclose(plain, (x[:, :2] - lo) / (hi - lo))
    assert torch.allclose(both, plain, atol=1e-6)  # the mirrored view, un-mirrored, is the same map

    # a map that is NOT mirror-symmetric in its response: the average is the mean of the two views
    def shifted(model, x, layers, size):
        return {layer: x[:, :2, :, 1:].mean(dim=-1, keepdim=True).expand(-1, -1, *size) for layer in layers}

    avg = averaged_gradcam(None, x, ("b5_2",), (8, 8), flip=True, gradcam=shifted)["b5_2"]

    def norm(v):
        return (v - v.min()) / (v.max() - v.min())

    a = norm(x[:, :2, :, 1:].mean(-1, keepdim=True))
    b = norm(x.flip(-1)[:, :2, :, 1:].mean(-1, keepdim=True))
    assert torch.allclose(avg, ((a + b) / 2).expand(-1, -1, 8, 8), atol=1e-6)


def test_views_are_weighted_equally_whatever_their_magnitude():
    """A Grad-CAM's magnitude shrinks as 1/(h·w) of the view: a toy whose maps scale that way must
    average to the same maps as a toy whose maps do not."""
    x = torch.rand(1, 3, 16, 16)

    def pooled(model, x, layers, size):
        cam = F.interpolate(x[:, :2] / (x.shape[-1] * x.shape[-2]), size=size, mode="bilinear", align_corners=False)
        return {layer: cam for layer in layers}

    a = averaged_gradcam(None, x, ("bn7",), (16, 16), scales=(1.0, 2.0), gradcam=pooled)["bn7"]
    b = averaged_gradcam(None, x, ("bn7",), (16, 16), scales=(1.0, 2.0), gradcam=_pixelwise_cams)["bn7"]
    assert torch.allclose(a, b, atol=1e-5)


def test_averaged_gradcam_with_one_view_is_the_plain_gradcam():
    torch.manual_seed(0)
    model = ResNet38Classifier(3, width=0.0625).eval()
    x = torch.rand(2, 3, 32, 32)
    plain = multi_layer_gradcam(model, x, ("b4_5", "b5_2", "bn7"), size=(40, 40))
    same = averaged_gradcam(model, x, ("b4_5", "b5_2", "bn7"), (40, 40))
    labels = torch.tensor([[1, 0, 1], [0, 1, 1]]).bool()
    white = torch.rand(2, 40, 40) > 0.8
    for layer in plain:
        flat = plain[layer].flatten(1)
        lo = flat.min(1).values.view(-1, 1, 1, 1)
        hi = flat.max(1).values.view(-1, 1, 1, 1)
        assert torch.allclose(same[layer], (plain[layer] - lo) / (hi - lo), atol=1e-6)
        # and the pseudo-masks made from either are the same, bit for bit
        for rule in ("ours", "reference"):
            assert torch.equal(fuse_pseudo_mask(plain[layer], labels, white, 4, rule),
                               fuse_pseudo_mask(same[layer], labels, white, 4, rule))


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


def test_compose_mosaic_by_hand():
    images = [np.full((4, 6, 3), i, np.uint8) for i in range(4)]
    masks = [np.full((2, 4, 6), 10 + i, np.uint8) for i in range(4)]
    image, mask = augment_mosaic(images, masks, (1, 4))
    expected = np.array([[0, 0, 0, 0, 1, 1]] + [[2, 2, 2, 2, 3, 3]] * 3)
    assert np.array_equal(image[..., 0], expected) and np.array_equal(image[..., 2], expected)
    assert np.array_equal(mask[0], expected + 10) and np.array_equal(mask[1], expected + 10)


def test_mosaic_items_carry_exactly_their_source_patches_labels(tmp_path):
    """Each quadrant of a mosaic comes from one single-class patch; its mask pixels are that class
    (or background where that patch's pseudo-mask says so), never another class."""
    from wsss.data.datasets import InputNorm
    from wsss.data.layout import TrainSample
    from wsss.data.png import write_mask, write_rgb
    from wsss.data.seg_datasets import PseudoMaskDataset
    from wsss.data.specs import LUAD

    samples, paths = [], []
    rng = np.random.default_rng(0)
    for i in range(8):
        cls = i % 4
        label = tuple(int(c == cls) for c in range(4))
        path = tmp_path / "train" / f"p{i}-[{' '.join(map(str, label))}].png"
        path.parent.mkdir(exist_ok=True)
        image = np.full((16, 16, 3), 40 * cls + 20, np.uint8)  # the class is readable from the colour
        write_rgb(path, image)
        pm = np.full((16, 16), cls, np.uint8)
        pm[rng.random((16, 16)) < 0.2] = 4  # some background
        pm_path = tmp_path / "PM" / f"{path.stem}.png"
        pm_path.parent.mkdir(exist_ok=True)
        write_mask(pm_path, pm, LUAD.flat_palette())
        samples.append(TrainSample(path, label))
        paths.append([pm_path])
    # a two-class patch never goes into a mosaic
    two = tmp_path / "train" / "two-[1 1 0 0].png"
    write_rgb(two, np.full((16, 16, 3), 250, np.uint8))
    write_mask(tmp_path / "PM" / "two.png", np.zeros((16, 16), np.uint8), LUAD.flat_palette())
    samples.append(TrainSample(two, (1, 1, 0, 0)))
    paths.append([tmp_path / "PM" / "two.png"])

    data = PseudoMaskDataset(samples, paths, None, InputNorm(), LUAD, augment=True, mosaic=1.0)
    assert data.single == list(range(8))
    torch.manual_seed(0)
    quadrant_classes = set()
    for _ in range(20):
        image, masks = data._mosaic((16, 16))
        cls_of_pixel = (image[..., 0].astype(int) - 20) // 40  # which patch each pixel came from
        assert image[..., 0].max() < 250  # the two-class patch is never used
        assert ((masks[0] == cls_of_pixel) | (masks[0] == 4)).all()
        quadrant_classes.add((int(cls_of_pixel[0, 0]), int(cls_of_pixel[-1, -1])))
    assert len(quadrant_classes) > 4  # quadrants really come from different patches
    # and the items handed to training are mosaics of the right shape and value range
    x, masks, _ = data[8]
    assert x.shape == (3, 16, 16) and masks.shape == (1, 16, 16) and set(masks.unique().tolist()) <= {0, 1, 2, 3, 4}
