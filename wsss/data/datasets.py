"""PyTorch datasets over the split listings of :mod:`wsss.data.layout`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from wsss.data import augment
from wsss.data.layout import MaskedSample, TrainSample
from wsss.data.png import read_class_mask, read_rgb
from wsss.data.specs import DatasetSpec
from wsss.data.stain import SET_METHOD, SetColour, StainNorm
from wsss.errors import WsssError


@dataclass(frozen=True)
class InputNorm:
    """How a model's input is made from a uint8 RGB patch: the patch mapped onto the model's stain
    target (``stain``, :mod:`wsss.data.stain`; None: as it is), then scaled ``(x / 255 - mean) / std``.
    Recorded in every checkpoint and reapplied wherever the model runs.

    The reference feeds ``[0, 1]`` RGB with no mean/std (``none``) and no stain normalisation.
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    stain: StainNorm | None = None

    def to_dict(self) -> dict:
        d = {"mean": list(self.mean), "std": list(self.std)}
        if self.stain is not None:
            d["stain"] = self.stain.to_dict()
        return d

    @property
    def needs_set(self) -> bool:
        """Whether the stain step shifts a whole set by what it measures on that set (``reinhard-set``):
        then every command binds it to its set with :meth:`for_set` before it runs the model."""
        return self.stain is not None and self.stain.method == SET_METHOD

    def for_set(self, colour: Callable[[], SetColour], what: str = "this set") -> "InputNorm":
        """This normalisation bound to the set whose colour ``colour()`` measures (called only when
        :attr:`needs_set`); otherwise itself."""
        if not self.needs_set:
            return self
        return replace(self, stain=self.stain.for_set(colour(), what))

    @classmethod
    def from_dict(cls, d: dict | None) -> "InputNorm":
        """``None`` (e.g. a published plain state_dict) means the reference's ``[0, 1]`` input."""
        if not d:
            return cls()
        stain = StainNorm.from_dict(d["stain"]) if d.get("stain") else None
        try:
            mean, std = (tuple(float(v) for v in d[k]) for k in ("mean", "std"))
        except (KeyError, TypeError, ValueError):
            mean = std = ()
        if not (len(mean) == len(std) == 3 and all(math.isfinite(v) for v in mean + std) and min(std) > 0):
            raise WsssError("the recorded input normalisation (mean, std) is malformed")
        return cls(mean, std, stain)


INPUT_NORMS = {
    "none": InputNorm(),
    "imagenet": InputNorm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def get_input_norm(name: str) -> InputNorm:
    try:
        return INPUT_NORMS[name]
    except KeyError:
        raise WsssError(f"unknown input normalisation {name!r}; use {' or '.join(INPUT_NORMS)}") from None


def to_tensor(image: np.ndarray, norm: InputNorm) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → normalised ``(3, H, W)`` float32: the stain normalisation (if any) of the
    uint8 patch, then the scaling. Every model input of every command is made here."""
    if norm.stain is not None:
        image = norm.stain(np.asarray(image, dtype=np.uint8))
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)
    return (x - mean) / std


def to_uint8_tensor(image: np.ndarray, stain: StainNorm | None = None) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(3, H, W)`` uint8, as loader workers send training images (a quarter
    of float32's bytes): mapped onto the stain target ``stain`` (None: as it is), the part of the input
    normalisation that works on uint8; :func:`normalise` finishes the job where the model runs."""
    if stain is not None:
        image = stain(np.asarray(image, dtype=np.uint8))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def normalise(x: torch.Tensor, norm: InputNorm) -> torch.Tensor:
    """uint8 images ``(..., 3, H, W)`` (stain-normalised already, :func:`to_uint8_tensor`) → float32
    ``(x / 255 - mean) / std`` on ``x``'s device; the same arithmetic as :func:`to_tensor`, so the
    values are the same to the bit."""
    x = x.float().div_(255.0)
    mean = torch.tensor(norm.mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(norm.std, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def resize_rgb(image: np.ndarray, size: int | tuple[int, int] | None) -> np.ndarray:
    """Bilinear resize (PIL) of ``(H, W, 3)`` uint8 to ``(size, size, 3)``, or to ``(h, w, 3)`` for
    ``size = (h, w)``; ``None`` keeps the image as it is."""
    if size is None:
        return image
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int | None) -> np.ndarray:
    """Nearest-neighbour resize of ``(H, W)`` class indices (never invents a class)."""
    if size is None or mask.shape == (size, size):
        return mask
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))


DECODED_CACHE_BYTES = 2 << 30
"""How many bytes of decoded training files a loader without workers keeps for the next epochs."""


