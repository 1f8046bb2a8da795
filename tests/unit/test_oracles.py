"""Independent oracles: every expected value here is worked by hand or computed from the
definition with torch/numpy primitives, never with ``wsss`` functions (STYLE rule 10).

The reference is WSSS-Tissue (ChuHan89/WSSS-Tissue); the file and function each oracle follows
is named in its test. Models needed as oracles are written out in ``tests/reference_nets.py``
with the reference's names.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reference_nets import (
    RefNetCAM,
    random_reference_state,
    reference_deeplab_forward,
    reference_deeplab_shapes,
    reference_gradcam,
    resize_bilinear,
)
from wsss.models import loading
from wsss.cam.cam import cam_to_segmentation
from wsss.cam.gradcam import fuse_pseudo_mask, multi_layer_gradcam
from wsss.config import STAGE1_PRESETS, STAGE2_PRESETS, Stage1Config, Stage2Config, resolve
from wsss.data.background import white_mask
from wsss.gate import gate_logits
from wsss.losses import build_multi_mask_loss, reference_multi_mask_loss
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus, load_deeplab_weights, map_reference_keys
from wsss.models.resnet38 import ResNet38Classifier
from wsss.models.weights import load_stage1_weights, mxnet_to_psa_names, read_mxnet_params
from wsss.stages import stage1, stage2

BG = 4  # white background / not evaluated, both datasets

# --------------------------------------------------------------------------- 1. Grad-CAM


def reference_resnet38(seed: int = 0) -> RefNetCAM:
    """Reference-named ResNet38 at 1/8 width with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = RefNetCAM(4, divisor=8)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net


def test_gradcam_equals_the_reference_per_image_class_and_layer():
    """tool/gradcam.py + infer_fun.create_pseudo_mask: for each image, class and layer, hook the
    layer output (bn7: after its ReLU), backpropagate logit_c, α = mean_xy gradient,
    cam = Σ α_k A_k with no ReLU, bilinear resize (cv2, half-pixel centres) to the patch."""
    ref = reference_resnet38()
    ours = ResNet38Classifier(4, width=0.125)
    ours.load_state_dict(ref.state_dict(), strict=True)  # the reference's names, one for one
    ref, ours = ref.double().eval(), ours.double().eval()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    got = multi_layer_gradcam(ours, x, size=(32, 32))
    negative = 0
    for layer in ("b4_5", "b5_2", "bn7"):
        assert got[layer].shape == (2, 4, 32, 32)
        for b in range(2):
            for c in range(4):
                cam = reference_gradcam(ref, x[b : b + 1].clone(), layer, c)
                assert cam.shape == (4, 4)
                expected = resize_bilinear(cam, (32, 32))
                scale = np.abs(expected).max()
                np.testing.assert_allclose(got[layer][b, c].numpy(), expected, rtol=0, atol=1e-10 * scale,
                                           err_msg=f"{layer} image {b} class {c}")
                negative += int((expected < 0).any())
    assert negative > 0, "some maps must have negative values, or a ReLU would go unnoticed"


# --------------------------------------------------------------------------- 2. fusion, white mask

