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

import numpy as np
import torch

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
    od = -np.log(np.maximum(image.astype(np.float64), 1.0) / 255.0)  # optical density, ≥ 0
    hed = od.reshape(-1, 3) @ _UNMIX
    alpha = 1.0 + _uniform(-strength, strength, 3)
    beta = _uniform(-strength, strength, 3)
    hed = hed * alpha + beta
    rgb = 255.0 * np.exp(-(hed @ _STAINS))
    return np.clip(rgb, 0, 255).round().astype(np.uint8).reshape(image.shape)


__all__ = ["GEOMETRIC", "geometric", "stain_jitter"]