class DecodedCache:
    """Decoded training files kept for the next epochs: the first ones read, until ``budget`` bytes
    are held (2 GiB: make reproduce's data whole, a third of LUAD-HistoSeg's stage-2 patches and
    masks at 224 px), then the rest read as before.

    Without loader workers, reading and decoding PNGs runs between the model's steps: stage 2 reads
    an image and three masks per patch (four more patches for a mosaic), ~3 ms of each 4 ms item on
    make reproduce's data. Decoding is deterministic, so an epoch from the cache is the same to the
    bit. The cached arrays are read-only: an augmentation that wrote into one would fail loudly
    instead of changing the next epochs. With workers (``for_workers``: None) each worker would hold
    a copy, and their decoding is off the model's critical path anyway."""

    def __init__(self, budget: int = DECODED_CACHE_BYTES) -> None:
        self.budget, self.used, self.items = budget, 0, {}

    @classmethod
    def for_workers(cls, workers: int) -> "DecodedCache | None":
        """A cache for a loader with no worker processes; None with workers."""
        return cls() if workers == 0 else None

    def get(self, key, read: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        """``read()``'s arrays for ``key``, from the cache when they are there."""
        hit = self.items.get(key)
        if hit is not None:
            return hit
        arrays = read()
        size = sum(a.nbytes for a in arrays)
        if self.used + size <= self.budget:
            for a in arrays:
                a.flags.writeable = False
            self.items[key] = arrays
            self.used += size
        return arrays


def cached(cache: DecodedCache | None, key, read: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """``read()`` through ``cache`` (None: read every time)."""
    return read() if cache is None else cache.get(key, read)


class ClassificationDataset(Dataset):
    """Training patches with their multi-hot labels, for stage 1.

    Item: ``(image (3, S, S) float, label (C,) float, index)``; with ``norm`` None the image is uint8
    (mapped onto the stain target ``stain_norm`` if given), to be scaled on the device
    (:func:`normalise`). With ``augment``: random flips (``geometric="flip"``, the reference) or all
    eight square symmetries (``"d4"``), HED stain jitter of strength ``stain`` (0: none) and the
    ``colour`` augmentation; see :mod:`wsss.data.augment`. The model's stain normalisation
    (``norm.stain`` or ``stain_norm``) comes after augmentation, as at test time. ``cache``: the
    patches as read and resized, kept for the next epochs (:class:`DecodedCache`).
    """

    def __init__(
        self,
        samples: Sequence[TrainSample],
        image_size: int | None,
        norm: InputNorm | None,
        augment: bool = False,
        geometric: str = "flip",
        stain: float = 0.0,
        colour: augment.ColourAugment | None = None,
        stain_norm: StainNorm | None = None,
        cache: DecodedCache | None = None,
    ) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.norm = norm
        self.augment = augment
        self.geometric = geometric
        self.stain = stain
        self.colour = colour
        self.stain_norm = stain_norm
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> tuple[np.ndarray]:
        return (resize_rgb(read_rgb(self.samples[index].path), self.image_size),)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        (image,) = cached(self.cache, index, lambda: self._read(index))
        label = torch.tensor(sample.label, dtype=torch.float32)
        if self.augment:
            # torch's RNG is seeded per worker by the DataLoader, so augmentations are reproducible.
            (image,) = augment.geometric([image], self.geometric)
            image = augment.stain_jitter(image, self.stain)
            image = augment.colour(image, self.colour)
        x = to_uint8_tensor(image, self.stain_norm) if self.norm is None else to_tensor(image, self.norm)
        return x, label, index


def quadrants(row: int, col: int) -> tuple[tuple[slice, slice], ...]:
    """The four regions of a 2×2 mosaic cut at ``(row, col)``: top-left, top-right, bottom-left, bottom-right."""
    return ((slice(0, row), slice(0, col)), (slice(0, row), slice(col, None)),
            (slice(row, None), slice(0, col)), (slice(row, None), slice(col, None)))


def read_masked(sample: MaskedSample, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """An evaluation patch ``(H, W, 3)`` and its mask ``(H, W)`` of class and background values (read
    as ``spec`` encodes them); WsssError if their sizes differ or the mask holds another value."""
    image = read_rgb(sample.image)
    mask = read_class_mask(sample.mask, spec)
    if image.shape[:2] != mask.shape:
        raise WsssError(f"size mismatch between {sample.image} and its mask")
    return image, mask


class MaskedDataset(Dataset):
    """Evaluation patches with their masks.

    Item: ``(image (3, S, S) float, mask (H, W) long at the mask's own size, index)``. The model
    input may be resized to ``image_size``; metrics are always computed at the mask's resolution.
    """

    def __init__(self, samples: Sequence[MaskedSample], image_size: int | None, norm: InputNorm,
                 spec: DatasetSpec) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.norm = norm
        self.spec = spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image, mask = read_masked(self.samples[index], self.spec)
        x = to_tensor(resize_rgb(image, self.image_size), self.norm)
        return x, torch.from_numpy(mask.astype(np.int64)), index