# One image row of six pixels, four classes, labels [0 1 0 1] (classes 1 and 3 present).
# Raw Grad-CAMs: the global minimum is -6, the maximum 20, so normalised = (raw + 6) / 26.
#   p0: unlabelled class 0 holds the maximum (1.0 after normalising); class 1 (12/26) beats 3 (11/26).
#   p1: both labelled classes at the global minimum: every labelled score is exactly 0.
#   p2: white; class 1 at the maximum, exactly 1.0: the background's 1.000001 still wins.
#   p3: white; both labelled classes 0.
#   p4: class 3 (14/26) beats class 1 (8/26).
#   p5: class 0 (unlabelled) holds the minimum; classes 1 and 3 tie at 2/26 > 0.
FUSION_CAMS = torch.tensor([
    [20.0, 3.0, 0.0, 0.0, 0.0, -6.0],
    [6.0, -6.0, 20.0, -6.0, 2.0, -4.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [5.0, -6.0, 0.0, -6.0, 8.0, -4.0],
])
FUSION_WHITE = torch.tensor([False, False, True, True, False, False])


@pytest.mark.parametrize("rule,luad,bcss", [
    # ours: argmax over labelled classes (+ LUAD background); ties → lowest labelled class.
    ("ours", [1, 1, BG, BG, 3, 1], [1, 1, 1, 1, 3, 1]),
    # reference (infer_utils.dict2npy + np.argmax): unlabelled classes score 0 and the BCSS
    # background channel is 0, so where every labelled class is 0 class 0 wins (p1, and p3 for BCSS).
    ("reference", [1, 0, BG, BG, 3, 1], [1, 0, 1, 0, 3, 1]),
])
def test_fusion_hand_worked(rule, luad, bcss):
    # Image 2 is image 1 × 10 with classes 0↔1 and 2↔3 swapped, labels [1 0 1 0]: normalising per
    # image gives the same maps, and the lowest index is now labelled, so both rules agree.
    cams = torch.stack([FUSION_CAMS, FUSION_CAMS[[1, 0, 3, 2]] * 10])[:, :, None, :]  # (2, 4, 1, 6)
    labels = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    white = FUSION_WHITE.expand(2, 1, 6)
    got = fuse_pseudo_mask(cams, labels, white, BG, tie_rule=rule)
    assert got[:, 0].tolist() == [luad, [0, 0, BG, BG, 2, 0]]
    got = fuse_pseudo_mask(cams, labels, None, BG, tie_rule=rule)
    assert got[:, 0].tolist() == [bcss, [0, 0, 0, 0, 2, 0]]


def cv2_grey(r: int, g: int, b: int) -> int:
    """cv2.cvtColor(RGB2GRAY) on uint8, the reference's gen_bg_mask: (4899R + 9617G + 1868B + 2^13) >> 14."""
    return (4899 * r + 9617 * g + 1868 * b + 8192) >> 14


def test_white_mask_hand_built_image():
    """infer_utils.gen_bg_mask: grey (cv2) > 200, then skimage remove_small_objects(min_size=50,
    connectivity=1): 4-connected white blobs of fewer than 50 pixels are not background."""
    tissue, white, grey200 = (150, 100, 180), (201, 201, 201), (200, 200, 200)
    # Colours at the threshold where ITU-R 601 roundings disagree; cv2 decides:
    # (229, 182, 221): cv2 3293185 >> 14 = 201 (white); (299R + 587G + 114B + 500) // 1000 = 200.
    # (79, 252, 254): cv2 3293169 >> 14 = 200 (not white); the /1000 rounding and PIL give 201.
    pink, cyan = (229, 182, 221), (79, 252, 254)
    assert [cv2_grey(*c) for c in (tissue, white, grey200, pink, cyan)] == [124, 201, 200, 201, 200]
    img = np.empty((24, 24, 3), dtype=np.uint8)
    img[:] = tissue
    expected = np.zeros((24, 24), dtype=bool)
    img[0:5, 0:10] = white  # 50 px: exactly min_size, kept
    expected[0:5, 0:10] = True
    img[0:7, 13:20] = white  # 49 px: removed
    img[8:13, 0:6] = white  # two 30 px blobs touching only at a corner: 4-connectivity keeps them apart
    img[13:18, 6:12] = white
    img[8:20, 14:19] = grey200  # 60 px of grey 200: not above the threshold
    img[19:24, 0:12] = pink  # 60 px, cv2 grey 201: background
    expected[19:24, 0:12] = True
    img[20:24, 13:24] = cyan  # 44 px + 6 px above: 50 px of cv2 grey 200, never white
    img[18:20, 19:22] = cyan
    img[8:12, 20:24] = white  # 16 px: removed
    got = white_mask(img)
    assert got.dtype == bool and got.shape == (24, 24)
    np.testing.assert_array_equal(got, expected)


def test_white_mask_threshold_uses_cv2_luma_on_large_blobs():
    """A whole 8×8 image of one colour is background exactly when cv2's grey value exceeds 200."""
    for colour, is_white in [((229, 182, 221), True), ((79, 252, 254), False), ((201, 200, 200), False),
                             ((200, 201, 201), True), ((255, 255, 255), True), ((90, 253, 220), False)]:
        assert (cv2_grey(*colour) > 200) == is_white, colour
        img = np.empty((8, 8, 3), dtype=np.uint8)
        img[:] = colour
        assert white_mask(img).all() == is_white and white_mask(img).any() == is_white, colour


# --------------------------------------------------------------------------- 3. stage-2 reference loss


def hand_ce(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over pixels whose target is not 255 of −log softmax(full)[target]: (B, K, H, W), (B, H, W)."""
    shift = full.amax(dim=1, keepdim=True)
    log_prob = full - shift - torch.log(torch.exp(full - shift).sum(dim=1, keepdim=True))
    valid = target != 255
    picked = log_prob.gather(1, torch.where(valid, target, 0)[:, None]).squeeze(1)
    return -(picked * valid).sum() / valid.sum()


def hand_reference_loss(logits: torch.Tensor, masks: torch.Tensor, weights=(0.6, 0.2, 0.2)) -> torch.Tensor:
    """3_train_stage2.py: output = cat(logits, 100 · (PM_bn7 == 4)); tool/loss.py CrossEntropyLoss
    (ignore_index 255, size_average) then loss /= n; 0.6·CE(bn7) + 0.2·CE(b5_2) + 0.2·CE(b4_5).
    With 4 classes the appended logit is channel 4, so target value 4 names it directly."""
    n = logits.shape[0]
    extra = 100.0 * (masks[:, 0] == 4).to(logits.dtype)[:, None]
    full = torch.cat([logits, extra], dim=1)
    return sum(w * hand_ce(full, masks[:, i].long()) / n for i, w in enumerate(weights))


def random_masks(seed: int) -> torch.Tensor:
    """(3, 3, 8, 8): PM_bn7, PM_b5_2, PM_b4_5 drawn independently from 0..4 (so they disagree about
    background), some pixels 255 in each mask; bn7 marks background in every image."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, 5, (3, 3, 8, 8), generator=g)
    masks[torch.rand(masks.shape, generator=g) < 0.1] = 255
    masks[:, 0, 0, :4] = 4
    return masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_loss_equals_hand_log_softmax(seed):
    masks = random_masks(seed)
    bn7_bg = masks[:, 0] == 4
    assert bn7_bg.any() and ((masks[:, 2] == 4) != bn7_bg).any() and ((masks[:, 1] == 4) != bn7_bg).any()
    g = torch.Generator().manual_seed(100 + seed)
    logits = (torch.randn(3, 4, 8, 8, generator=g) * 3).requires_grad_(True)
    logits64 = logits.detach().double().requires_grad_(True)
    expected = hand_reference_loss(logits64, masks)
    got = reference_multi_mask_loss(logits, masks, (0.6, 0.2, 0.2), background_index=4)
    assert abs(got.item() - expected.item()) < 1e-6
    got_built = build_multi_mask_loss("ce", "reference", (0.6, 0.2, 0.2), 4)(logits, masks)
    assert abs(got_built.item() - expected.item()) < 1e-6
    # The gradient is what trains: the same from both.
    got.backward()
    expected.backward()
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-5, atol=1e-8)


def test_reference_loss_one_pixel_by_hand():
    # logits ln 1, ln 2, ln 3, ln 4 (softmax weights 1, 2, 3, 4).
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).view(1, 4, 1, 1)
    # PM_bn7 = 2 (tissue): appended logit 0, weight e^0 = 1, total weight 11.
    #   CE(bn7 = 2) = ln(11/3); CE(b5_2 = 4, the appended class) = ln 11; CE(b4_5 = 0) = ln 11.
    masks = torch.tensor([2, 4, 0]).view(1, 3, 1, 1)
    expected = 0.6 * math.log(11 / 3) + 0.2 * math.log(11) + 0.2 * math.log(11)
    assert reference_multi_mask_loss(logits, masks, (0.6, 0.2, 0.2), 4).item() == pytest.approx(expected, abs=1e-12)
    # The same pixel twice in a batch of 2: the mean is unchanged, then divided by n = 2.
    two = reference_multi_mask_loss(logits.expand(2, 4, 1, 1), masks.expand(2, 3, 1, 1), (0.6, 0.2, 0.2), 4)
    assert two.item() == pytest.approx(expected / 2, abs=1e-12)
    # PM_bn7 = 4 (background): appended logit 100, total weight 10 + e^100.
    #   CE(bn7 = 4) = ln(1 + 10 e^-100) ≈ 0; CE(b5_2 = 1) = ln(10 + e^100) − ln 2;
    #   CE(b4_5 = 2) = ln(10 + e^100) − ln 3 (these masks disagree with PM_bn7 and still train).
    masks = torch.tensor([4, 1, 2]).view(1, 3, 1, 1)
    big = 100 + math.log1p(10 * math.exp(-100))
    expected = 0.6 * math.log1p(10 * math.exp(-100)) + 0.2 * (big - math.log(2)) + 0.2 * (big - math.log(3))
    assert reference_multi_mask_loss(logits, masks, (0.6, 0.2, 0.2), 4).item() == pytest.approx(expected, abs=1e-12)
    # A 255 pixel is ignored: two pixels, the second ignored in every mask, equal one pixel.
    pair = torch.cat([logits, torch.zeros_like(logits)], dim=3)
    masks2 = torch.cat([masks, torch.full_like(masks, 255)], dim=3)
    assert reference_multi_mask_loss(pair, masks2, (0.6, 0.2, 0.2), 4).item() == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- 4. gate


