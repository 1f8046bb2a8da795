"""Stain normalisation as a property of a model.

A model trained with ``--stain-norm macenko|reinhard|reinhard-mean`` records a *target* in its checkpoint (inside
its input normalisation, :class:`wsss.data.datasets.InputNorm`): the stain appearance of its training
set, fitted with robust statistics over many training patches (the median of per-patch estimates,
glass-dominated patches skipped) or over the tiles of one chosen image (``--stain-target``). Every
command that runs the model maps each patch (a training patch, an evaluation patch, a window of an
image or slide) onto that target before the model's input scaling, so a user never has to
remember it.

* **Macenko** (Macenko et al., ISBI 2009, as in HEnorm_python and torchstain): optical density
  ``OD = -ln((I + 1) / 256)``, so that white glass (255) has OD 0; the pixels stained in every
  channel (OD >= 0.15) span a plane (the two main eigenvectors of their covariance); the 1st and 99th
  percentiles of their angle in that plane are the haematoxylin and eosin OD vectors (the one with
  more red absorption is haematoxylin); concentrations are the least-squares unmixing of every
  pixel, scaled so that their 99th percentiles match the target's; the image is rebuilt with the
  target's vectors.
* **Reinhard** (Reinhard et al. 2001): each LAB channel standardised and given the target's mean and
  standard deviation (torchstain's ``NumpyReinhardNormalizer``, whole-patch statistics).
* **Reinhard, means only** (``reinhard-mean``): each LAB channel shifted to the target's mean, the
  patch keeping its own standard deviations. A patch's LAB spread is a class cue (a nearest-class-mean
  rule on single-class synthetic patches' LAB means and spreads: 0.79 right as they are, 0.55 after
  Reinhard, 0.77 after this; docs/stain.md), which full Reinhard equalises away; the means carry most
  of what another lab's stain changes.
* **Reinhard, one shift per set** (``reinhard-set``): the target is the training set's mean colour
  (the mean over its patches of each patch's LAB means over its tissue pixels, glass left out: a
  window at a slide's edge is mostly glass, which says nothing of its stain); a command measures the same on the set it
  runs on -- an evaluation split, the images of one ``predict`` call, one slide -- and shifts every
  patch of it in LAB by one vector, the target minus that mean. A lab's colour cast moves every patch
  alike and is removed; what tells patches apart, their own mean colour included, is kept (a patch's
  mean colour is a class cue that per-patch normalisation removes: docs/stain.md). The training set
  is its own reference: its shift is zero and training is exactly that of ``none``. A set is shifted
  only when its mean is significantly off the reference's (:data:`SET_SIGNIFICANCE` standard errors,
  from the spread of the training patches' means the target records): a test split drawn like the
  training set differs by sampling alone and is left as it is. A set too small to measure (fewer
  than :data:`MIN_SET_PATCHES` stained patches or tiles), where its tissue mix rather than its stain
  would set the mean, is left as it is too (one log line).

Macenko is written out here (40 lines) rather than taken from torchstain, whose algorithm, constants
and ordering rule it follows (the tests compare the two: within one grey level). Two reasons. Its
least-squares step (``numpy.linalg.lstsq``, an SVD solver called with one right-hand side per pixel)
is what dominates its time, and it suffers from BLAS thread contention: measured side by side on our
busy 2-core machine with numpy's default threads, torchstain took 29 ms per 112-px patch (53 ms at
224 px) and this code 4.5 ms (17 ms), solving the 2×2 normal equations instead; with one BLAS thread
both take about 11 ms (17-20 ms). Every training patch is normalised every epoch, so this matters.
And a patch's own fit has to be checked before the image is divided by it (too few stained pixels,
coinciding stain vectors, a non-finite or zero concentration percentile): torchstain casts whatever
comes out to uint8, where a NaN becomes a silent 0. Vahadane is not offered: torchstain has none; the
usual implementation (StainTools, unmaintained since 2019) needs the SPAMS sparse-coding library, and
TIAToolbox's would bring a whole toolbox of dependencies for one method.

A patch whose fit fails -- too few stained pixels (mostly glass), or a degenerate or non-finite fit
-- passes through unchanged; such patches are counted (:func:`counts`) and reported in the log.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from wsss.errors import WsssError

log = logging.getLogger(__name__)

METHODS = ("none", "macenko", "reinhard", "reinhard-mean", "reinhard-set")
"""``--stain-norm`` choices; ``none`` records no target."""

LIGHT = 256.0
"""The light entering the slide in ``OD = -ln((I + 1) / LIGHT)``: white glass (255) has OD 0."""
BETA = 0.15
"""A pixel is *stained* when its OD is at least this in every channel (Macenko's transparency cut)."""
ALPHA = 1.0
"""Percentile of the angles taken as the extreme stain directions (Macenko: 1 and 99)."""
MIN_STAINED = 0.01
"""A patch with a smaller fraction of stained pixels is mostly glass: it passes through unchanged."""
STAINED_MAX_BYTE = LIGHT * math.exp(-BETA) - 1.0
"""A pixel is stained when every channel's byte is at most this (``OD >= BETA`` without a logarithm)."""
MIN_LAB_STD = 1e-3
"""A patch with a LAB channel spread no larger than this is flat: Reinhard would divide by it."""
REINHARD_METHODS = ("reinhard", "reinhard-mean")
"""The per-patch methods fitted on LAB statistics, which also have a graph form (:class:`ReinhardGraph`)."""
SET_METHOD = "reinhard-set"
"""The method that shifts a whole set by one LAB vector, measured on that set (:meth:`StainNorm.for_set`)."""
MIN_SET_PATCHES = 16
"""A set with fewer stained patches or tiles is not aligned: its mean colour would say more about its
tissue mix than about its stain."""
SET_MAX_PATCHES = 32
"""However large a set, the significance test counts it as this many random patches: a set's tissue mix
varies from set to set more than sampling would (a slide is not a random sample of the training
patches). Measured without the cap: sets of about 100 patches mostly of one tissue, in the training
lab's colours, were 4.4-5.5 standard errors off and lost up to 0.031 mIoU when shifted; counted as 32
they are at most 3.7 off, and another lab's test splits of 80 stay 7 or more off (docs/stain.md)."""
SET_SIGNIFICANCE = 4.03
"""A set is shifted only when its mean LAB differs from the training set's by more than this many
standard errors (the norm of the per-channel z-scores, :func:`set_noise`): the 0.999 quantile of a
chi distribution with 3 degrees of freedom (sqrt(16.27)), so that a random sample of training-like
patches is shifted once in a thousand sets, by chance."""
PIXEL_RULES = ("all", "tissue")
"""What a ``reinhard-set`` colour is the mean of in each patch (:attr:`StainNorm.pixels`)."""
FIT_MIN_STAINED = 0.3
"""When fitting a target, a patch (or a tile of ``--stain-target``) with a smaller stained fraction is
glass-dominated and skipped."""
FIT_PATCHES = 200
"""At most this many training patches (evenly spaced over the sorted list) are fitted."""
MIN_FIT_PATCHES = 3
"""A target needs at least this many usable (not glass-dominated) patches."""

_COUNTS: Counter = Counter()
_LOGGED: set = set()


def _log_once(level: int, message: str) -> None:
    """Log ``message`` once per process (the gate's classifier and the segmenter bind to the same set)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.log(level, message)


def optical_density(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 → ``(H·W, 3)`` float64 optical density ``-ln((I + 1) / 256)``."""
    return -np.log((image.reshape(-1, 3).astype(np.float64) + 1.0) / LIGHT)


def stained_fraction(image: np.ndarray) -> float:
    """Fraction of the pixels of ``image`` (H, W, 3) uint8 stained in every channel (OD >= :data:`BETA`)."""
    # OD >= BETA  <=>  I + 1 <= LIGHT·exp(-BETA): one comparison of the bytes, no logarithm
    return float((image.reshape(-1, 3) <= STAINED_MAX_BYTE).all(axis=1).mean())


class FitFailed(Exception):
    """A patch's own stain fit failed (too little stain, degenerate or non-finite)."""


def macenko_fit(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Macenko's fit of one image (H, W, 3) uint8.

    Returns the stain matrix ``(3, 2)`` (unit OD vectors of haematoxylin and eosin as columns), the
    99th percentiles of the two concentrations ``(2,)`` and the concentrations ``(2, H·W)``.
    Raises :class:`FitFailed` when the image has fewer than :data:`MIN_STAINED` stained pixels or the
    fit is degenerate.
    """
    od = optical_density(image)
    stained = od[(od >= BETA).all(axis=1)]
    if len(stained) < max(3, MIN_STAINED * len(od)):
        raise FitFailed("too little stain")
    with np.errstate(all="ignore"):
        _, vectors = np.linalg.eigh(np.cov(stained.T))
        plane = vectors[:, 1:3]  # the two largest eigenvalues' vectors
        t = stained @ plane
        phi = np.arctan2(t[:, 1], t[:, 0])
        lo, hi = np.percentile(phi, [ALPHA, 100.0 - ALPHA])
        v_lo = plane @ np.array([math.cos(lo), math.sin(lo)])
        v_hi = plane @ np.array([math.cos(hi), math.sin(hi)])
        # haematoxylin absorbs more red than eosin (HEnorm's heuristic)
        he = np.stack([v_lo, v_hi], axis=1) if v_lo[0] > v_hi[0] else np.stack([v_hi, v_lo], axis=1)
        gram = he.T @ he
        if not np.isfinite(gram).all() or abs(np.linalg.det(gram)) < 1e-8:
            raise FitFailed("degenerate stain vectors")
        conc = np.linalg.solve(gram, he.T @ od.T)  # least squares, as lstsq(he, od.T)
        max_c = np.percentile(conc, 99, axis=1)
    if not (np.isfinite(he).all() and np.isfinite(max_c).all() and (max_c > 1e-6).all()):
        raise FitFailed("non-finite or empty concentrations")
    return he, max_c, conc


def _lab_channels(image: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """``image``'s L, a, b channels and their means and standard deviations ``(3,)`` (torchstain's
    conversion and scaling, as its ``NumpyReinhardNormalizer`` computes them); raises
    :class:`FitFailed` for a patch with too little stain or a flat channel."""
    from torchstain.numpy.utils.rgb2lab import rgb2lab
    from torchstain.numpy.utils.split import lab_split
    from torchstain.numpy.utils.stats import get_mean_std

    if stained_fraction(image) < MIN_STAINED:
        raise FitFailed("too little stain")
    with np.errstate(all="ignore"):
        channels = list(lab_split(rgb2lab(image.astype("float32") / 255)))
        stats = np.array([get_mean_std(c) for c in channels])
    means, stds = stats[:, 0], stats[:, 1]
    if not (np.isfinite(means).all() and np.isfinite(stds).all() and (stds > MIN_LAB_STD).all()):
        raise FitFailed("flat image")
    return channels, means, stds


def reinhard_fit(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LAB means and standard deviations ``(3,), (3,)`` of ``image`` (torchstain's Reinhard fit)."""
    _, means, stds = _lab_channels(image)
    return means.astype(float), stds.astype(float)


@dataclass(frozen=True)
class StainNorm:
    """A fitted stain target and the method that maps patches onto it.

    ``stain_matrix`` ``(3, 2)`` rows R, G, B of the haematoxylin and eosin unit OD vectors and
    ``max_concentration`` ``(2,)`` (Macenko), or ``lab_mean``/``lab_std`` ``(3,)`` (Reinhard, LAB in
    torchstain's scaling: L 0-100, a and b centred on 0). ``patches``: how many patches or tiles the
    target was fitted on; ``source``: ``training set`` or the target image's path.
    """

    method: str
    stain_matrix: tuple[tuple[float, float], ...] | None = None
    max_concentration: tuple[float, float] | None = None
    lab_mean: tuple[float, float, float] | None = None
    lab_std: tuple[float, float, float] | None = None
    patches: int = 0
    source: str = ""
    set_shift: tuple[float, float, float] | None = None
    """``reinhard-set`` only: the LAB shift of the set being processed (:meth:`for_set`); never stored."""
    pixels: str = "tissue"
    """``reinhard-set`` only: which pixels of a patch its colour is the mean of — ``tissue`` (glass left out,
    :func:`tissue_pixels`; references measured since 2026-12-06) or ``all`` (earlier checkpoints, which
    record none: :meth:`from_dict` reads them so): a set is measured the way the reference was."""

    def __post_init__(self) -> None:
        if self.method == "macenko":
            he = np.asarray(self.stain_matrix, dtype=float)
            mc = np.asarray(self.max_concentration, dtype=float)
            ok = he.shape == (3, 2) and mc.shape == (2,) and np.isfinite(he).all() and (mc > 0).all()
        elif self.method in REINHARD_METHODS:
            mean = np.asarray(self.lab_mean, dtype=float)
            std = np.asarray(self.lab_std, dtype=float)
            ok = mean.shape == std.shape == (3,) and np.isfinite(mean).all() and (std > 0).all()
        elif self.method == SET_METHOD:
            mean = np.asarray(self.lab_mean, dtype=float)
            spread = np.asarray(self.lab_std, dtype=float)
            ok = mean.shape == spread.shape == (3,) and np.isfinite(mean).all() and (spread > 0).all() \
                and self.patches > 0
        else:
            raise WsssError(f"unknown stain normalisation {self.method!r}; use one of {', '.join(METHODS[1:])}")
        if not ok:
            raise WsssError(f"the recorded {self.method} stain target is malformed")

    def to_dict(self) -> dict:
        """Plain lists and numbers (loadable with ``torch.load(weights_only=True)``)."""
        d: dict = {"method": self.method, "patches": self.patches, "source": self.source}
        if self.method == "macenko":
            d["stain_matrix"] = [list(row) for row in self.stain_matrix]
            d["max_concentration"] = list(self.max_concentration)
        else:
            d["lab_mean"] = list(self.lab_mean)
            d["lab_std"] = list(self.lab_std)
        if self.method == SET_METHOD:
            d["pixels"] = self.pixels
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StainNorm":
        def floats(key: str, shape: tuple[int, ...]):
            if d.get(key) is None:
                return None
            a = np.asarray(d[key], dtype=float)
            if a.shape != shape:
                raise WsssError(f"the recorded stain target's {key} has shape {a.shape}, not {shape}")
            return tuple(tuple(float(v) for v in row) for row in a) if a.ndim == 2 else tuple(float(v) for v in a)

        try:
            # a reinhard-set reference recorded before 2026-12-06 has no ``pixels``: all of them
            pixels = str(d.get("pixels", "all" if d.get("method") == SET_METHOD else cls.pixels))
            if pixels not in PIXEL_RULES:
                raise ValueError(pixels)
            return cls(str(d["method"]), floats("stain_matrix", (3, 2)), floats("max_concentration", (2,)),
                       floats("lab_mean", (3,)), floats("lab_std", (3,)), int(d.get("patches", 0)),
                       str(d.get("source", "")), pixels=pixels)
        except (KeyError, TypeError, ValueError):
            raise WsssError("the recorded stain target is malformed") from None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``image`` (H, W, 3) uint8 mapped onto the target, or unchanged when its fit fails (counted); a
        ``reinhard-set`` target whose set is not shifted returns it as it is, uncounted (nothing to log)."""
        if self.method == SET_METHOD and self.set_shift is not None and not any(self.set_shift):
            return image
        try:
            out = self.transform(image)
        except FitFailed:
            _COUNTS["passed"] += 1
            return image
        _COUNTS["normalised"] += 1
        return out

    def for_set(self, colour: "SetColour", what: str = "this set") -> "StainNorm":
        """This target bound to a set of patches whose colour ``colour`` was measured (:func:`measure_set`):
        ``reinhard-set`` shifts each of them by the target minus the set's mean when that is significant
        (:data:`SET_SIGNIFICANCE`) and enough of them are stained (:data:`MIN_SET_PATCHES`), else by zero;
        the per-patch methods are returned as they are."""
        if self.method != SET_METHOD:
            return self
        colour = colour.of(self.pixels)
        if colour.mean is None or colour.patches < MIN_SET_PATCHES:
            _log_once(logging.INFO, f"reinhard-set: {what}: {colour.patches} stained patches or tiles, "
                      f"{MIN_SET_PATCHES} needed to measure a set's colour; not shifted")
            return replace(self, set_shift=(0.0, 0.0, 0.0))
        shift = np.asarray(self.lab_mean) - np.asarray(colour.mean)
        z = float(np.linalg.norm(shift / set_noise(self, colour.patches)))
        mean = ", ".join(f"{v:.1f}" for v in colour.mean)
        if z <= SET_SIGNIFICANCE:
            _log_once(logging.INFO, f"reinhard-set: {what}: mean LAB {mean} over {colour.patches} stained patches or "
                      f"tiles, within what a sample of the training set gives (z = {z:.1f} <= {SET_SIGNIFICANCE:.2f}); "
                      "not shifted")
            return replace(self, set_shift=(0.0, 0.0, 0.0))
        _log_once(logging.INFO, f"reinhard-set: {what}: mean LAB {mean} over {colour.patches} stained patches or tiles "
                  f"(z = {z:.1f}); shifted by {', '.join(f'{v:+.2f}' for v in shift)} onto the training set's")
        return replace(self, set_shift=tuple(float(v) for v in shift))

    def transform(self, image: np.ndarray) -> np.ndarray:
        """``image`` (H, W, 3) uint8 mapped onto the target; raises :class:`FitFailed` (uncounted)."""
        if self.method == SET_METHOD:
            return self._shift(image)
        if self.method == "macenko":
            _, max_c, conc = macenko_fit(image)
            target_he = np.asarray(self.stain_matrix)
            scaled = conc * (np.asarray(self.max_concentration) / max_c)[:, None]
            light = LIGHT * np.exp(-(target_he @ scaled))
            out = np.clip(np.rint(light - 1.0), 0, 255).T  # invert OD = -ln((I + 1) / LIGHT)
            return out.astype(np.uint8).reshape(image.shape)
        # torchstain's NumpyReinhardNormalizer.normalize with its own functions, the LAB conversion done
        # once (the fit's check reuses it: half the time); glass and flat patches are refused before
        # their spread divides anything
        from torchstain.numpy.utils.lab2rgb import lab2rgb
        from torchstain.numpy.utils.split import lab_merge
        from torchstain.numpy.utils.stats import standardize

        channels, means, stds = _lab_channels(image)
        target_means = np.asarray(self.lab_mean, dtype=np.float32)
        target_stds = stds if self.method == "reinhard-mean" else np.asarray(self.lab_std, dtype=np.float32)
        with np.errstate(all="ignore"):
            lab = lab_merge(*(standardize(c, m, s) * ts + tm
                              for c, m, s, tm, ts in zip(channels, means, stds, target_means, target_stds)))
            out = (lab2rgb(lab) * 255).astype("uint8")
        return np.ascontiguousarray(out.reshape(image.shape))

    def _shift(self, image: np.ndarray) -> np.ndarray:
        """``reinhard-set``: ``image`` shifted in LAB by the bound set's shift (the LAB round trip of
        :meth:`transform`'s Reinhard path, each channel plus a constant); unchanged when it is zero."""
        if self.set_shift is None:
            raise WsssError("a reinhard-set stain target was applied before its set's colour was measured "
                            "(a wsss bug: please report it)")
        if not any(self.set_shift):
            return image
        from torchstain.numpy.utils.lab2rgb import lab2rgb
        from torchstain.numpy.utils.split import lab_merge

        channels, _, _ = _lab_channels(image)
        with np.errstate(all="ignore"):
            lab = lab_merge(*(c + np.float32(s) for c, s in zip(channels, self.set_shift)))
            out = (lab2rgb(lab) * 255).astype("uint8")
        return np.ascontiguousarray(out.reshape(image.shape))

    def describe(self) -> str:
        if self.method == SET_METHOD:
            return (f"reinhard-set colour reference (mean LAB {', '.join(f'{v:.1f}' for v in self.lab_mean)}) measured "
                    f"on {self.patches} patches or tiles of {self.source}")
        return f"{self.method} stain normalisation fitted on {self.patches} patches or tiles of {self.source}"


class ReinhardGraph:
    """:meth:`StainNorm.transform` of a Reinhard or ``reinhard-mean`` target in torch operations, for a
    graph that ``wsss export`` traces (a model's input normalisation travels with it).

    RGB 0-255 float ``(B, 3, H, W)`` → the same, each image mapped onto the target with the arithmetic of
    the NumPy path (torchstain's sRGB/CIE LAB conversions, D65, its truncation to whole grey levels); an
    image whose own fit fails (fewer than :data:`MIN_STAINED` stained pixels, a flat LAB channel) passes
    through unchanged. Float32 rounding differs from NumPy's in the last bit now and then, which can
    move a pixel by one grey level where the NumPy path truncates.
    """

    def __init__(self, target: StainNorm) -> None:
        if target.method not in REINHARD_METHODS:
            raise WsssError(f"{target.method} stain normalisation has no graph form (only reinhard and reinhard-mean)")
        self.target = target

    def __call__(self, x):
        import torch

        from torchstain.numpy.utils.rgb2lab import _rgb2xyz

        t = self.target
        to_xyz = torch.tensor(_rgb2xyz, dtype=torch.float32, device=x.device)
        from_xyz = torch.linalg.inv(torch.tensor(_rgb2xyz, dtype=torch.float64)).to(torch.float32).to(x.device)
        white = torch.tensor((0.95047, 1.0, 1.08883), dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        stained = (x <= STAINED_MAX_BYTE).all(dim=1).float().mean(dim=(1, 2))
        v = x / 255.0
        linear = torch.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
        xyz = torch.einsum("ij,bjhw->bihw", to_xyz, linear) / white
        f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
        fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
        lab = torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)
        mean = lab.mean(dim=(2, 3), keepdim=True)
        std = lab.std(dim=(2, 3), keepdim=True, correction=0)
        target_mean = torch.tensor(t.lab_mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        target_std = std if t.method == "reinhard-mean" else torch.tensor(
            t.lab_std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        lab = (lab - mean) / std.clamp(min=MIN_LAB_STD) * target_std + target_mean
        y = (lab[:, 0] + 16.0) / 116.0
        xyz = torch.stack([lab[:, 1] / 500.0 + y, y, y - lab[:, 2] / 200.0], dim=1)
        xyz = torch.where(xyz > 0.2068966, xyz ** 3, (xyz - 16.0 / 116.0) / 7.787) * white
        rgb = torch.einsum("ij,bjhw->bihw", from_xyz, xyz)
        rgb = torch.where(rgb > 0.0031308, 1.055 * rgb.clamp(min=0.0031308) ** (1 / 2.4) - 0.055, rgb * 12.92)
        out = torch.floor(rgb.clamp(0.0, 1.0) * 255.0)
        ok = (stained >= MIN_STAINED) & (std > MIN_LAB_STD).flatten(1).all(dim=1)
        return torch.where(ok.view(-1, 1, 1, 1), out, x)


def counts(reset: bool = False) -> dict[str, int]:
    """How many patches this process normalised and passed through unchanged since the last reset."""
    out = {"normalised": _COUNTS["normalised"], "passed": _COUNTS["passed"]}
    if reset:
        _COUNTS.clear()
    return out


def log_counts(what: str) -> None:
    """One log line: how many of ``what`` passed through unchanged (then the counts restart)."""
    c = counts(reset=True)
    total = c["normalised"] + c["passed"]
    if total and c["passed"]:
        log.info("stain normalisation: %d of %d %s had too little stain (mostly glass) or no usable fit and "
                 "passed through unchanged", c["passed"], total, what)
    elif total:
        log.info("stain normalisation: all %d %s normalised", total, what)


def fit(method: str, images: Iterable[np.ndarray], source: str, unit: str = "patches") -> StainNorm:
    """The target of ``method`` fitted on ``images`` (H, W, 3) uint8: the median of their per-image
    estimates, images with a stained fraction under :data:`FIT_MIN_STAINED` or a failed fit skipped.

    Raises WsssError when fewer than :data:`MIN_FIT_PATCHES` images are usable."""
    if method not in METHODS[1:]:
        raise WsssError(f"--stain-norm must be one of {', '.join(METHODS)}, not {method!r}")
    if method == SET_METHOD:
        colour = measure_set(images).of("tissue")
        if colour.patches < MIN_FIT_PATCHES:
            raise WsssError(f"cannot measure a reinhard-set colour reference on {source}: {colour.patches} of its "
                            f"{colour.seen} {unit} are stained (at least {MIN_STAINED:.0%} of the pixels with OD >= "
                            f"{BETA} in every channel), {MIN_FIT_PATCHES} needed; it is mostly glass")
        target = StainNorm(SET_METHOD, lab_mean=colour.mean, lab_std=colour.spread, patches=colour.patches,
                           source=source, pixels="tissue")
        log.info("%s (%d of %d %s skipped as glass)", target.describe(), colour.seen - colour.patches, colour.seen, unit)
        return target
    estimates, seen = [], 0
    for image in images:
        seen += 1
        if stained_fraction(image) < FIT_MIN_STAINED:
            continue
        try:
            if method == "macenko":
                he, max_c, _ = macenko_fit(image)
                estimates.append(np.concatenate([he.ravel(), max_c]))
            else:
                estimates.append(np.concatenate(reinhard_fit(image)))
        except FitFailed:
            continue
    if len(estimates) < MIN_FIT_PATCHES:
        raise WsssError(f"cannot fit a {method} stain target on {source}: {len(estimates)} of its {seen} {unit} "
                        f"are stained (at least {FIT_MIN_STAINED:.0%} of the pixels with OD >= {BETA} in every "
                        f"channel), {MIN_FIT_PATCHES} needed; it is mostly glass")
    median = np.median(np.stack(estimates), axis=0)
    if method == "macenko":
        he = median[:6].reshape(3, 2)
        he = he / np.linalg.norm(he, axis=0, keepdims=True)
        target = StainNorm("macenko", stain_matrix=tuple(map(tuple, he.tolist())),
                           max_concentration=tuple(median[6:].tolist()), patches=len(estimates), source=source)
    else:
        target = StainNorm(method, lab_mean=tuple(median[:3].tolist()), lab_std=tuple(median[3:].tolist()),
                           patches=len(estimates), source=source)
    log.info("%s (%d of %d %s skipped as glass-dominated)", target.describe(), seen - len(estimates), seen, unit)
    return target


def set_noise(target: StainNorm, patches: int) -> np.ndarray:
    """The standard error ``(3,)`` of the difference between the training set's mean LAB (over
    ``target.patches`` patches) and that of a random sample of ``n = min(patches, SET_MAX_PATCHES)``
    patches like them: the spread of the training patches' LAB means times sqrt(1/n + 1/target.patches)."""
    n = min(patches, SET_MAX_PATCHES)
    return np.asarray(target.lab_std) * math.sqrt(1.0 / n + 1.0 / target.patches)


@dataclass(frozen=True)
class SetColour:
    """The colour of a set of patches or tiles: the mean over its stained ones (at least
    :data:`MIN_STAINED` stained pixels, no flat LAB channel) of each one's LAB channel means (None when
    none is), how many were stained and how many were seen."""

    mean: tuple[float, float, float] | None
    patches: int
    seen: int
    spread: tuple[float, float, float] | None = None
    """The standard deviation over the stained patches of their LAB means (None when none is)."""
    tissue: "SetColour | None" = None
    """The same with each patch's mean over its tissue pixels only (:func:`tissue_pixels`)."""

    def of(self, pixels: str) -> "SetColour":
        """This colour as measured over ``pixels`` (``all`` or ``tissue``) of each patch."""
        return self if pixels == "all" or self.tissue is None else self.tissue


def tissue_pixels(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: the pixels that are not glass, glass being bright and colourless (the ``glass``
    white rule of the pseudo-masks, :func:`wsss.data.background.white_mask`, without its blob filter)."""
    from wsss.data.background import glass_pixels

    return ~glass_pixels(image)


def _colour(means: list, seen: int) -> SetColour:
    if not means:
        return SetColour(None, 0, seen)
    return SetColour(tuple(float(v) for v in np.mean(means, axis=0)), len(means), seen,
                     tuple(float(v) for v in np.std(means, axis=0)))


def measure_set(images: Iterable[np.ndarray]) -> SetColour:
    """:class:`SetColour` of ``images`` (H, W, 3) uint8, patches under 1% stained left out (a stain fit's
    30% rule would bias the set's mean towards dense tissue: measured worse, docs/stain.md), each
    patch's LAB means taken over all its pixels and (``tissue``) over its tissue pixels only: the
    glass of a patch or a slide's window says how much of it is glass, not what colour its stain is."""
    means, tissue_means, seen = [], [], 0
    for image in images:
        seen += 1
        try:
            channels, patch_means, _ = _lab_channels(image)
        except FitFailed:
            continue
        means.append(patch_means.astype(float))
        tissue = tissue_pixels(image).ravel()
        if tissue.any():
            tissue_means.append(np.array([float(c.ravel()[tissue].mean()) for c in channels]))
    return replace(_colour(means, seen), tissue=_colour(tissue_means, seen))


def measure_paths(paths: Sequence[Path], image_size: int | None) -> SetColour:
    """:class:`SetColour` of up to :data:`FIT_PATCHES` of the patches ``paths`` (evenly spaced over the
    sorted list), each as the model sees it (resized to ``image_size``)."""
    from wsss.data.datasets import resize_rgb
    from wsss.data.png import read_rgb

    return measure_set(resize_rgb(read_rgb(p), image_size) for p in spaced(sorted(paths)))


def measure_images(images: Iterable[tuple[np.ndarray, int]], count: int) -> SetColour:
    """:class:`SetColour` of ``count`` images given as ``(image, side)`` (read one at a time), each
    cut into ``side``-px tiles (the whole image when smaller than one), at most
    :data:`FIT_PATCHES` tiles in all, shared evenly between the images."""
    per_image = max(1, FIT_PATCHES // max(1, count))
    return measure_set(t for image, side in images for t in tiles(image, side, per_image))


@dataclass(frozen=True)
class LabStatistics:
    """How LAB statistics vary over a training set (RandStainNA's "virtual stain templates"): the mean
    and standard deviation over patches of each patch's LAB channel means, and of its channel standard
    deviations, each ``(3,)`` (torchstain's LAB scaling)."""

    mean_of_means: tuple[float, float, float]
    std_of_means: tuple[float, float, float]
    mean_of_stds: tuple[float, float, float]
    std_of_stds: tuple[float, float, float]
    patches: int = 0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def lab_statistics(paths: Sequence[Path], image_size: int | None) -> LabStatistics:
    """:class:`LabStatistics` over up to :data:`FIT_PATCHES` training patches (resized to ``image_size``),
    glass-dominated ones skipped; WsssError when fewer than :data:`MIN_FIT_PATCHES` are usable."""
    from wsss.data.datasets import resize_rgb
    from wsss.data.png import read_rgb

    rows = []
    for path in spaced(sorted(paths)):
        image = resize_rgb(read_rgb(path), image_size)
        if stained_fraction(image) < FIT_MIN_STAINED:
            continue
        try:
            rows.append(np.concatenate(reinhard_fit(image)))
        except FitFailed:
            continue
    if len(rows) < MIN_FIT_PATCHES:
        raise WsssError(f"--lab-jitter: {len(rows)} training patches are stained enough to measure their LAB "
                        f"statistics, {MIN_FIT_PATCHES} needed")
    a = np.stack(rows)
    mean, std = a.mean(axis=0), a.std(axis=0)

    def three(v: np.ndarray) -> tuple[float, float, float]:
        return tuple(float(x) for x in v)

    stats = LabStatistics(three(mean[:3]), three(std[:3]), three(mean[3:]), three(std[3:]), len(rows))
    log.info("LAB statistics of %d training patches for --lab-jitter: means %s ± %s, stds %s ± %s", len(rows),
             *(", ".join(f"{x:.1f}" for x in v) for v in (stats.mean_of_means, stats.std_of_means,
                                                        stats.mean_of_stds, stats.std_of_stds)))
    return stats


def spaced(items: Sequence, n: int = FIT_PATCHES) -> list:
    """At most ``n`` of ``items``, evenly spaced (first and last included): deterministic, no RNG."""
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]


def tiles(image: np.ndarray, side: int, n: int = FIT_PATCHES) -> list[np.ndarray]:
    """At most ``n`` non-overlapping ``side``-px tiles of ``image`` (evenly spaced); the whole image
    when it is smaller than a tile."""
    h, w = image.shape[:2]
    if h < side or w < side:
        return [image]
    corners = [(r, c) for r in range(0, h - side + 1, side) for c in range(0, w - side + 1, side)]
    return [image[r:r + side, c:c + side] for r, c in spaced(corners, n)]


def fit_training_set(method: str, paths: Sequence[Path], image_size: int | None) -> StainNorm:
    """The target fitted on up to :data:`FIT_PATCHES` training patches, each as the model sees it
    (resized to ``image_size``); for ``reinhard-set`` their :func:`measure_paths` colour, so that the
    training set measured again is shifted by exactly zero."""
    from wsss.data.datasets import resize_rgb
    from wsss.data.png import read_rgb

    chosen = spaced(sorted(paths))
    return fit(method, (resize_rgb(read_rgb(p), image_size) for p in chosen), "the training set")


def fit_image(method: str, path: Path, side: int | None) -> StainNorm:
    """The target fitted on the tiles (``side`` px, 224 when None) of one chosen image, e.g. a
    pathologist's reference; WsssError when it is not an RGB image or is mostly glass."""
    from wsss.data.png import read_rgb

    if Path(path).is_dir():
        raise WsssError(f"{path} is a folder, not an image: --stain-target names one image file")
    image = read_rgb(path)
    side = side or 224
    chosen = tiles(image, side)
    if len(chosen) < MIN_FIT_PATCHES:
        h, w = image.shape[:2]
        raise WsssError(f"{path} is {w}×{h} px, too small to fit a stain target on: it holds {len(chosen)} tile(s) "
                        f"of the model's {side} px, {MIN_FIT_PATCHES} needed (e.g. {MIN_FIT_PATCHES * side}×{side} px)")
    return fit(method, chosen, str(path), "tiles")
