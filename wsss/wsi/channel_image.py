"""Multi-channel images of a slide or an image: probability maps and tissue masks.

:func:`write_channels` writes ``(C, H, W)`` uint8 channels (class probabilities 0–255, or a tissue
mask 0/255) as a tiled (256²), deflate, pyramidal OME-TIFF: one page per channel, each with its
reduced levels (every 2nd pixel, as the label image, so each level's argmax is still the label
pyramid's) in SubIFDs — the layout Bio-Formats (QuPath) reads — the channel names and colours in
the OME-XML. Tiles are written channel by channel in row order from the (memory-mapped) array, so
memory stays at one row of tiles; the file is written atomically.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from PIL import Image

from wsss.data.specs import DatasetSpec
from wsss.runtime import atomic_path
from wsss.wsi.label_image import TIFF_TILE, pyramid_levels
from wsss.wsi.placement import Placement

OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def physical_size(mpp: tuple[float, float] | None) -> str:
    """The ``PhysicalSizeX/Y`` attributes of an OME ``Pixels`` element (none without µm/px)."""
    if mpp is None:
        return ""
    return (f' PhysicalSizeX="{mpp[0]!r}" PhysicalSizeXUnit="&#181;m"'
            f' PhysicalSizeY="{mpp[1]!r}" PhysicalSizeYUnit="&#181;m"')


def ome_colour(rgb: Sequence[int]) -> int:
    """OME's ``Color``: RGBA packed in a signed 32-bit integer."""
    r, g, b = (int(v) for v in rgb)
    value = (r << 24) | (g << 16) | (b << 8) | 255
    return value - 2**32 if value >= 2**31 else value


def channels_xml(name: str, shape: tuple[int, int, int], names: Sequence[str], description: str,
                 mpp: tuple[float, float] | None, placement: Placement | None,
                 colours: Sequence[Sequence[int]] | None = None) -> str:
    """The OME-XML of ``(C, H, W)`` uint8 channels stored one page per channel."""
    count, height, width = shape
    channels = "".join(
        f'<Channel ID="Channel:0:{c}" Name={quoteattr(n)} SamplesPerPixel="1"'
        + (f' Color="{ome_colour(colours[c])}"' if colours is not None else "") + "/>"
        for c, n in enumerate(names))
    tiffdata = "".join(f'<TiffData IFD="{c}" FirstC="{c}" PlaneCount="1"/>' for c in range(count))
    planes = placement.ome_planes(count) if placement is not None else ""
    annotation = placement.ome_annotation("Annotation:0") if placement is not None else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<OME xmlns="{OME_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'xsi:schemaLocation="{OME_NS} {OME_NS}/ome.xsd" Creator="wsss">'
        f'<Image ID="Image:0" Name={quoteattr(name)}>'
        f'<Description>{escape(description)}</Description>'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="{width}" SizeY="{height}" '
        f'SizeC="{count}" SizeZ="1" SizeT="1"{physical_size(mpp)}>'
        f'{channels}{tiffdata}{planes}'
        '</Pixels>'
        + ('<AnnotationRef ID="Annotation:0"/>' if annotation else "")
        + '</Image>'
        + (f'<StructuredAnnotations>{annotation}</StructuredAnnotations>' if annotation else "")
        + '</OME>'
    )


def write_channels(path: Path, channels: np.ndarray, names: Sequence[str], description: str,
                   mpp: tuple[float, float] | None, placement: Placement | None = None,
                   colours: Sequence[Sequence[int]] | None = None) -> Path:
    """``channels`` ``(C, H, W)`` uint8 (a memory map is read a row of tiles at a time) as a tiled,
    deflate, pyramidal multi-channel OME-TIFF at ``path``; returns ``path``."""
    import tifffile

    count, height, width = channels.shape
    if len(names) != count:
        raise ValueError(f"{count} channels but {len(names)} names")
    steps = pyramid_levels((height, width))
    xml = channels_xml(path.name.split(".")[0], channels.shape, names, description, mpp, placement, colours)
    common = dict(dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE), photometric="minisblack", compression="zlib",
                  metadata=None)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=channels.size > 2**30) as tif:
            for k, step in enumerate(steps):
                level = channels[:, ::step, ::step]
                extra = {"subifds": len(steps) - 1, "description": xml} if k == 0 else {"subfiletype": 1}
                if mpp is not None:
                    extra.update(resolution=(1e4 / (mpp[0] * step), 1e4 / (mpp[1] * step)), resolutionunit="CENTIMETER")
                tif.write(_channel_tiles(level, TIFF_TILE), shape=level.shape, **common, **extra)
    return path


def _channel_tiles(channels: np.ndarray, side: int) -> Iterator[np.ndarray]:
    """``side × side`` tiles of every channel in turn, each in row order, zero-padded at the edges."""
    count, height, width = channels.shape
    for c in range(count):
        for top in range(0, height, side):
            rows = np.asarray(channels[c, top : top + side])
            for left in range(0, width, side):
                tile = np.zeros((side, side), dtype=np.uint8)
                block = rows[:, left : left + side]
                tile[: block.shape[0], : block.shape[1]] = block
                yield tile


def write_probability_image(path: Path, probs: np.ndarray, spec: DatasetSpec, mpp: tuple[float, float] | None,
                            placement: Placement | None = None) -> Path:
    """``(C, H, W)`` uint8 class probabilities (:func:`wsss.probabilities.quantise`) as a pyramidal
    OME-TIFF, one channel per class, named and coloured by class."""
    description = ("class probabilities x 255 (uint8), one channel per class: " + ", ".join(spec.classes)
                   + "; the argmax of the channels is the label image's class wherever a window was segmented")
    return write_channels(path, probs, list(spec.classes), description, mpp, placement, list(spec.colors))


def write_tissue_image(path: Path, tissue: np.ndarray, mpp: tuple[float, float] | None,
                       placement: Placement | None = None) -> Path:
    """A tissue mask ``(H, W)`` uint8 (255 tissue, 0 not) as a one-channel pyramidal OME-TIFF."""
    description = "tissue mask: 255 where the saturation is above the slide's tissue threshold, else 0"
    return write_channels(path, tissue[None], ["tissue"], description, mpp, placement)


def write_tissue_png(path: Path, tissue: np.ndarray) -> Path:
    """A tissue mask ``(H, W)`` (bool, or uint8 0/255) as a greyscale PNG, 255 tissue; written atomically."""
    values = np.asarray(tissue)
    values = values.astype(np.uint8) * 255 if values.dtype == bool else values.astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(values, mode="L").save(tmp, format="PNG")
    return path