def test_gate_reference_and_mask_hand_worked():
    # Image 0: p = (0.9, 0.05, 0.5) → class 1 rejected. Image 1: p = (0.05, 0.02, 0.1) → all
    # rejected (0.1 is not > 0.1); its most probable class is 2.
    probs = torch.tensor([[0.9, 0.05, 0.5], [0.05, 0.02, 0.1]])
    logits = torch.tensor([
        [[[-2.0, 1.0]], [[-1.0, 5.0]], [[-3.0, 0.5]]],  # pixel a: kept logits negative; pixel b: positive
        [[[3.0, -1.0]], [[1.0, 2.0]], [[-1.0, 0.0]]],
    ])  # (2, 3, 1, 2)
    ref = gate_logits(logits, probs, 0.1, "reference")
    # logits × (p > 0.1): image 0 class 1 → 0; image 1 → all 0.
    expected_ref = torch.tensor([
        [[[-2.0, 1.0]], [[0.0, 0.0]], [[-3.0, 0.5]]],
        [[[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]],
    ])
    assert torch.equal(ref, expected_ref)
    # argmax, first maximum: pixel a → the rejected class 1 (0 > −2); pixel b → 0; image 1 → 0.
    assert ref.argmax(dim=1)[:, 0].tolist() == [[1, 0], [0, 0]]
    masked = gate_logits(logits, probs, 0.1, "mask")
    inf = float("inf")
    expected_mask = torch.tensor([
        [[[-2.0, 1.0]], [[-inf, -inf]], [[-3.0, 0.5]]],
        [[[-inf, -inf]], [[-inf, -inf]], [[-1.0, 0.0]]],  # all rejected: the most probable class kept
    ])
    assert torch.equal(masked, expected_mask)
    assert masked.argmax(dim=1)[:, 0].tolist() == [[0, 0], [2, 2]]


# --------------------------------------------------------------------------- 5. optimisers


def _paper_stage1() -> Stage1Config:
    return resolve(Stage1Config, STAGE1_PRESETS, "paper", dataset="luad", data=Path("data"))


def _paper_stage2() -> Stage2Config:
    return resolve(Stage2Config, STAGE2_PRESETS, "paper", dataset="luad", data=Path("data"))


def test_presets_give_the_reference_recipes():
    paper = _paper_stage1()
    # tool/torchutils.PolyOptimizer passes weight_decay as SGD's positional momentum.
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.head_lr_mult) == (0.01, 0.0005, 5e-4, 10.0)
    assert resolve(Stage1Config, STAGE1_PRESETS, "cpu", dataset="luad", data=Path("data")).momentum == 0.9
    # 3_train_stage2.py defaults.
    s2 = _paper_stage2()
    assert (s2.lr, s2.momentum, s2.weight_decay, s2.head_lr_mult) == (0.01, 0.9, 5e-4, 10.0)


