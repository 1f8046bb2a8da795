"""Stain and scanner augmentation (--hed-scale/--hed-shift, --lab-jitter, --light-jitter, --blur-jitter,
--jpeg-jitter): each part against its definition with the same random draws, nothing drawn when a
part is off, and the options reaching both training stages' datasets; the presets turn on blur
(stage 1) and JPEG (stage 2) only."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.config import STAGE1_PRESETS, STAGE2_PRESETS
from wsss.data import augment, synth
from wsss.data.augment import ColourAugment
from wsss.data.stain import LabStatistics
from colour_oracle import srgb_to_lab

OPTIONS = ("hed_scale", "hed_shift", "lab_jitter", "light_jitter", "blur_jitter", "jpeg_jitter")
STATS = LabStatistics((60.0, 20.0, -10.0), (5.0, 3.0, 2.0), (12.0, 7.0, 6.0), (2.0, 1.0, 1.0))


def tissue(seed: int = 0, size: int = 64) -> np.ndarray:
    return synth.make_patch(np.random.default_rng(seed), size)[0]


def draws(seed: int, n: int) -> np.ndarray:
    """The first ``n`` U(0, 1) draws of torch's RNG after ``manual_seed(seed)``, as float64."""
    torch.manual_seed(seed)
    return torch.rand(n, dtype=torch.float64).numpy()


def test_nothing_is_drawn_or_changed_when_every_part_is_off():
    image = tissue()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert augment.colour(image, ColourAugment()) is image and augment.colour(image, None) is image
    assert torch.equal(torch.get_rng_state(), state)


def test_hed_jitter_scales_and_shifts_each_stain_density_by_its_draws():
    image = tissue()
    torch.manual_seed(3)
    out = augment.hed_jitter(image, 0.3, 0.05)
    u = draws(3, 6)
    alpha, beta = 1 + (-0.3 + 0.6 * u[:3]), -0.05 + 0.1 * u[3:]
    # Ruifrok & Johnston's H, E, DAB OD vectors (rows), unit length; OD = -ln(I / 255)
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    hed = -np.log(np.maximum(image.reshape(-1, 3), 1) / 255.0) @ np.linalg.inv(stains)
    expected = np.clip(255 * np.exp(-((hed * alpha + beta) @ stains)), 0, 255).round().reshape(image.shape)
    assert np.abs(out.astype(int) - expected).max() <= 1
    torch.manual_seed(3)
    jitter = augment.stain_jitter(image, 0.2)
    torch.manual_seed(3)
    assert np.array_equal(jitter, augment.hed_jitter(image, 0.2, 0.2))  # --stain-jitter s: scale = shift = s


def test_light_jitter_is_gamma_then_contrast_then_brightness():
    image = tissue(1)
    torch.manual_seed(5)
    out = augment.light_jitter(image, 0.2)
    g, c, b = -0.2 + 0.4 * draws(5, 3)
    x = (image / 255.0) ** np.exp(g)
    x = (x - x.mean()) * (1 + c) + x.mean()
    expected = np.clip(np.rint(255 * x * (1 + b)), 0, 255)
    assert np.array_equal(out, expected.astype(np.uint8))


def test_lab_jitter_gives_the_patch_the_drawn_lab_statistics():
    image = tissue(2)
    torch.manual_seed(7)
    out = augment.lab_jitter(image, STATS, 1.0)
    torch.manual_seed(7)
    z = torch.randn(6, dtype=torch.float64).numpy()
    mean = np.array(STATS.mean_of_means) + z[:3] * np.array(STATS.std_of_means)
    std = np.array(STATS.mean_of_stds) + z[3:] * np.array(STATS.std_of_stds)
    lab = srgb_to_lab(out).reshape(-1, 3)
    np.testing.assert_allclose(lab.mean(axis=0), mean, atol=1.0)
    np.testing.assert_allclose(lab.std(axis=0), std, rtol=0.15)
    glass = np.full((32, 32, 3), 250, np.uint8)
    assert augment.lab_jitter(glass, STATS, 1.0) is glass


@pytest.mark.parametrize("part", ["blur", "jpeg"])
def test_blur_and_jpeg_happen_half_the_time_as_pil_does_them(part):
    from PIL import ImageFilter

    image = tissue(3)
    applied = 0
    for seed in range(200):
        torch.manual_seed(seed)
        out = augment.blur_jitter(image, 2.0) if part == "blur" else augment.jpeg_jitter(image, 30)
        p, s = draws(seed, 2)
        expected = image
        if p < 0.5:
            applied += 1
            if part == "blur":  # sigma ~ U(0, 2)
                expected = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(float(2.0 * s))))
            else:  # quality ~ U{30, ..., 95}
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="JPEG", quality=min(int(30 + s * 66), 95))
                expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        assert np.array_equal(out, expected)
    assert 80 < applied < 120


def test_options_reach_both_stages_and_the_presets_turn_on_blur_and_jpeg_only(synth16, tmp_path, capsys, monkeypatch):
    from helpers import run_cli
    from wsss.stages import common

    for stage, presets in (("stage1", STAGE1_PRESETS), ("stage2", STAGE2_PRESETS)):
        for name, values in presets.items():
            # cpu and best: blur for the gate's classifier, JPEG for the segmenter (docs/stain.md)
            turned_on = {} if name not in ("cpu", "best") else (
                {"blur_jitter": 1.0} if stage == "stage1" else {"jpeg_jitter": 40})
            assert {k: v for k, v in values.items() if k in {*OPTIONS, "stain_target"}} == turned_on, name
            # the only stain normalisation a preset turns on: one that trains exactly as none
            assert values.get("stain_norm", "none") == ("reinhard-set" if name in ("cpu", "best") else "none")
    seen = []
    original = common.input_pipeline

    def recording(cfg, paths, state, fitted=None):
        seen.append(original(cfg, paths, state, fitted))
        return seen[-1]

    monkeypatch.setattr("wsss.stages.stage1.input_pipeline", recording)
    options = ["--hed-scale", 0.2, "--hed-shift", 0.03, "--lab-jitter", 1, "--light-jitter", 0.1, "--blur-jitter", 1,
               "--jpeg-jitter", 40]
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", synth16, "--preset",
                           "cpu", "--image-size", 32, "--epochs", 1, "--out", tmp_path / "s1", "--device", "cpu",
                           *options)
    assert code == 0, err
    colour = seen[0].colour
    assert (colour.hed_scale, colour.hed_shift, colour.lab, colour.light, colour.blur, colour.jpeg) == (
        0.2, 0.03, 1.0, 0.1, 1.0, 40)
    assert colour.lab_stats is not None and colour.lab_stats.patches == 16
    assert seen[0].norm.stain.method == "reinhard-set"  # the preset's, and it trains as none: shift zero
    assert seen[0].norm.stain.set_shift == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("option, value, fragment", [
    ("--hed-scale", 2, "--hed-scale must be in"), ("--lab-jitter", -1, "--lab-jitter must be in"),
    ("--jpeg-jitter", 99, "--jpeg-jitter is the lowest JPEG quality"), ("--blur-jitter", 9, "--blur-jitter must be in"),
])
def test_bad_augmentation_strengths_are_one_line(synth16, tmp_path, capsys, monkeypatch, option, value, fragment):
    from helpers import run_cli

    code, _, err = run_cli(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", synth16,
                           "--out", tmp_path / "o", option, value)
    assert code == 1 and fragment in err and err.count("\n") == 1
