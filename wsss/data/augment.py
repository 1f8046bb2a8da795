"""Training-time augmentation shared by both stages: geometric (flips, 90° rotations) and stain.

Every random draw comes from torch's global RNG, which the DataLoader seeds per worker and the
training loops reseed per epoch, so a resumed run sees the same augmentations.

Stain augmentation follows Tellez et al. (2018, "H&E stain augmentation improves generalization of
convolutional networks for histopathological mitosis detection"): the image is unmixed into
haematoxylin, eosin and residual optical densities with Ruifrok & Johnston's (2001) H&E-DAB
vectors, each stain's density is scaled by ``1 + U(-σ, σ)`` and shifted by ``U(-σ, σ)``, and the
result is mixed back. Unlike a hue/saturation jitter it moves colours the way staining and scanning
differences do. It is written out here (a 3×3 matrix and a logarithm) rather than taken from
scikit-image, whose ``rgb2hed``/``hed2rgb`` would add a large dependency for two lines of algebra.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from wsss.data.stain import FitFailed, LabStatistics, StainNorm

GEOMETRIC = ("flip", "d4")
"""``flip``: horizontal and vertical flips, p = 0.5 each (the reference's stage 1). ``d4``: also a
random multiple of 90° rotation, i.e. all eight symmetries of the square (tissue has no "up")."""

# Rows: haematoxylin, eosin, DAB optical-density directions (Ruifrok & Johnston 2001), normalised.
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_STAINS = _STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True)
_UNMIX = np.linalg.inv(_STAINS)


def _uniform(low: float, high: float, n: int) -> np.ndarray:
    return (low + (high - low) * torch.rand(n, dtype=torch.float64)).numpy()


def geometric(arrays: list[np.ndarray], mode: str) -> list[np.ndarray]:
    """The same random flip/rotation of each ``(H, W, ...)`` array (an image and its masks).

    ``mode`` is ``flip`` (left-right, then up-down, each p = 0.5) or ``d4`` (also ``k·90°``, k uniform
    in 0..3; a square patch keeps its shape).
    """
    if mode not in GEOMETRIC:
        raise ValueError(f"unknown geometric augmentation {mode!r}")
    if torch.rand(()) < 0.5:
        arrays = [a[:, ::-1] for a in arrays]
    if torch.rand(()) < 0.5:
        arrays = [a[::-1] for a in arrays]
    if mode == "d4":
        k = int(torch.randint(0, 4, ()))
        if k:
            arrays = [np.rot90(a, k, axes=(0, 1)) for a in arrays]
    return [np.ascontiguousarray(a) for a in arrays]


def stain_jitter(image: np.ndarray, strength: float) -> np.ndarray:
    """HED stain augmentation of an ``(H, W, 3)`` uint8 image; ``strength`` σ (0: unchanged)."""
    if strength <= 0:
        return image
    return hed_jitter(image, strength, strength)


def hed_jitter(image: np.ndarray, scale: float, shift: float) -> np.ndarray:
    """Tellez's HED augmentation of an ``(H, W, 3)`` uint8 image with separate strengths: each stain's
    density (haematoxylin, eosin, residual) times ``1 + U(-scale, scale)`` plus ``U(-shift, shift)``."""
    od = -np.log(np.maximum(image.astype(np.float64), 1.0) / 255.0)  # optical density, ≥ 0
    hed = od.reshape(-1, 3) @ _UNMIX
    alpha = 1.0 + _uniform(-scale, scale, 3)
    beta = _uniform(-shift, shift, 3)
    hed = hed * alpha + beta
    rgb = 255.0 * np.exp(-(hed @ _STAINS))
    return np.clip(rgb, 0, 255).round().astype(np.uint8).reshape(image.shape)


@dataclass(frozen=True)
class ColourAugment:
    """Stain and scanner augmentation beyond ``--stain-jitter`` (0 turns each part off; nothing is drawn
    from the RNG for a part that is off, so runs without them are those of earlier versions).

    ``hed_scale``/``hed_shift``: :func:`hed_jitter`. ``lab``: RandStainNA (Shen et al., MICCAI 2022):
    the patch gets Reinhard-transferred to LAB statistics drawn around the training set's
    (``lab_stats``: the mean and spread over training patches of each patch's LAB channel means and
    standard deviations; ``lab`` multiplies the spread, 1 = the training set's own). ``light``:
    brightness and contrast ``× (1 + U(-light, light))``, gamma ``exp(U(-light, light))``. ``blur``:
    with p = 0.5 a Gaussian blur of σ ~ U(0, blur) px. ``jpeg``: with p = 0.5 a JPEG round trip at a
    quality ~ U(jpeg, 95).
    """

    hed_scale: float = 0.0
    hed_shift: float = 0.0
    lab: float = 0.0
    light: float = 0.0
    blur: float = 0.0
    jpeg: int = 0
    lab_stats: LabStatistics | None = None

    @property
    def active(self) -> bool:
        return bool(self.hed_scale or self.hed_shift or self.lab or self.light or self.blur or self.jpeg)


def colour(image: np.ndarray, aug: ColourAugment | None) -> np.ndarray:
    """``image`` (H, W, 3) uint8 through the parts of ``aug`` that are on, in the order a slide meets
    them: staining (HED, LAB), light, optics (blur), compression (JPEG)."""
    if aug is None or not aug.active:
        return image
    if aug.hed_scale or aug.hed_shift:
        image = hed_jitter(image, aug.hed_scale, aug.hed_shift)
    if aug.lab:
        image = lab_jitter(image, aug.lab_stats, aug.lab)
    if aug.light:
        image = light_jitter(image, aug.light)
    if aug.blur:
        image = blur_jitter(image, aug.blur)
    if aug.jpeg:
        image = jpeg_jitter(image, aug.jpeg)
    return image


def lab_jitter(image: np.ndarray, stats: LabStatistics | None, spread: float) -> np.ndarray:
    """RandStainNA: a Reinhard transfer of ``image`` to LAB means and standard deviations drawn from
    normal distributions around the training set's (``stats``), their spread times ``spread``. A patch
    with too little stain (mostly glass) stays as it is (its six draws are still made)."""
    if stats is None:
        raise ValueError("lab_jitter needs the training set's LAB statistics")
    z = torch.randn(6, dtype=torch.float64).numpy()
    mean = np.asarray(stats.mean_of_means) + spread * z[:3] * np.asarray(stats.std_of_means)
    std = np.asarray(stats.mean_of_stds) + spread * z[3:] * np.asarray(stats.std_of_stds)
    std = np.maximum(std, 0.25 * np.asarray(stats.mean_of_stds))  # a draw far in the tail must not flatten the patch
    target = StainNorm("reinhard", lab_mean=tuple(mean.tolist()), lab_std=tuple(std.tolist()))
    try:
        return target.transform(image)
    except FitFailed:
        return image


def light_jitter(image: np.ndarray, strength: float) -> np.ndarray:
    """Gamma ``exp(U(-s, s))`` on [0, 1], then contrast about the mean and brightness, each
    ``× (1 + U(-s, s))``, of an ``(H, W, 3)`` uint8 image."""
    gamma, contrast, brightness = _uniform(-strength, strength, 3)
    x = (image.astype(np.float64) / 255.0) ** np.exp(gamma)
    x = (x - x.mean()) * (1.0 + contrast) + x.mean()
    x = x * (1.0 + brightness)
    return np.clip(np.rint(255.0 * x), 0, 255).astype(np.uint8)


def blur_jitter(image: np.ndarray, sigma: float) -> np.ndarray:
    """With p = 0.5, a Gaussian blur of σ ~ U(0, sigma) px (PIL) of an ``(H, W, 3)`` uint8 image."""
    p, s = _uniform(0.0, 1.0, 2)
    if p >= 0.5:
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).filter(ImageFilter.GaussianBlur(float(s * sigma))))


def jpeg_jitter(image: np.ndarray, min_quality: int) -> np.ndarray:
    """With p = 0.5, a JPEG round trip (PIL) at a quality uniform in ``[min_quality, 95]``."""
    p, q = _uniform(0.0, 1.0, 2)
    if p >= 0.5:
        return image
    quality = int(min_quality + q * (95 - min_quality + 1))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=min(quality, 95))
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()


__all__ = ["GEOMETRIC", "ColourAugment", "colour", "geometric", "hed_jitter", "stain_jitter"]