def fixed_grads(params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}


def hand_sgd(params: dict[str, torch.Tensor], grads: list[dict], lr_of, wd_of, momentum: float) -> dict:
    """torch.optim.SGD (dampening 0, no Nesterov) from its definition, with per-step lr_of(name, t):
    d = g + wd·p; buf = d at the first step, else momentum·buf + d; p ← p − lr·buf."""
    p = {n: v.clone() for n, v in params.items()}
    buf: dict[str, torch.Tensor] = {}
    for t, grad in enumerate(grads):
        for n in p:
            d = grad[n] + wd_of(n) * p[n]
            buf[n] = d if t == 0 else momentum * buf[n] + d
            p[n] = p[n] - lr_of(n, t) * buf[n]
    return p


def run_optimizer(model: nn.Module, optimizer, scheduler, grads: list[dict], lr_of) -> None:
    """The training loop's order: set gradients, optimizer.step(), scheduler.step(); the lr each
    parameter's group holds before step t must be lr_of(name, t)."""
    named = dict(model.named_parameters())
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for t, grad in enumerate(grads):
        for n, p in named.items():
            assert group_of[id(p)]["lr"] == pytest.approx(lr_of(n, t), rel=1e-12), (n, t)
            p.grad = grad[n].clone()
        optimizer.step()
        scheduler.step()


