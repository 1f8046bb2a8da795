"""Synthetic H&E patches written in the LUAD-HistoSeg layout.

Real LUAD-HistoSeg / BCSS-WSSS data cannot be downloaded on our machines, so every test and
``make reproduce`` run on patches made here. Each patch is a layout of 1-3 irregular tissue regions
(classes TE, NEC, LYM, TAS in LUAD order) plus optional white background, rendered with
Beer-Lambert haematoxylin/eosin optical densities. The classes differ by *texture* (nuclear size,
density, shape, fibre orientation) while per-patch stain variation makes their mean colours
overlap, so a colour-only classifier fails and a small CNN has to learn texture.

Layout written by :func:`generate`::

    OUT/train/synth-000123-[1 0 0 1].png      RGB patch, label = classes covering >= 2 %
    OUT/train_gt/synth-000123-[1 0 0 1].png   its palette mask (never read by training)
    OUT/val/img/synth-val-000012.png          + OUT/val/mask/<same name>
    OUT/test/img/synth-test-000012.png        + OUT/test/mask/<same name>
    OUT/synth.json                            the settings, look and label counts (written last)
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from wsss.data.labels import format_label
from wsss.data.png import write_class_mask, write_mask, write_rgb
from wsss.data.specs import LUAD, DatasetSpec
from wsss.data.tasks import Task, render
from wsss.errors import WsssError
from wsss.runtime import atomic_path

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SUMMARY_NAME = "synth.json"
"""Written last into the output folder: the summary of :func:`generate` (its settings and look)."""
_SPLIT_KEY = {"train": 0, "val": 1, "test": 2}
_REF_SIZE = 224.0  # all lengths below are in pixels of a 224-px patch and scale with `size`
REFERENCE_MPP = 1.0
"""µm/px of the textures on a 224-px patch (LUAD-HistoSeg's 10×: lymphocyte nuclei about 5 µm across)."""

# Macenko-style reference optical-density vectors (RGB) of haematoxylin and eosin.
_H_VEC = np.array([0.5626, 0.7201, 0.4062])
_E_VEC = np.array([0.2159, 0.8012, 0.5581])



@dataclass(frozen=True)
class Look:
    """How the patches look, so that a model can be tested on data it was not tuned to.

    ``stain_scale`` multiplies the haematoxylin and eosin optical densities (below 1: paler, weaker
    staining); ``hue_shift`` rotates both stain OD vectors by that many degrees about the grey axis
    (another hue of H and E); ``texture_scale`` multiplies every length of the class textures
    (nuclei, fibres, their spacing: a higher magnification); ``pale`` is the probability that a tissue
    region is rendered pale: its eosin fades to a tenth over blotches covering about a third of it
    (nuclei keep about half their density), so parts of it cross the white-glass rule (grey > 200)
    while the true masks still call it tissue. The defaults are the generator's usual look.

    The scanner and staining fields change colour and sharpness only, never the tissue: ``h_hue`` and
    ``e_hue`` rotate one stain's OD vector further (degrees; negative turns haematoxylin bluer and
    eosin purpler), ``h_scale`` and ``e_scale`` multiply one stain's density, ``brightness`` multiplies
    the transmitted light (below 1: a darker scan, glass included), ``blur`` is the σ in px (at 224 px)
    of a Gaussian blur of the scanned light, and ``jpeg`` the quality of a JPEG round trip (0: none).
    They draw no random numbers, so a patch of any such look shows the same tissue and mask as the
    default look's patch of the same seed.
    """

    stain_scale: float = 1.0
    hue_shift: float = 0.0
    texture_scale: float = 1.0
    pale: float = 0.0
    h_hue: float = 0.0
    e_hue: float = 0.0
    h_scale: float = 1.0
    e_scale: float = 1.0
    brightness: float = 1.0
    blur: float = 0.0
    jpeg: float = 0.0

    def __post_init__(self) -> None:
        if not 0.2 <= self.stain_scale <= 3.0:
            raise WsssError(f"--stain-scale must be in [0.2, 3], not {self.stain_scale:g}")
        if not -90.0 <= self.hue_shift <= 90.0:
            raise WsssError(f"--hue-shift must be in [-90, 90] degrees, not {self.hue_shift:g}")
        if not 0.5 <= self.texture_scale <= 2.5:
            raise WsssError(f"--texture-scale must be in [0.5, 2.5], not {self.texture_scale:g}")
        if not 0.0 <= self.pale <= 1.0:
            raise WsssError(f"--pale is a probability in [0, 1], not {self.pale:g}")
        for name in ("h_hue", "e_hue"):
            if not -90.0 <= getattr(self, name) <= 90.0:
                raise WsssError(f"{name} must be in [-90, 90] degrees, not {getattr(self, name):g}")
        for name in ("h_scale", "e_scale"):
            if not 0.2 <= getattr(self, name) <= 3.0:
                raise WsssError(f"{name} must be in [0.2, 3], not {getattr(self, name):g}")
        if not 0.5 <= self.brightness <= 1.5:
            raise WsssError(f"brightness must be in [0.5, 1.5], not {self.brightness:g}")
        if not 0.0 <= self.blur <= 5.0:
            raise WsssError(f"blur must be in [0, 5] px, not {self.blur:g}")
        if self.jpeg != 0 and not (5 <= self.jpeg <= 100 and self.jpeg == int(self.jpeg)):
            raise WsssError(f"jpeg must be 0 (none) or a quality from 5 to 100, not {self.jpeg:g}")

    def to_dict(self) -> dict:
        """The four original fields always, a scanner/staining field only when it is not its default: the
        records of the looks that existed before those fields (``synth.json``, manifests) stay as they were."""
        values = asdict(self)
        return {k: v for k, v in values.items() if k in _ORIGINAL_FIELDS or v != _DEFAULTS[k]}


_ORIGINAL_FIELDS = ("stain_scale", "hue_shift", "texture_scale", "pale")
_DEFAULTS = asdict(Look())


LOOKS: dict[str, Look] = {
    "default": Look(),
    # Clearly another lab and scanner: weaker stains of another hue (browner nuclei, more orange
    # eosin), 1.3x magnification, and pale regions that the white-glass rule partly takes for
    # background; the classes keep their textures.
    "shifted": Look(stain_scale=0.8, hue_shift=12.0, texture_scale=1.3, pale=0.3),
    # Stain and scanner looks: the same tissue and masks as the default look (no texture change, no
    # extra random draws), only colour, strength, light, sharpness and compression differ.
    # Another lab: bluer haematoxylin, purpler and weaker eosin, a darker, slightly blurred scan.
    "lab-b": Look(h_hue=-12.0, e_hue=-18.0, e_scale=0.75, brightness=0.9, blur=0.8),
    "pale": Look(stain_scale=0.7, brightness=1.05),  # weakly stained, brightly lit
    "dark": Look(stain_scale=1.5),  # strongly stained
    "jpeg": Look(jpeg=40),  # a scanner's JPEG at quality 40
    "blur": Look(blur=1.5),  # out of focus
}
STAIN_LOOKS = ("lab-b", "pale", "dark", "jpeg", "blur")
"""The looks that change stain or scanner only: the columns of the stain transfer matrix."""


def resolve_look(name: str = "default", **overrides: float | None) -> Look:
    """The named look (one of :data:`LOOKS`) with the options that are not None replacing its values."""
    if name not in LOOKS:
        raise WsssError(f"--look must be one of {', '.join(LOOKS)}, not {name!r}")
    values = {**LOOKS[name].to_dict(), **{k: float(v) for k, v in overrides.items() if v is not None}}
    return Look(**values)


# Per-class multipliers of the rendered (h, e) densities. They pull the class mean colours
# together so that only texture separates the classes; per-patch stain variation does the rest.
_CLASS_GAIN = {0: (1.05, 0.95), 1: (0.85, 1.2), 2: (1.3, 0.85), 3: (0.7, 1.05),
               4: (1.0, 1.0), 5: (0.8, 1.05), 6: (1.1, 0.95), 7: (0.9, 0.95), 8: (0.95, 1.0), 9: (0.75, 1.05),
               10: (0.9, 1.05), 11: (0.85, 1.05), 12: (1.1, 1.05), 13: (0.85, 1.0), 14: (1.0, 1.0), 15: (0.8, 1.0)}


# --------------------------------------------------------------------------------------------
# random fields and nuclei
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std random field ``(size, size)`` float32, correlated over ~``scale`` px.

    Isotropic case of :func:`_aniso_noise`.
    """
    return _aniso_noise(rng, size, size, scale, scale)


def _aniso_noise(
    rng: np.random.Generator, rows: int, cols: int, row_scale: float, col_scale: float
) -> np.ndarray:
    """Unit-std random field ``(rows, cols)`` float32 with separate correlation lengths per axis.

    Coarse white noise (one sample per ~scale/1.5 px), smoothed, then linearly upsampled: much
    cheaper than filtering full-resolution noise with a wide kernel. No BLAS matrix products:
    their threads oversubscribe the cores inside a process pool (measured 50x slower).
    """
    step = np.maximum([row_scale / 1.5, col_scale / 1.5], 0.5)
    shape = (int(np.ceil(rows / step[0])) + 4, int(np.ceil(cols / step[1])) + 4)
    coarse = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.5, mode="wrap")
    field = _lerp_rows(_lerp_rows(coarse, rows, step[0]).T, cols, step[1]).T
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def _lerp_rows(coarse: np.ndarray, n: int, step: float) -> np.ndarray:
    """Linearly resample the rows of ``coarse`` (R, C), one row per ``step`` px, to ``(n, C)``."""
    q = (np.arange(n) + 0.5) / step + 1.5
    i0 = q.astype(np.int64)
    f = (q - i0).astype(np.float32)[:, None]
    return coarse[i0] * (1.0 - f) + coarse[i0 + 1] * f


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates ``(size, size)`` float32 (cached; treat as read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _grid_points(
    rng: np.random.Generator, size: int, spacing: float, jitter: float, keep: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(N,), (N,)`` (row, col) of a jittered hexagonal lattice at a random angle.

    A lattice packs cells evenly like real tissue; jitter and rotation hide the regularity.
    """
    half = 0.75 * size + spacing
    g = np.arange(-half, half, spacing)
    gy, gx = np.meshgrid(g * 0.866, g, indexing="ij")  # hex rows are sqrt(3)/2 apart
    gx = gx + (np.arange(len(g))[:, None] % 2) * spacing / 2
    ang = rng.uniform(0, np.pi)
    y = gy.ravel() * np.cos(ang) - gx.ravel() * np.sin(ang) + size / 2
    x = gy.ravel() * np.sin(ang) + gx.ravel() * np.cos(ang) + size / 2
    y = y + rng.normal(0, jitter * spacing, y.shape)
    x = x + rng.normal(0, jitter * spacing, x.shape)
    inside = (y > -spacing) & (y < size + spacing) & (x > -spacing) & (x < size + spacing)
    inside &= rng.random(y.shape) < keep
    return y[inside], x[inside]


def _nuclei(
    size: int,
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    rough: np.ndarray,
    phase: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise N elliptical nuclei with irregular outlines.

    Args: centres ``cy, cx`` (N,), semi-axes ``a >= b`` (N,) px, major-axis angle ``theta`` (N,)
    from the column axis, outline roughness (N,) and its phase (N,).
    Returns ``ink`` (H, W) float32 in [0, 1] (anti-aliased coverage) and ``owner`` (H, W) int,
    the index of the nearest centre (-1 when N == 0). Each pixel belongs to its nearest centre,
    so touching nuclei are clipped against each other instead of overdrawn.
    """
    if len(cy) == 0:
        return np.zeros((size, size), np.float32), np.full((size, size), -1)
    pad = int(np.ceil(a.max())) + 2
    side = size + 2 * pad
    iy = np.clip(np.round(cy).astype(int) + pad, 0, side - 1)
    ix = np.clip(np.round(cx).astype(int) + pad, 0, side - 1)
    lab = np.zeros((side, side), np.int32)
    lab[iy, ix] = np.arange(1, len(cy) + 1)
    idx = ndimage.distance_transform_edt(lab == 0, return_distances=False, return_indices=True)
    owner = lab[idx[0], idx[1]][pad:-pad, pad:-pad] - 1
    cy, cx, a, b = (np.asarray(t, np.float32) for t in (cy, cx, a, b))
    yy, xx = _grid(size)
    dy, dx = yy - cy[owner], xx - cx[owner]
    ct, st = np.cos(theta).astype(np.float32)[owner], np.sin(theta).astype(np.float32)[owner]
    u, v = (dx * ct + dy * st) / a[owner], (-dx * st + dy * ct) / b[owner]
    # two low harmonics of the polar angle make lumpy, pleomorphic outlines
    phi, ph = np.arctan2(v, u), phase.astype(np.float32)[owner]
    lumps = 0.6 * np.sin(2.0 * phi + ph) + 0.5 * np.sin(3.0 * phi + 2.3 * ph)
    wobble = 1.0 + rough.astype(np.float32)[owner] * lumps
    r = np.sqrt(u * u + v * v) / wobble
    # (1 - r) * b is roughly the distance inside the edge in px: a 1-px soft edge.
    ink = np.clip((1.0 - r) * b[owner] + 0.5, 0.0, 1.0)
    return ink.astype(np.float32), owner


def _random_nuclei(
    rng: np.random.Generator,
    size: int,
    centres: tuple[np.ndarray, np.ndarray],
    radius: tuple[float, float],
    aspect: tuple[float, float],
    rough: tuple[float, float],
    theta: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei with semi-axis ``a ~ U(radius)``, ``b = a * U(aspect)``; see :func:`_nuclei`."""
    cy, cx = centres
    n = len(cy)
    a = rng.uniform(*radius, n)
    b = a * rng.uniform(*aspect, n)
    th = rng.uniform(0, np.pi, n) if theta is None else theta
    return _nuclei(size, cy, cx, a, b, th, rng.uniform(*rough, n), rng.uniform(0, 2 * np.pi, n))


def _per_nucleus(values: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Broadcast per-nucleus ``values`` (N,) to pixels through ``owner`` (H, W)."""
    if len(values) == 0:
        return np.zeros(owner.shape, np.float32)
    return values.astype(np.float32)[owner]


# --------------------------------------------------------------------------------------------
# class textures: each returns haematoxylin and eosin densities (h, e), both (size, size)
# --------------------------------------------------------------------------------------------

_Texture = Callable[[np.random.Generator, int, float], tuple[np.ndarray, np.ndarray]]
"""``texture(rng, size, zoom)``: ``zoom`` multiplies every length of the texture (nuclei, fibres,
spacings), so the patch shows ``1 / zoom**2`` as many cells."""


def _tumour(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """TE: sheets of large pleomorphic nuclei (r ~ 4-7 px) with pink cytoplasm between them."""
    s = size / _REF_SIZE * zoom
    centres = _grid_points(rng, size, rng.uniform(15, 18) * s, 0.22, keep=0.9)
    ink, owner = _random_nuclei(rng, size, centres, (4.2 * s, 7.0 * s), (0.6, 0.95), (0.04, 0.2))
    dark = _per_nucleus(rng.uniform(0.7, 1.1, len(centres[0])), owner)
    # vesicular chromatin: nuclei are mottled, with a darker rim than centre
    chrom = 1.0 + 0.18 * _smooth_noise(rng, size, 1.5 * s)
    rim = 1.0 - 0.25 * np.clip(ink - 0.6, 0, 1)
    membrane = _cell_borders(owner)
    cyto = 0.52 * (1.0 + 0.12 * _smooth_noise(rng, size, 8 * s)) + 0.12 * membrane
    h = 0.1 + ink * dark * chrom * rim
    e = cyto * (1.0 - 0.7 * ink) + 0.1 * ink
    return h, e


def _cell_borders(owner: np.ndarray) -> np.ndarray:
    """``(H, W)`` float32 in [0, 1]: soft lines where the nearest nucleus changes (cell borders)."""
    edge = np.zeros(owner.shape, bool)
    edge[1:, :] |= owner[1:, :] != owner[:-1, :]
    edge[:, 1:] |= owner[:, 1:] != owner[:, :-1]
    return ndimage.gaussian_filter(edge.astype(np.float32), 0.8) * 2.0


def _necrosis(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """NEC: smudgy amorphous eosinophilic background with scattered small nuclear debris."""
    s = size / _REF_SIZE * zoom
    # counts per patch fall with the square of the zoom: s * s / zoom**4 == (size / 224 / zoom) ** 2
    n_clusters = rng.poisson(22 * s * s / zoom**4) + 1
    ky, kx = rng.uniform(0, size, n_clusters), rng.uniform(0, size, n_clusters)
    per = rng.poisson(5, n_clusters) + 1
    spread = rng.normal(0, 5 * s, (2, per.sum()))
    n_free = rng.poisson(60 * s * s / zoom**4)
    cy = np.concatenate([np.repeat(ky, per) + spread[0], rng.uniform(0, size, n_free)])
    cx = np.concatenate([np.repeat(kx, per) + spread[1], rng.uniform(0, size, n_free)])
    ink, owner = _random_nuclei(rng, size, (cy, cx), (1.2 * s, 2.6 * s), (0.45, 1.0), (0.1, 0.35))
    dark = _per_nucleus(rng.uniform(0.6, 1.1, len(cy)), owner)
    smudge = 0.24 * np.clip(1.0 + 0.6 * _smooth_noise(rng, size, 18 * s), 0.1, None)
    blotch = 0.2 * _smooth_noise(rng, size, 7 * s) + 0.12 * _smooth_noise(rng, size, 30 * s)
    e = 0.58 * (1.0 + blotch)
    return smudge + ink * dark, e * (1.0 - 0.5 * ink)


def _lymphocytes(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """LYM: small (r ~ 2-3 px), dark, round nuclei packed tightly with little cytoplasm."""
    s = size / _REF_SIZE * zoom
    centres = _grid_points(rng, size, rng.uniform(6.8, 7.8) * s, 0.2, keep=0.93)
    ink, owner = _random_nuclei(rng, size, centres, (2.2 * s, 3.2 * s), (0.8, 1.0), (0.0, 0.08))
    dark = _per_nucleus(rng.uniform(0.85, 1.15, len(centres[0])), owner)
    e = 0.45 * (1.0 + 0.15 * _smooth_noise(rng, size, 6 * s))
    return 0.1 + ink * dark, e * (1.0 - 0.6 * ink)


def _stroma(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """TAS: wavy eosinophilic fibres along one random direction, sparse spindle nuclei."""
    s = size / _REF_SIZE * zoom
    fib, angle = _fibres(rng, size, s)
    cy, cx = _grid_points(rng, size, rng.uniform(22, 28) * s, 0.3, keep=0.7)
    theta = angle(cy, cx) + rng.normal(0, 0.12, len(cy))
    radius, aspect, rough = (6.0 * s, 10.0 * s), (0.2, 0.3), (0.0, 0.1)
    ink, owner = _random_nuclei(rng, size, (cy, cx), radius, aspect, rough, theta)
    dark = _per_nucleus(rng.uniform(0.75, 1.05, len(cy)), owner)
    # the gaps between fibres stay stained: real stroma rarely shows glass-white streaks
    e = 0.8 * (0.5 + 0.7 * fib) * (1.0 - 0.6 * ink)
    return 0.09 + 0.1 * fib + ink * dark, e


def _fibres(
    rng: np.random.Generator, size: int, s: float
) -> tuple[np.ndarray, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """Wavy fibre density ``(size, size)`` in [0, 1] and a function giving the local fibre angle.

    An axis-aligned anisotropic noise (short across, long along) is sampled through rotated and
    sinusoidally warped coordinates, so streaks follow one direction and undulate.
    """
    side = int(np.ceil(size * 1.5 + 20 * s))
    base = _aniso_noise(rng, side, side, rng.uniform(1.8, 2.4) * s, rng.uniform(14, 22) * s)
    th = rng.uniform(0, np.pi)
    amp, wave, ph = rng.uniform(2, 5) * s, rng.uniform(50, 110) * s, rng.uniform(0, 2 * np.pi)
    yy, xx = (g - size / 2 for g in _grid(size))
    u = xx * np.cos(th) + yy * np.sin(th)
    v = -xx * np.sin(th) + yy * np.cos(th) - amp * np.sin(2 * np.pi * u / wave + ph)
    v = v + 3.0 * s * _smooth_noise(rng, size, 25 * s)  # irregular waviness on top
    dens = ndimage.map_coordinates(base, [v + side / 2, u + side / 2], order=1, mode="reflect")
    fib = 1.0 / (1.0 + np.exp(-2.2 * dens))

    def angle(cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
        uc = (cx - size / 2) * np.cos(th) + (cy - size / 2) * np.sin(th)
        slope = amp * 2 * np.pi / wave * np.cos(2 * np.pi * uc / wave + ph)
        return th + np.arctan(slope)

    return fib.astype(np.float32), angle


# --------------------------------------------------------------------------------------------
# further textures, for dataset specs with more than four classes (class i gets _TEXTURES[i])
# --------------------------------------------------------------------------------------------


def _rotated(size: int, th: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates ``u`` (along direction ``th``) and ``v`` (across it) of every pixel, ``(size, size)``
    each, from the patch centre."""
    yy, xx = (g - size / 2 for g in _grid(size))
    return xx * np.cos(th) + yy * np.sin(th), -xx * np.sin(th) + yy * np.cos(th)


def _streaks(rng: np.random.Generator, size: int, th: float, across: float, along: float) -> np.ndarray:
    """Straight streaks along direction ``th``, ``(size, size)`` in [0, 1]: anisotropic noise with
    correlation lengths ``across`` and ``along`` px, seen through rotated coordinates."""
    side = int(np.ceil(size * 1.5 + 2 * along))
    base = _aniso_noise(rng, side, side, across, along)
    u, v = _rotated(size, th)
    dens = ndimage.map_coordinates(base, [v + side / 2, u + side / 2], order=1, mode="reflect")
    return (1.0 / (1.0 + np.exp(-2.2 * dens))).astype(np.float32)


def _nearest(size: int, cy: np.ndarray, cx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index ``(size, size)`` of the nearest of the points ``cy, cx`` (N,) and the distance to it in px."""
    pad = int(size // 2)
    side = size + 2 * pad
    lab = np.zeros((side, side), np.int32)
    iy = np.clip(np.round(cy).astype(int) + pad, 0, side - 1)
    ix = np.clip(np.round(cx).astype(int) + pad, 0, side - 1)
    lab[iy, ix] = np.arange(1, len(cy) + 1)
    dist, idx = ndimage.distance_transform_edt(lab == 0, return_indices=True)
    owner = lab[idx[0], idx[1]][pad:-pad, pad:-pad] - 1
    return owner, dist[pad:-pad, pad:-pad].astype(np.float32)


def _dots(size: int, cy: np.ndarray, cx: np.ndarray, radius: float) -> np.ndarray:
    """Round dots (nucleoli, granules) of ``radius`` px at ``cy, cx`` (N,): coverage ``(size, size)``."""
    n = len(cy)
    zeros = np.zeros(n)
    return _nuclei(size, cy, cx, np.full(n, radius), np.full(n, radius), zeros, zeros, zeros)[0]


def _glands(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """GLA: glands: a ring of tall nuclei pointing at the centre around a pale mucin-filled lumen,
    set in pink stroma."""
    s = size / _REF_SIZE * zoom
    gy, gx = _grid_points(rng, size, rng.uniform(44, 52) * s, 0.12, keep=0.9)
    if len(gy) == 0:
        gy, gx = np.array([size / 2]), np.array([size / 2])
    radius = rng.uniform(13, 18, len(gy)) * s
    owner, dist = _nearest(size, gy, gx)
    rel = dist / radius[owner]
    counts = np.maximum(6, np.round(2 * np.pi * radius / (5.5 * s))).astype(int)
    ang = np.concatenate([np.arange(n) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi) for n in counts])
    ring = np.repeat(0.9 * radius, counts)
    cy, cx = np.repeat(gy, counts) + ring * np.sin(ang), np.repeat(gx, counts) + ring * np.cos(ang)
    ink, nuc = _random_nuclei(rng, size, (cy, cx), (3.8 * s, 5.2 * s), (0.38, 0.55), (0.02, 0.12), ang)
    dark = _per_nucleus(rng.uniform(0.75, 1.05, len(cy)), nuc)
    lumen = np.clip((0.62 - rel) / 0.08, 0, 1)
    cyto = np.clip((1.2 - rel) / 0.1, 0, 1) * (1 - lumen)
    stroma = 0.62 * (1.0 + 0.12 * _smooth_noise(rng, size, 5 * s)) * (1 - lumen - cyto)
    e = (stroma + 0.55 * cyto + 0.38 * lumen) * (1.0 - 0.65 * ink)
    return 0.08 + 0.12 * lumen + ink * dark, e


def _muscle(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """MUS: smooth muscle: dense, evenly spaced cigar-shaped nuclei all along one direction in smooth,
    deeply eosinophilic cytoplasm (faint straight streaks, no wavy collagen)."""
    s = size / _REF_SIZE * zoom
    th = rng.uniform(0, np.pi)
    fib = _streaks(rng, size, th, 5.0 * s, 60.0 * s)
    cy, cx = _grid_points(rng, size, rng.uniform(13, 15) * s, 0.25, keep=0.85)
    theta = th + rng.normal(0, 0.06, len(cy))
    ink, owner = _random_nuclei(rng, size, (cy, cx), (7.0 * s, 10.0 * s), (0.17, 0.24), (0.0, 0.06), theta)
    dark = _per_nucleus(rng.uniform(0.8, 1.05, len(cy)), owner)
    halo = np.clip(2.0 * ndimage.gaussian_filter(ink, 2.0 * s) - ink, 0, 1)  # clear space around each nucleus
    e = 0.8 * (0.85 + 0.3 * fib) * (1.0 - 0.6 * ink) * (1.0 - 0.3 * halo)
    return 0.1 + 0.05 * fib + ink * dark, e


def _plasma(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """PLA: plasma-cell-rich infiltrate: medium round nuclei with coarse clumped chromatin, each set
    off-centre in its own pink cytoplasm."""
    s = size / _REF_SIZE * zoom
    cy, cx = _grid_points(rng, size, rng.uniform(11.5, 13.0) * s, 0.25, keep=0.88)
    shift = rng.normal(0, 2.2 * s, (2, len(cy)))
    ink, owner = _random_nuclei(rng, size, (cy + shift[0], cx + shift[1]), (3.2 * s, 4.2 * s), (0.8, 1.0), (0.02, 0.1))
    dark = _per_nucleus(rng.uniform(0.8, 1.1, len(cy)), owner)
    clumps = 1.0 + 0.35 * _smooth_noise(rng, size, 1.0 * s)
    e = 0.62 * (1.0 + 0.1 * _smooth_noise(rng, size, 6 * s)) * (1.0 - 0.65 * ink) + 0.1 * _cell_borders(owner)
    return 0.1 + ink * dark * clumps, e


def _myxoid(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """MYX: loose myxoid tissue: pale bluish ground substance with fine wispy strands and sparse small
    stellate nuclei."""
    s = size / _REF_SIZE * zoom
    wisp = np.clip(_smooth_noise(rng, size, 1.6 * s) - 0.6, 0, 1.5)
    cy, cx = _grid_points(rng, size, rng.uniform(28, 34) * s, 0.35, keep=0.75)
    ink, owner = _random_nuclei(rng, size, (cy, cx), (2.5 * s, 4.0 * s), (0.35, 0.6), (0.25, 0.4))
    dark = _per_nucleus(rng.uniform(0.75, 1.05, len(cy)), owner)
    return 0.2 + 0.12 * wisp + ink * dark, (0.4 + 0.3 * wisp) * (1.0 - 0.6 * ink)


def _giant(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """GIA: sheets of very large vesicular nuclei (r ~ 9-12 px, dark rim, pale centre, one dark
    nucleolus) in abundant pink cytoplasm."""
    s = size / _REF_SIZE * zoom
    cy, cx = _grid_points(rng, size, rng.uniform(27, 31) * s, 0.2, keep=0.85)
    ink, owner = _random_nuclei(rng, size, (cy, cx), (8.5 * s, 12.0 * s), (0.6, 0.9), (0.15, 0.3))
    dark = _per_nucleus(rng.uniform(0.75, 1.05, len(cy)), owner)
    vesicular = 0.4 + 0.6 * (1.0 - ndimage.gaussian_filter(ink, 3.0 * s) ** 4)
    nucleolus = _dots(size, cy, cx, 1.8 * s)
    e = 0.56 * (1.0 + 0.1 * _smooth_noise(rng, size, 8 * s)) * (1.0 - 0.6 * ink)
    return 0.1 + ink * dark * vesicular + 0.9 * nucleolus, e


def _woven(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """WOV: woven collagen: two crossing sets of straight fibres, few small round nuclei."""
    s = size / _REF_SIZE * zoom
    th = rng.uniform(0, np.pi)
    a = _streaks(rng, size, th, 2.0 * s, 24.0 * s)
    b = _streaks(rng, size, th + rng.uniform(1.1, 2.0), 2.0 * s, 24.0 * s)
    cy, cx = _grid_points(rng, size, rng.uniform(30, 38) * s, 0.35, keep=0.5)
    ink, owner = _random_nuclei(rng, size, (cy, cx), (2.5 * s, 3.5 * s), (0.7, 1.0), (0.0, 0.1))
    dark = _per_nucleus(rng.uniform(0.8, 1.05, len(cy)), owner)
    e = 0.8 * (0.35 + 0.45 * a + 0.45 * b) * (1.0 - 0.6 * ink)
    return 0.08 + 0.06 * (a + b) + ink * dark, e


def _palisade(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """PAL: palisades: nuclei lined up in parallel rows, each elongated across its row, with
    fibrillary pink bands between the rows."""
    s = size / _REF_SIZE * zoom
    th, gap, step = rng.uniform(0, np.pi), rng.uniform(13, 16) * s, rng.uniform(5.5, 6.5) * s
    half = 0.75 * size + gap
    rows, cols = np.meshgrid(np.arange(-half, half, gap), np.arange(-half, half, step), indexing="ij")
    v = rows.ravel() + rng.normal(0, 0.08 * gap, rows.size)
    u = cols.ravel() + rng.normal(0, 0.15 * step, rows.size)
    cy, cx = u * np.sin(th) + v * np.cos(th) + size / 2, u * np.cos(th) - v * np.sin(th) + size / 2
    inside = (cy > -gap) & (cy < size + gap) & (cx > -gap) & (cx < size + gap) & (rng.random(cy.shape) < 0.9)
    cy, cx = cy[inside], cx[inside]
    theta = th + np.pi / 2 + rng.normal(0, 0.1, len(cy))
    ink, owner = _random_nuclei(rng, size, (cy, cx), (5.0 * s, 7.0 * s), (0.3, 0.42), (0.0, 0.1), theta)
    dark = _per_nucleus(rng.uniform(0.8, 1.05, len(cy)), owner)
    _, across = _rotated(size, th)
    band = 0.5 - 0.5 * np.cos(2 * np.pi * (across - v.min()) / gap)  # 0 on the rows, 1 between them
    fib = _streaks(rng, size, th, 1.5 * s, 20.0 * s)
    e = (0.45 + 0.35 * band * (0.6 + 0.8 * fib)) * (1.0 - 0.6 * ink)
    return 0.1 + ink * dark, e


def _granular(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """GRA: granular cells: large polygonal cells packed with coarse eosinophilic granules, a small
    dark round nucleus each."""
    s = size / _REF_SIZE * zoom
    cy, cx = _grid_points(rng, size, rng.uniform(19, 22) * s, 0.2, keep=0.95)
    ink, owner = _random_nuclei(rng, size, (cy, cx), (2.8 * s, 3.6 * s), (0.8, 1.0), (0.0, 0.08))
    dark = _per_nucleus(rng.uniform(0.85, 1.1, len(cy)), owner)
    granules = np.clip(_smooth_noise(rng, size, 0.9 * s), 0, 2)
    e = (0.5 + 0.3 * granules + 0.12 * _cell_borders(owner)) * (1.0 - 0.65 * ink)
    return 0.1 + 0.04 * granules + ink * dark, e


def _nests(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """NES: tight balls of small dark nuclei scattered in smooth pale pink loose tissue."""
    s = size / _REF_SIZE * zoom
    n_balls = rng.poisson(16 * s * s / zoom**4) + 2
    ky, kx = rng.uniform(0, size, n_balls), rng.uniform(0, size, n_balls)
    per = rng.poisson(10, n_balls) + 4
    spread = rng.normal(0, 4.5 * s, (2, per.sum()))
    cy, cx = np.repeat(ky, per) + spread[0], np.repeat(kx, per) + spread[1]
    ink, owner = _random_nuclei(rng, size, (cy, cx), (2.4 * s, 3.4 * s), (0.7, 1.0), (0.05, 0.2))
    dark = _per_nucleus(rng.uniform(0.85, 1.15, len(cy)), owner)
    e = 0.48 * (1.0 + 0.06 * _smooth_noise(rng, size, 10 * s)) * (1.0 - 0.6 * ink)
    return 0.1 + ink * dark, e


def _whorls(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """WHO: whorls: concentric eosinophilic lamellae around scattered centres (like keratin pearls),
    flat nuclei lying along the rings."""
    s = size / _REF_SIZE * zoom
    gy, gx = _grid_points(rng, size, rng.uniform(40, 48) * s, 0.2, keep=0.95)
    if len(gy) == 0:
        gy, gx = np.array([size / 2]), np.array([size / 2])
    owner, dist = _nearest(size, gy, gx)
    rings = 0.5 + 0.5 * np.cos(2 * np.pi * dist / (rng.uniform(5.0, 6.0) * s))
    cy, cx = _grid_points(rng, size, rng.uniform(15, 18) * s, 0.3, keep=0.8)
    iy, ix = np.clip(np.round(cy).astype(int), 0, size - 1), np.clip(np.round(cx).astype(int), 0, size - 1)
    centre = owner[iy, ix]
    theta = np.arctan2(cy - gy[centre], cx - gx[centre]) + np.pi / 2  # tangential
    ink, nuc = _random_nuclei(rng, size, (cy, cx), (5.0 * s, 7.0 * s), (0.25, 0.35), (0.0, 0.08), theta)
    dark = _per_nucleus(rng.uniform(0.75, 1.0, len(cy)), nuc)
    e = (0.45 + 0.45 * rings) * (1.0 - 0.6 * ink)
    return 0.08 + ink * dark, e


def _clear_cells(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """CLE: clear cells: polygonal cells with pale, nearly empty cytoplasm, crisp membranes and a small
    dark central nucleus."""
    s = size / _REF_SIZE * zoom
    cy, cx = _grid_points(rng, size, rng.uniform(16, 19) * s, 0.2, keep=1.0)
    ink, owner = _random_nuclei(rng, size, (cy, cx), (2.4 * s, 3.2 * s), (0.75, 1.0), (0.0, 0.1))
    dark = _per_nucleus(rng.uniform(0.85, 1.1, len(cy)), owner)
    borders = np.clip(_cell_borders(owner), 0, 1)
    return 0.18 + 0.15 * borders + ink * dark, (0.4 + 0.5 * borders) * (1.0 - 0.6 * ink)


def _striated(rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """STM: striated muscle: broad parallel fibres with fine regular cross-striations, thin pale
    gaps between fibres and flat nuclei along the gaps."""
    s = size / _REF_SIZE * zoom
    th, width, period = rng.uniform(0, np.pi), rng.uniform(18, 24) * s, rng.uniform(3.2, 3.8) * s
    u, v = _rotated(size, th)
    phase = rng.uniform(0, 1)
    stripes = 0.5 + 0.5 * np.cos(2 * np.pi * u / period)
    edge = np.abs((v / width + phase) % 1.0 - 0.5) * width  # distance to the middle of the gap... mirrored
    gap = np.exp(-(((width / 2) - edge) / (1.2 * s)) ** 2)
    n_lines = int(np.ceil(1.5 * size / width)) + 2
    lines = (np.arange(n_lines) - n_lines // 2 - phase) * width
    along = rng.uniform(-0.75 * size, 0.75 * size, (n_lines, max(1, int(1.5 * size / (28 * s)))))
    vv, uu = np.repeat(lines, along.shape[1]), along.ravel()
    cy, cx = uu * np.sin(th) + vv * np.cos(th) + size / 2, uu * np.cos(th) - vv * np.sin(th) + size / 2
    theta = np.full(len(cy), th)
    ink, owner = _random_nuclei(rng, size, (cy, cx), (5.0 * s, 7.0 * s), (0.22, 0.3), (0.0, 0.06), theta)
    dark = _per_nucleus(rng.uniform(0.8, 1.05, len(cy)), owner)
    e = 0.78 * (0.72 + 0.28 * stripes) * (1.0 - 0.65 * gap) * (1.0 - 0.6 * ink)
    return 0.08 + ink * dark, e


_TEXTURES: tuple[_Texture, ...] = (
    _tumour, _necrosis, _lymphocytes, _stroma,  # LUAD order: a luad spec gets exactly the patches it always got
    _glands, _muscle, _plasma, _myxoid, _giant, _woven, _palisade, _granular, _nests, _whorls, _clear_cells,
    _striated,
)
MAX_CLASSES = len(_TEXTURES)
"""Class ``i`` of any spec is drawn with texture ``i``: specs of up to this many classes can be synthesised."""


# --------------------------------------------------------------------------------------------
# layout, staining, one patch
# --------------------------------------------------------------------------------------------


def _layout(rng: np.random.Generator, size: int, num_classes: int = 4, background: int = 4,
            min_region: float = 0.04) -> np.ndarray:
    """Region mask ``(size, size)`` uint8: 1-3 tissue classes (of ``0..num_classes-1``) and optional
    background (value ``background``).

    Voronoi cells of a few random seeds, computed on domain-warped coordinates so that borders
    are irregular; few seeds keep regions large (typically > 40 px across at 224 px): a region under
    ``min_region`` of the patch is merged into its neighbours.
    """
    k = rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25])
    classes = rng.choice(num_classes, size=min(k, num_classes), replace=False)
    seed_cls = np.concatenate([classes, rng.choice(classes, rng.integers(0, 3))])
    if rng.random() < 0.3:
        seed_cls = np.append(seed_cls, background)
    pts = rng.uniform(0, size, (len(seed_cls), 2))
    yy, xx = _grid(size)
    wy = yy + _warp(rng, size)
    wx = xx + _warp(rng, size)
    d2 = (wy[None] - pts[:, 0, None, None]) ** 2 + (wx[None] - pts[:, 1, None, None]) ** 2
    cell = np.argmin(d2, axis=0)
    # drop slivers (seeds near a border or squeezed by neighbours) so regions stay large
    area = np.bincount(cell.ravel(), minlength=len(seed_cls))
    big = area >= min_region * size * size
    if not big.all():
        big[np.argmax(area)] = True
        cell = np.flatnonzero(big)[np.argmin(d2[big], axis=0)]
    mask = seed_cls[cell].astype(np.uint8)
    if rng.random() < 0.2:
        mask[_lumens(rng, size)] = background
    return mask


def _lumens(rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean ``(size, size)``: a few small round holes (lumens, tears) inside tissue.

    Blobs under ~50 px at 224 are dropped: the pseudo-mask step treats such specks as tissue.
    """
    holes = _smooth_noise(rng, size, 0.07 * size) > rng.uniform(1.9, 2.4)
    blobs, n = ndimage.label(holes)
    area = np.bincount(blobs.ravel(), minlength=n + 1)
    keep = area >= 50 * (size / _REF_SIZE) ** 2
    keep[0] = False
    return keep[blobs]


def _warp(rng: np.random.Generator, size: int) -> np.ndarray:
    """Displacement field ``(size, size)`` px: broad bends plus finer wiggles of region borders."""
    coarse = 0.1 * size * _smooth_noise(rng, size, 0.2 * size)
    return coarse + 0.025 * size * _smooth_noise(rng, size, 0.06 * size)


def _stain(rng: np.random.Generator, h: np.ndarray, e: np.ndarray, look: Look = Look(), hue: float = 0.0,
           strength: float = 1.0) -> np.ndarray:
    """Beer-Lambert rendering of densities ``h, e`` (H, W) to RGB ``(H, W, 3)`` uint8.

    Stain vectors, stain strengths and section thickness vary per patch (like different labs,
    scanners and staining batches); that variation is what makes class mean colours overlap.
    ``look`` rotates the stain vectors and scales the optical density, and may dim, blur and
    JPEG-compress the scan (:class:`Look`); a random task adds its own ``hue`` (degrees) and
    ``strength`` (a multiplier of the density).
    """
    size = h.shape[0]
    h_vec = _unit(_hue_rotate(_H_VEC, look.hue_shift + hue + look.h_hue) + rng.normal(0, 0.05, 3)).astype(np.float32)
    e_vec = _unit(_hue_rotate(_E_VEC, look.hue_shift + hue + look.e_hue) + rng.normal(0, 0.05, 3)).astype(np.float32)
    thick = 1.0 + 0.08 * _smooth_noise(rng, size, size / 3)
    optics = 0.6 * size / _REF_SIZE  # slight optical blur, applied to densities (it is linear)
    h = ndimage.gaussian_filter(h, optics) * thick * np.float32(rng.uniform(0.7, 1.3))
    e = ndimage.gaussian_filter(e, optics) * thick * np.float32(rng.uniform(0.7, 1.35))
    if look.h_scale != 1.0 or look.e_scale != 1.0:
        h, e = h * np.float32(look.h_scale), e * np.float32(look.e_scale)
    od = (h[..., None] * h_vec + e[..., None] * e_vec) * np.float32(look.stain_scale * strength)
    light = 255.0 * np.exp(-od)
    if look.brightness != 1.0:
        light = light * np.float32(look.brightness)
    if look.blur > 0:  # the scanner's blur acts on light, before the sensor's noise
        light = ndimage.gaussian_filter(light, (look.blur * size / _REF_SIZE,) * 2 + (0,))
    rgb = light + 3.0 * rng.standard_normal(od.shape, dtype=np.float32)
    image = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return _jpeg(image, int(look.jpeg)) if look.jpeg else image


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` (H, W, 3) uint8 after a JPEG round trip at ``quality`` (Pillow, 4:2:0 chroma, as scanners)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()


def _hue_rotate(vec: np.ndarray, degrees: float) -> np.ndarray:
    """``vec`` (3,) rotated by ``degrees`` about the grey axis (1, 1, 1): its hue turns, its
    grey component (overall darkness) stays. Rodrigues' formula; 0 degrees returns ``vec`` itself."""
    if degrees == 0:
        return vec
    k = np.full(3, 1.0 / math.sqrt(3.0))
    t = math.radians(degrees)
    return vec * math.cos(t) + np.cross(k, vec) * math.sin(t) + k * (k @ vec) * (1.0 - math.cos(t))


def _pale_fade(rng: np.random.Generator, size: int) -> np.ndarray:
    """``(size, size)`` float32 in [0.1, 1]: 1 mostly, fading to 0.1 over broad blotches that
    cover about a third of the patch (where a smooth field falls below -0.45 std)."""
    field = _smooth_noise(rng, size, 0.12 * size)
    return np.clip(0.5 + 0.9 * field, 0.1, 1.0).astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.abs(v)
    return v / np.linalg.norm(v)


def make_patch(rng: np.random.Generator, size: int, look: Look = Look(),
               spec: DatasetSpec = LUAD, task: Task | None = None, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic H&E patch.

    Returns ``image`` (size, size, 3) uint8 RGB and ``mask`` (size, size) uint8 with the spec's
    tissue classes ``0..C-1`` and its background index on white glass. Class ``i`` is drawn with
    texture ``i`` (for luad TE, NEC, LYM, TAS), or with the ``i``-th appearance of a random ``task``
    (:mod:`wsss.data.tasks`). ``zoom`` multiplies every length of the textures on top of the look's
    (``2`` on a 112-px patch: the tissue at the pixel size of a 224-px patch, a quarter of its field).
    Pure given ``rng``; the default look and no task draw nothing extra from it, so luad patches are
    those of earlier versions.
    """
    check_synth_spec(spec)
    if task is not None and len(task.classes) != spec.num_classes:
        raise WsssError(f"the task has {len(task.classes)} classes, the {spec.name} spec {spec.num_classes}")
    mask = _layout(rng, size, spec.num_classes, spec.background_index,
                   0.04 if task is None else task.min_region)
    h = np.full((size, size), 0.015, np.float32)  # background: near-white glass
    e = np.full((size, size), 0.03, np.float32)
    scale = look.texture_scale * zoom
    for c in np.unique(mask):
        if c == spec.background_index:
            continue
        if task is None:
            hc, ec = _TEXTURES[c](rng, size, scale)
            gain_h, gain_e = _CLASS_GAIN[int(c)]
        else:
            hc, ec = render(task.classes[int(c)], rng, size, scale)
            gain_h, gain_e = 1.0, 1.0  # the appearance carries its own stain mix
        jitter = rng.uniform(0.85, 1.15, 2)  # regions within one slide differ a little too
        sel = mask == c
        h[sel] = (hc * gain_h * jitter[0])[sel]
        e[sel] = (ec * gain_e * jitter[1])[sel]
        if look.pale > 0 and rng.random() < look.pale:
            fade = _pale_fade(rng, size)
            h[sel] *= (0.45 + 0.55 * fade)[sel]  # nuclei stay visible: the texture still tells the class
            e[sel] *= fade[sel]
    if task is None:
        return _stain(rng, h, e, look), mask
    return _stain(rng, h, e, look, task.hue, task.stain), mask


def check_synth_spec(spec: DatasetSpec) -> None:
    """The generator has :data:`MAX_CLASSES` textures."""
    if spec.num_classes > MAX_CLASSES:
        raise WsssError(f"the synthetic generator has {MAX_CLASSES} distinct textures; "
                        f"the {spec.name} spec has {spec.num_classes} classes")


def patch_label(
    mask: np.ndarray, num_classes: int = 4, min_fraction: float = 0.02
) -> tuple[int, ...]:
    """Multi-hot label of a mask ``(H, W)``: class c is present when it covers ``>= min_fraction``
    of all pixels (background included in the denominator)."""
    counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
    return tuple(int(c >= min_fraction * mask.size) for c in counts)


# --------------------------------------------------------------------------------------------
# writing a data set
# --------------------------------------------------------------------------------------------


def patch_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG of one patch, derived from ``(seed, split, index)`` only (not from worker order)."""
    ss = np.random.SeedSequence(entropy=seed, spawn_key=(_SPLIT_KEY[split], index))
    return np.random.default_rng(ss)


def labelled_patch(
    rng: np.random.Generator, size: int, look: Look = Look(), spec: DatasetSpec = LUAD, task: Task | None = None,
    zoom: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """:func:`make_patch` redrawn until at least one tissue class covers >= 2 % of the patch.

    Returns ``image`` (size, size, 3) uint8, ``mask`` (size, size) uint8 and its label.
    """
    while True:
        image, mask = make_patch(rng, size, look, spec, task, zoom)
        label = patch_label(mask, spec.num_classes)
        if any(label):
            return image, mask, label


def patch_name(split: str, index: int, label: tuple[int, ...] | None) -> str:
    """File name of a patch: the label rides in training names only, as in LUAD-HistoSeg (``None``:
    no label in the name, for a spec whose labels are in a CSV)."""
    if split == "train":
        return f"synth-{index:06d}.png" if label is None else f"synth-{index:06d}-{format_label(label)}.png"
    return f"synth-{split}-{index:06d}.png"


def _write_one(job: tuple[Path, str, int, int, int, Look, DatasetSpec, Task | None, float]
               ) -> tuple[str, str, tuple[int, ...]]:
    """Make and write patch ``index`` of ``split``; returns ``(split, name, label)``. Runs in workers.

    Evaluation masks are written in the spec's mask encoding; the true training masks (``train_gt``,
    read like pseudo-masks) are always palette PNGs."""
    out, split, index, size, seed, look, spec, task, zoom = job
    image, mask, label = labelled_patch(patch_rng(seed, split, index), size, look, spec, task, zoom)
    name = patch_name(split, index, None if spec.labels_csv else label)
    if split == "train":
        write_rgb(out / "train" / name, image)
        write_mask(out / "train_gt" / name, mask, spec.flat_palette())
    else:
        write_rgb(out / split / "img" / name, image)
        write_class_mask(out / split / "mask" / name, mask, spec)
    return split, name, label


def _layout_dirs(out: Path) -> list[Path]:
    evaluation = [out / split / sub for split in ("val", "test") for sub in ("img", "mask")]
    return [out / "train", out / "train_gt", *evaluation]


def _prepare_dirs(out: Path) -> None:
    """Create the layout; drop files of an earlier synthetic run, refuse to mix with other data.

    Training names carry labels, so a rerun with another seed would otherwise leave stale
    patches beside the new ones.
    """
    if out.exists() and not out.is_dir():
        raise WsssError(f"output path {out} exists and is not a directory")
    (out / SUMMARY_NAME).unlink(missing_ok=True)  # the summary of the patches about to be replaced
    for d in _layout_dirs(out):
        if d.is_dir():
            foreign = [p.name for p in d.glob("*.png") if not p.name.startswith("synth-")]
            if foreign:
                raise WsssError(
                    f"{d} holds non-synthetic images (e.g. {foreign[0]}); choose an empty directory"
                )
            for p in d.glob("synth-*.png"):
                p.unlink()
        d.mkdir(parents=True, exist_ok=True)


def generate(
    out: Path,
    n_train: int = 1000,
    n_val: int = 100,
    n_test: int = 100,
    size: int = 224,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    look: Look = Look(),
    spec: DatasetSpec = LUAD,
    task: Task | None = None,
    mpp: float | None = None,
) -> dict:
    """Write a synthetic LUAD-HistoSeg-style data set of the classes of ``spec`` under ``out`` (layout
    in the module doc); when the spec names a label CSV, the training labels go there (its path under
    ``out``) instead of into the file names.

    ``task``: a random task's appearances instead of the fixed textures (:mod:`wsss.data.tasks`).
    ``mpp``: the patches' µm/px, the tissue drawn at that pixel size whatever ``size`` is (the
    generator's textures are at :data:`REFERENCE_MPP` on a 224-px patch); None: the patch spans the
    224-px field whatever its size (a smaller patch is a coarser rendering of it).

    Output is byte-identical for a given ``seed``, ``size``, ``look``, task, mpp and spec whatever
    ``workers`` is. Returns a summary: patch counts per split, the spec and look, per-class label counts and
    frequencies over the training split, and the wall time in seconds.
    """
    if min(n_train, n_val, n_test) < 0 or size < 16:
        raise WsssError(f"need non-negative split sizes and size >= 16, got size={size}")
    check_synth_spec(spec)
    start = time.perf_counter()
    out = Path(out)
    _prepare_dirs(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    zoom = 1.0 if mpp is None else _REF_SIZE / size * REFERENCE_MPP / mpp
    jobs = [(out, sp, i, size, seed, look, spec, task, zoom) for sp in SPLITS for i in range(counts[sp])]
    label_counts = np.zeros(spec.num_classes, np.int64)
    train_labels: dict[str, tuple[int, ...]] = {}
    with tqdm(total=len(jobs), desc="synth", unit="patch", disable=not progress) as bar:
        for split, name, label in _run_jobs(jobs, workers):
            if split == "train":
                label_counts += label
                train_labels[name] = label
            bar.update()
    if spec.labels_csv:
        _write_label_csv(spec.labels_csv_path(out), train_labels, spec)
    seconds = time.perf_counter() - start
    log.info("wrote %d synthetic patches to %s in %.1f s", len(jobs), out, seconds)
    summary = {
        "out": str(out),
        "size": size,
        "seed": seed,
        "counts": counts,
        "spec": spec.to_dict(),
        "look": look.to_dict(),
        # the µm/px of the tissue as drawn (the reference scale over the zooms of the look and of mpp)
        "mpp": round(REFERENCE_MPP * _REF_SIZE / size / (zoom * look.texture_scale), 6),
        "task": None if task is None else task.to_dict(),
        "train_label_counts": dict(zip(spec.classes, label_counts.tolist())),
        "train_label_freq": dict(zip(spec.classes, (label_counts / max(n_train, 1)).tolist())),
        "seconds": round(seconds, 2),
    }
    with atomic_path(out / SUMMARY_NAME) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_label_csv(path: Path, labels: dict[str, tuple[int, ...]], spec: DatasetSpec) -> None:
    """The training labels as a label CSV (:mod:`wsss.data.labels`), rows sorted by file name."""
    lines = [",".join(["file", *spec.classes])]
    lines += [",".join([name, *map(str, labels[name])]) for name in sorted(labels)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _run_jobs(jobs: list, workers: int) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """Yield :func:`_write_one` results, in a process pool when ``workers > 1``."""
    if workers <= 1 or len(jobs) < 2:
        yield from map(_write_one, jobs)
        return
    with _worker_signals():  # the workers are forked here, and take these dispositions with them
        pool = multiprocessing.Pool(workers)
    with pool:
        yield from pool.imap_unordered(_write_one, jobs, chunksize=8)


@contextlib.contextmanager
def _worker_signals() -> Iterator[None]:
    """Signal dispositions for processes forked inside: Ctrl-C is the parent's to handle (it stops the
    pool), and the pool's SIGTERM when it shuts down ends a worker silently. Without this a worker
    inherits the command line's Python handlers and prints a KeyboardInterrupt traceback as the pool
    closes, or, when a fork in a process with other threads left it stuck before running any Python,
    never ends. The parent's handlers are back as soon as the workers exist."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(signum, handler)
