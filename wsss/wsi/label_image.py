"""Label images of a slide: a palette PNG when small, else a tiled pyramidal OME-TIFF.

The OME-TIFF (``<name>_mask.ome.tif``) holds class indices (uint8, one channel) with the dataset's
palette as the TIFF colour map, tiles of 256², deflate, and reduced levels (every 2nd pixel, so
classes stay classes) in SubIFDs, the OME-TIFF pyramid layout that Bio-Formats (and so QuPath)
reads. Its OME-XML gives the physical pixel size (``PhysicalSizeX/Y`` in µm) when the slide records
one, where the image lies on the slide (:class:`~wsss.wsi.placement.Placement`: a ``Plane`` position in
µm and a ``wsss/placement`` ``MapAnnotation`` in level-0 pixels), and the class of every index in a ``MapAnnotation`` (namespace :data:`CLASSES_NAMESPACE`), with
the colours in a second one. OpenSlide opens it as a generic tiled TIFF (level 0 only: its TIFF
driver does not follow SubIFDs). Every tile is written from the (memory-mapped) label array in row
order, so memory stays at one row of tiles; the file is written atomically and is byte-for-byte
the same for the same labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from wsss.data.png import write_mask
from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError
from wsss.runs.owner import remove_ours
from wsss.runtime import atomic_path
from wsss.wsi.placement import Placement

PNG_MAX_PIXELS = 89_478_485
"""Largest label image written as PNG by ``--mask-format auto``: PIL's decompression-bomb warning
limit, so that ``Image.open`` reads it without complaint."""

MASK_FORMATS = ("auto", "png", "ome-tiff")
TIFF_TILE = 256
CLASSES_NAMESPACE = "wsss/classes"
COLOURS_NAMESPACE = "wsss/class-colours"
_OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def check_mask_format(fmt: str) -> None:
    if fmt not in MASK_FORMATS:
        raise WsssError(f"--mask-format must be one of {', '.join(MASK_FORMATS)}, not {fmt!r}")


def label_names(stem: Path) -> dict[str, Path]:
    """Every label-image file name a run may write for ``stem`` (the legacy flat TIFF included)."""
    return {kind: stem.with_name(stem.name + suffix) for kind, suffix in
            (("png", "_mask.png"), ("ome-tiff", "_mask.ome.tif"), ("tif", "_mask.tif"))}


def label_kind(fmt: str, pixels: int, png_max_pixels: int = PNG_MAX_PIXELS) -> str:
    """``png`` or ``ome-tiff``: ``fmt``, or for ``auto`` PNG up to ``png_max_pixels`` pixels."""
    check_mask_format(fmt)
    return fmt if fmt != "auto" else ("png" if pixels <= png_max_pixels else "ome-tiff")


def label_image_path(stem: Path, fmt: str, pixels: int) -> Path:
    """The label image a run writes for ``stem``, known before any label is computed."""
    return label_names(stem)[label_kind(fmt, pixels)]


def write_label_image(stem: Path, labels: np.ndarray, spec: DatasetSpec, mpp: tuple[float, float] | None,
                      fmt: str = "auto", png_max_pixels: int = PNG_MAX_PIXELS,
                      placement: Placement | None = None) -> Path:
    """``<stem>_mask.png`` or ``<stem>_mask.ome.tif`` (:func:`label_kind`); label images of the
    other kinds that an earlier run wrote are removed (:func:`wsss.runs.owner.remove_ours`)."""
    names = label_names(stem)
    kind = label_kind(fmt, labels.size, png_max_pixels)
    if kind == "png":
        write_mask(names["png"], np.asarray(labels), spec.flat_palette())
    else:
        write_ome_tiff(names["ome-tiff"], labels, spec, mpp, stem.name, placement)
    for other, path in names.items():
        if other != kind:
            remove_ours(path)
    return names[kind]


def pyramid_levels(shape: tuple[int, int], tile: int = TIFF_TILE) -> list[int]:
    """Steps (1, 2, 4, …) of the levels: halved until the level fits in one tile."""
    steps = [1]
    while max(-(-side // steps[-1]) for side in shape) > tile:
        steps.append(steps[-1] * 2)
    return steps


def ome_xml(name: str, shape: tuple[int, int], spec: DatasetSpec, mpp: tuple[float, float] | None,
            placement: Placement | None = None) -> str:
    """The OME-XML of a one-channel uint8 label image: size, µm per pixel, where it lies, the classes."""
    height, width = shape
    physical = ""
    if mpp is not None:
        physical = (f' PhysicalSizeX="{mpp[0]!r}" PhysicalSizeXUnit="&#181;m"'
                    f' PhysicalSizeY="{mpp[1]!r}" PhysicalSizeYUnit="&#181;m"')
    indices = [*range(spec.num_classes), spec.background_index]
    names = [*spec.classes, "background"]
    colours = [*spec.colors, spec.background_color]
    classes = "".join(f'<M K="{i}">{escape(n)}</M>' for i, n in zip(indices, names))
    rgb = "".join(f'<M K="{i}">#{r:02x}{g:02x}{b:02x}</M>' for i, (r, g, b) in zip(indices, colours))
    description = "class index per pixel: " + ", ".join(f"{i} {n}" for i, n in zip(indices, names))
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<OME xmlns="{_OME_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'xsi:schemaLocation="{_OME_NS} {_OME_NS}/ome.xsd" Creator="wsss">'
        f'<Image ID="Image:0" Name={quoteattr(name + " class labels")}>'
        f'<Description>{escape(description)}</Description>'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="{width}" SizeY="{height}" '
        f'SizeC="1" SizeZ="1" SizeT="1"{physical}>'
        '<Channel ID="Channel:0:0" Name="class" SamplesPerPixel="1"/>'
        '<TiffData IFD="0" PlaneCount="1"/>'
        + (placement.ome_planes(1) if placement is not None else "") +
        '</Pixels>'
        '<AnnotationRef ID="Annotation:0"/><AnnotationRef ID="Annotation:1"/>'
        + ('<AnnotationRef ID="Annotation:2"/>' if placement is not None else "") +
        '</Image>'
        '<StructuredAnnotations>'
        f'<MapAnnotation ID="Annotation:0" Namespace="{CLASSES_NAMESPACE}"><Value>{classes}</Value></MapAnnotation>'
        f'<MapAnnotation ID="Annotation:1" Namespace="{COLOURS_NAMESPACE}"><Value>{rgb}</Value></MapAnnotation>'
        + (placement.ome_annotation("Annotation:2") if placement is not None else "") +
        '</StructuredAnnotations>'
        '</OME>'
    )


def write_ome_tiff(path: Path, labels: np.ndarray, spec: DatasetSpec, mpp: tuple[float, float] | None,
                   name: str, placement: Placement | None = None) -> None:
    """``labels`` ``(H, W)`` uint8 as a tiled, deflate, palette OME-TIFF with a SubIFD pyramid."""
    import tifffile

    colormap = np.asarray(spec.flat_palette(), dtype=np.uint16).reshape(256, 3).T * 257
    steps = pyramid_levels(labels.shape)
    common = dict(dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE), photometric="palette", colormap=colormap,
                  compression="zlib", metadata=None)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=labels.size > 2**30) as tif:
            for k, step in enumerate(steps):
                level = labels[::step, ::step]
                extra = {"subifds": len(steps) - 1, "description": ome_xml(name, labels.shape, spec, mpp, placement)} if k == 0 \
                    else {"subfiletype": 1}
                if mpp is not None:
                    extra.update(resolution=(1e4 / (mpp[0] * step), 1e4 / (mpp[1] * step)), resolutionunit="CENTIMETER")
                tif.write(_tiles(level, TIFF_TILE), shape=level.shape, **common, **extra)


def _tiles(labels: np.ndarray, side: int) -> Iterator[np.ndarray]:
    """``side × side`` tiles of ``labels`` in row order, zero-padded at the right and bottom edges."""
    height, width = labels.shape
    for top in range(0, height, side):
        rows = np.asarray(labels[top : top + side])
        for left in range(0, width, side):
            tile = np.zeros((side, side), dtype=np.uint8)
            block = rows[:, left : left + side]
            tile[: block.shape[0], : block.shape[1]] = block
            yield tile