MAX_STEPS = 10
STEPS = 3


def poly(t: int) -> float:
    """PolyOptimizer / LR_Scheduler 'poly': lr multiplier (1 − step/max_step)^0.9 before step ``step``."""
    return (1 - t / MAX_STEPS) ** 0.9


def test_stage1_sgd_groups_poly_and_momentum_from_the_definition():
    torch.manual_seed(0)
    model = ResNet38Classifier(3, width=0.125)
    # A head with a bias (the reference's fc8 has none) so that all four groups are exercised.
    model.fc8 = nn.Conv2d(model.fc8.in_channels, 3, 1, bias=True)
    model = model.double()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _paper_stage1()
    optimizer, scheduler = stage1.build_optimizer(model, cfg, MAX_STEPS)

    # 1_train_stage1.py groups: backbone weights lr, decay 5e-4 · backbone biases 2 lr, no decay ·
    # head (fc8) weights 10 lr, decay · head biases 20 lr, no decay; momentum 0.0005.
    def mult(n):
        head, bias = n.startswith("fc8."), n.endswith(".bias")
        return {(False, False): 1, (False, True): 2, (True, False): 10, (True, True): 20}[(head, bias)]

    def lr_of(n, t):
        return 0.01 * mult(n) * poly(t)

    def wd_of(n):
        return 0.0 if n.endswith(".bias") else 5e-4

    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    for n, p in model.named_parameters():
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        assert group["weight_decay"] == wd_of(n) and group["momentum"] == 0.0005, n
    grads = [fixed_grads(start, t) for t in range(STEPS)]
    run_optimizer(model, optimizer, scheduler, grads, lr_of)
    expected = hand_sgd(start, grads, lr_of, wd_of, 0.0005)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-13, msg=n)


def test_stage1_pretrained_freeze_optimises_what_the_reference_optimises():
    # resnet38_cls.Net.get_parameter_groups: the weights of Conv2d modules that require grad; with
    # ImageNet weights every BatchNorm and conv1a, b2, b2_1, b2_2 are fixed.
    model = ResNet38Classifier(4, width=0.125)
    model.freeze_pretrained()
    optimizer, _ = stage1.build_optimizer(model, _paper_stage1(), MAX_STEPS)
    frozen_blocks = {"conv1a", "b2", "b2_1", "b2_2"}
    names = dict(model.named_parameters())
    expected = {n for n in names if n.endswith(".weight") and n.split(".")[0] not in frozen_blocks
                and (n.split(".")[-2].startswith("conv_branch") or n == "fc8.weight")}
    got = {n for n, p in names.items() for g in optimizer.param_groups for q in g["params"] if q is p}
    assert got == expected
    assert "b3.conv_branch1.weight" in got and "bn7.weight" not in got and "b2_2.conv_branch2a.weight" not in got


