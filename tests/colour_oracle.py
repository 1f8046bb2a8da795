"""Colour oracles for the stain tests, from the definitions (not from wsss or torchstain): the mean
haematoxylin and eosin optical densities of a synthetic patch, and CIE L*a*b* of sRGB."""

from __future__ import annotations

import numpy as np

from wsss.data import synth


def stain_od(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean optical density (2,) of haematoxylin and eosin over the tissue pixels: Beer-Lambert
    OD = -ln((I + 1) / 256) of each pixel, unmixed by least squares onto the generator's H and E vectors."""
    od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)[mask.ravel() != 4]
    vectors = np.stack([synth._H_VEC, synth._E_VEC], axis=1)
    return np.linalg.lstsq(vectors, od.T, rcond=None)[0].mean(axis=1)


def srgb_to_lab(image: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of ``(..., 3)`` uint8 sRGB, from the definitions (IEC 61966-2-1, CIE 1976)."""
    c = image.astype(np.float64) / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)