def test_stage2_sgd_groups_poly_and_momentum_from_the_definition():
    # 3_train_stage2.py: backbone params at lr, ASPP + decoder at 10 lr; SGD momentum 0.9, weight
    # decay 5e-4 on every parameter; tool/lr_scheduler 'poly' sets lr·(1 − T/N)^0.9 before each step.
    torch.manual_seed(0)
    model = DeepLabV3Plus(DeepLabArch("resnet18", 16, 4, 8)).double()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer, scheduler = stage2.build_optimizer(model, _paper_stage2(), MAX_STEPS)

    def lr_of(n, t):
        return 0.01 * (1 if n.startswith("backbone.") else 10) * poly(t)

    for g in optimizer.param_groups:
        assert g["momentum"] == 0.9 and g["weight_decay"] == 5e-4
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    grads = [fixed_grads(start, t) for t in range(STEPS)]
    run_optimizer(model, optimizer, scheduler, grads, lr_of)
    expected = hand_sgd(start, grads, lr_of, lambda n: 5e-4, 0.9)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-13, msg=n)


# --------------------------------------------------------------------------- 6. DeepLab key map


@pytest.fixture(scope="module")
def reference_deeplab_file(tmp_path_factory):
    """A checkpoint as the reference saves it: {'state_dict': DeepLab(resnet, OS 16, 4 classes)},
    every tensor named and shaped as the reference's network/*.py define them, distinct values."""
    shapes = reference_deeplab_shapes(num_classes=4)
    state = random_reference_state(shapes)
    path = tmp_path_factory.mktemp("deeplab") / "stage2_checkpoint_trained_on_luad.pth"
    torch.save({"state_dict": state, "optimizer": {}}, path)
    yield path, shapes, state
    path.unlink()  # 240 MB: not left behind in pytest's kept temporary folders


def test_every_reference_key_maps_to_exactly_one_of_our_tensors(reference_deeplab_file):
    path, shapes, state = reference_deeplab_file
    # stem 6 · 33 bottlenecks × 18 + 4 downsamples × 6 · ASPP 4 × 6 + pool 6 + projection 6 ·
    # decoder 6 + last_conv 14
    assert len(shapes) == 6 + 33 * 18 + 4 * 6 + 24 + 6 + 6 + 6 + 14 == 680
    model = DeepLabV3Plus(DeepLabArch("resnet101", 16, 4, 256))
    ours = model.state_dict()
    mapped_names = {ref: next(iter(map_reference_keys({ref: state[ref]}))) for ref in shapes}
    assert len(set(mapped_names.values())) == len(shapes), "two reference keys map to one tensor"
    assert set(mapped_names.values()) == set(ours), "every tensor of ours is fed by exactly one reference key"
    for ref, our in mapped_names.items():
        assert tuple(ours[our].shape) == shapes[ref], (ref, our)
    report = load_deeplab_weights(model, path)
    assert not report.missing and not report.unexpected and not report.shape_mismatch
    loaded = model.state_dict()
    for ref, our in mapped_names.items():
        assert torch.equal(loaded[our], state[ref]), (ref, our)
    # A few by name, from the reference's module definitions.
    assert torch.equal(model.aspp.convs[2][0].weight, state["aspp.aspp3.atrous_conv.weight"])
    assert torch.equal(model.decoder.classifier.bias, state["decoder.last_conv.8.bias"])


def test_reference_checkpoint_computes_what_the_reference_computes(reference_deeplab_file):
    """Our model with the reference's weights (through load_segmenter, which also infers the
    architecture) equals the reference's forward written from its named tensors."""
    path, _, state = reference_deeplab_file
    loaded = loading.load_segmenter(path, 4)
    model = loaded.model.double().eval()
    torch.manual_seed(3)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    s64 = {k: (v.double() if v.is_floating_point() else v) for k, v in state.items()}
    with torch.no_grad():
        expected = reference_deeplab_forward(s64, x)
        got = model(x)["out"]
    assert got.shape == expected.shape == (2, 4, 64, 64)
    scale = expected.abs().max().item()
    assert 0 < scale < 1e6
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9 * scale)


# --------------------------------------------------------------------------- 7. MXNet reader

# MXNet NDArray-list format (src/ndarray/ndarray.cc), little-endian, written here byte by byte.
V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
DTYPE_CODE = {np.dtype("<f4"): 0, np.dtype("<f8"): 1, np.dtype("<f2"): 2}


def mx_record(array: np.ndarray, version: str) -> bytes:
    shape = array.shape
    if version == "legacy":  # u32 ndim, u32 dims
        head = struct.pack("<I", len(shape)) + b"".join(struct.pack("<I", d) for d in shape)
    else:  # magic, [i32 storage type 0 for V2/V3], i32 ndim, i64 dims
        magic = {"v1": V1, "v2": V2, "v3": V3}[version]
        head = struct.pack("<I", magic) + (b"" if version == "v1" else struct.pack("<i", 0))
        head += struct.pack("<i", len(shape)) + b"".join(struct.pack("<q", d) for d in shape)
    dev = struct.pack("<i", 1) + struct.pack("<i", 0)  # cpu, device 0
    code = struct.pack("<i", DTYPE_CODE[array.dtype])
    return head + dev + code + array.astype(array.dtype.newbyteorder("<")).tobytes()


def mx_file(items: list[tuple[str, np.ndarray, str]]) -> bytes:
    out = struct.pack("<Q", 0x112) + struct.pack("<Q", 0) + struct.pack("<Q", len(items))
    out += b"".join(mx_record(a, v) for _, a, v in items)
    out += struct.pack("<Q", len(items))
    for name, _, _ in items:
        raw = name.encode()
        out += struct.pack("<Q", len(raw)) + raw
    return out


# MXNet name → (PSA name, shape in the 1/8-width ResNet38 with 4 classes, record version, dtype).
# The rule (network/resnet38d.convert_mxnet_to_torch): res<stage><a|bN>_<branch>_weight →
# b<stage>[_N].conv_<branch>.weight; bn… gamma/beta/moving_mean/moving_var →
# bn_<branch>.weight/bias/running_mean/running_var; bn7_* → bn7.*; linear1000 dropped.
MX_TABLE = {
    "arg:conv1a_weight": ("conv1a.weight", (8, 3, 3, 3), "v2", "<f4"),
    "arg:res2a_branch1_weight": ("b2.conv_branch1.weight", (16, 8, 1, 1), "v1", "<f4"),
    "arg:bn2a_branch2b1_gamma": ("b2.bn_branch2b1.weight", (16,), "legacy", "<f4"),
    "arg:res4b3_branch2a_weight": ("b4_3.conv_branch2a.weight", (64, 64, 3, 3), "v2", "<f2"),
    "arg:bn4b3_branch2a_beta": ("b4_3.bn_branch2a.bias", (64,), "v3", "<f4"),
    "aux:bn5b2_branch2b1_moving_mean": ("b5_2.bn_branch2b1.running_mean", (64,), "v1", "<f2"),
    "aux:bn6a_branch2b2_moving_var": ("b6.bn_branch2b2.running_var", (128,), "legacy", "<f2"),
    "arg:res7a_branch2b2_weight": ("b7.conv_branch2b2.weight", (512, 256, 1, 1), "v2", "<f4"),
    "arg:bn7_gamma": ("bn7.weight", (512,), "v2", "<f8"),
    "arg:bn7_beta": ("bn7.bias", (512,), "v1", "<f4"),
    "aux:bn7_moving_mean": ("bn7.running_mean", (512,), "legacy", "<f4"),
    "aux:bn7_moving_var": ("bn7.running_var", (512,), "v2", "<f2"),
    "arg:linear1000_weight": (None, (1000, 512), "v2", "<f4"),
    "arg:linear1000_bias": (None, (1000,), "v1", "<f4"),
}


def mx_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) + (1.5 if "moving_var" in name else 0)).astype(dtype)
            for name, (_, shape, _, dtype) in MX_TABLE.items()}


def test_mxnet_reader_reads_hand_written_records_exactly(tmp_path):
    arrays = mx_arrays()
    path = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    path.write_bytes(mx_file([(n, arrays[n], MX_TABLE[n][2]) for n in MX_TABLE]))
    got = read_mxnet_params(path)
    assert list(got) == list(MX_TABLE)
    for name, array in arrays.items():
        assert got[name].dtype == array.dtype.newbyteorder("="), name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_mxnet_names_map_the_psa_way_and_load(tmp_path):
    arrays = mx_arrays(1)
    renamed = mxnet_to_psa_names(arrays)
    expected_names = {psa for psa, *_ in MX_TABLE.values() if psa is not None}
    assert set(renamed) == expected_names
    for mx_name, (psa, *_rest) in MX_TABLE.items():
        if psa is not None:
            np.testing.assert_array_equal(renamed[psa].numpy(), arrays[mx_name], err_msg=mx_name)
    # Through the file and the loader into the 1/8-width model.
    path = tmp_path / "imagenet.params"
    path.write_bytes(mx_file([(n, arrays[n], MX_TABLE[n][2]) for n in MX_TABLE]))
    model = ResNet38Classifier(4, width=0.125)
    report = load_stage1_weights(model, path)
    assert report.imagenet and set(report.loaded) == expected_names
    assert not report.unexpected and not report.shape_mismatch
    state = model.state_dict()
    for mx_name, (psa, *_rest) in MX_TABLE.items():
        if psa is not None:  # f16/f64 values are exact in float32 or rounded once
            np.testing.assert_array_equal(state[psa].numpy(), arrays[mx_name].astype(np.float32), err_msg=mx_name)


# --------------------------------------------------------------------------- 8. CAM evaluation


def test_cam_to_segmentation_hand_worked():
    # tool/infer_fun.infer: classes with p ≤ 0.25 multiplied by 0; joint min-max over the four maps;
    # kept classes copied into zeros (infer_utils.dict2npy); np.argmax, first maximum.
    # Image 0: p = (0.2, 0.9, 0.25, 0.6): classes 1 and 3 kept (0.25 is not > 0.25).
    # CAMs (ReLU'd, ≥ 0) over four pixels; after gating min 0, max 4:
    #   class 1 → [2, 0, 4, 1] / 4, class 3 → [1, 0, 3, 2] / 4.
    cams0 = torch.tensor([
        [5.0, 5.0, 9.0, 0.0],  # rejected: its 9 must not set the maximum
        [2.0, 0.0, 4.0, 1.0],
        [7.0, 1.0, 1.0, 1.0],  # rejected
        [1.0, 0.0, 3.0, 2.0],
    ])
    # Image 1: p = (0.1, 0.2, 0.05, 0.25): nothing kept; its most probable class is 3.
    cams1 = torch.rand(4, 4) + 0.5
    # Image 2: p = (0.1, 0.9, 0.1, 0.9), every CAM ≥ 1. Gating first makes the minimum 0, so at
    # pixels 0 and 2 the kept classes 1 and 3 score 1/2 each (not 0): class 1 there, as everywhere.
    cams2 = torch.tensor([
        [3.0, 3.0, 3.0, 3.0],
        [1.0, 2.0, 1.0, 2.0],
        [3.0, 3.0, 3.0, 3.0],
        [1.0, 1.0, 1.0, 1.0],
    ])
    cams = torch.stack([cams0, cams1, cams2])[:, :, None, :]  # (3, 4, 1, 4)
    probs = torch.tensor([[0.2, 0.9, 0.25, 0.6], [0.1, 0.2, 0.05, 0.25], [0.1, 0.9, 0.1, 0.9]])
    # Image 0, pixel 1: every kept class scores 0. Reference: all four zero → class 0 (not kept).
    # Ours: ties among kept classes → the lowest kept class, 1. Image 1, nothing kept: the
    # reference normalises 0/0 (NaN; np.argmax → 0): class 0; ours: the most probable class, 3.
    ref = cam_to_segmentation(cams, probs, 0.25, tie_rule="reference")
    assert ref[:, 0].tolist() == [[1, 0, 1, 3], [0, 0, 0, 0], [1, 1, 1, 1]]
    ours = cam_to_segmentation(cams, probs, 0.25, tie_rule="ours")
    assert ours[:, 0].tolist() == [[1, 1, 1, 3], [3, 3, 3, 3], [1, 1, 1, 1]]
