"""Reading whole-slide images: one small reader interface, two backends.

* **OpenSlide** (the ``wsi`` extra: ``openslide-python`` with ``openslide-bin``, which
  ships the library): Aperio ``.svs``, Hamamatsu ``.ndpi``, MIRAX, generic tiled TIFF and the rest
  of OpenSlide's formats. Imported only when a slide is opened.
* **tifffile** (a core dependency): plain pyramidal TIFFs (levels as successive reduced-resolution
  pages or as SubIFDs, tiled or in strips, uncompressed, deflate or LZW; JPEG tiles need the
  ``imagecodecs`` package), so TIFFs work without OpenSlide.

µm per pixel: for a TIFF (either reader) :func:`tiff_file_mpp` -- OME-XML ``PhysicalSizeX/Y``, an
Aperio description's ``MPP`` (an .svs read with ``--reader tifffile``; its JPEG tiles need
imagecodecs), ImageJ's calibration, resolution tags of at most :data:`TAG_MPP_MAX` -- else
OpenSlide's ``openslide.mpp-x/y`` (a vendor's metadata; a generic TIFF's dpi is filtered likewise).

``auto`` takes OpenSlide when it is installed and recognises the file, else tifffile for ``.tif``
and ``.tiff``. Coordinates: :meth:`Slide.read` takes the level's own pixels; ``downsamples[level]``
is level-0 pixels per level pixel (OpenSlide's convention: the mean over the two axes).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from wsss.errors import WsssError
from wsss.runtime import warn_once

log = logging.getLogger(__name__)

READERS = ("auto", "openslide", "tifffile")
TIFF_SUFFIXES = (".tif", ".tiff")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi")
"""Extensions a folder is searched for slides: OpenSlide's formats (a DICOM slide is a folder of
``.dcm`` files; name one of them) and the TIFFs tifffile reads."""
WSI_ONLY_SUFFIXES = tuple(s for s in SLIDE_SUFFIXES if s not in TIFF_SUFFIXES)
"""Whole-slide formats that are not plain images: ``wsss predict`` sends them to ``predict-wsi``."""
# wsss is not on PyPI: the packages of its `wsi` extra by name (docs/install.md)
INSTALL_HINT = "pip install openslide-python openslide-bin (the wsi extra: pip install -e '.[wsi]' in a clone)"

READ_BUDGET = 64 * 2**20
"""Bytes of source pixels read at once when shrinking a large area (thumbnails)."""

_MICRONS_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre
_RGB_PHOTOMETRICS = (2, 6)  # RGB, YCbCr (decoded to RGB)


class Slide(ABC):
    """A whole-slide image opened for reading; use it as a context manager.

    ``dimensions[level]`` is ``(width, height)``; ``mpp`` is ``(x, y)`` microns per level-0 pixel,
    or None when the file does not record it.
    """

    reader = ""

    def __init__(self, path: Path, dimensions, downsamples, mpp: tuple[float, float] | None,
                 qupath_offset: tuple[int, int] = (0, 0)) -> None:
        self.path = path
        self.dimensions: tuple[tuple[int, int], ...] = tuple((int(w), int(h)) for w, h in dimensions)
        self.downsamples: tuple[float, ...] = tuple(float(d) for d in downsamples)
        self.mpp = mpp
        self.qupath_offset = qupath_offset  # level-0 (x, y) where QuPath's image starts; see qupath_offset()

    @property
    def level_count(self) -> int:
        return len(self.dimensions)

    @abstractmethod
    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels ``(h, w, 3)`` uint8 of level ``level`` from ``(x, y)`` (level pixels), inside the level."""

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_box(self, level: int, x: int, y: int, w: int, h: int) -> None:
        lw, lh = self.dimensions[level]
        if w < 1 or h < 1 or x < 0 or y < 0 or x + w > lw or y + h > lh:
            raise ValueError(f"region {x},{y} {w}×{h} is outside level {level} ({lw}×{lh})")


# --------------------------------------------------------------------------- OpenSlide


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide; transparent pixels (outside the scanned area) come back white."""

    reader = "openslide"

    def __init__(self, path: Path, openslide: ModuleType) -> None:
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise WsssError(f"cannot read slide {path}: {exc}") from None
        props = self._slide.properties
        mpp = _mpp_pair(props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y))
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
        super().__init__(path, self._slide.level_dimensions, self._slide.level_downsamples, mpp,
                         qupath_offset(props))
        self._error = openslide.OpenSlideError

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        self._check_box(level, x, y, w, h)
        ds = self.downsamples[level]
        try:  # OpenSlide places regions in level-0 coordinates
            region = self._slide.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except self._error as exc:
            raise WsssError(f"cannot read slide {self.path}: {exc}") from None
        return rgba_on_white(np.asarray(region))

    def close(self) -> None:
        self._slide.close()


BOUNDS_PROPERTIES = ("openslide.bounds-x", "openslide.bounds-y", "openslide.bounds-width", "openslide.bounds-height")


def qupath_offset(properties) -> tuple[int, int]:
    """Where QuPath's picture of an OpenSlide slide starts, in OpenSlide's level-0 pixels.

    QuPath's OpenSlide server crops a slide to its bounding box by default (MIRAX, Leica SCN,
    Hamamatsu VMS and others record one): when all four ``openslide.bounds-*`` properties are
    present and parse as integers, its image is ``bounds-width × bounds-height`` and its pixel
    ``(0, 0)`` is level-0 ``(bounds-x, bounds-y)``; objects imported into QuPath are placed in those
    cropped coordinates. Otherwise (or a value that is not an integer) nothing is cropped: ``(0, 0)``.
    QuPath ``qupath-extension-openslide``: ``OpenslideImageServer`` (constructor, ``readTile`` adds
    ``boundsX/Y``), ``OpenSlideOptions.cropBoundingBox`` (default true), ``--no-crop`` server argument.
    """
    if not all(name in properties for name in BOUNDS_PROPERTIES):
        return 0, 0
    try:  # Java's Integer.parseInt: an optional sign, then decimal digits only
        x, y = (int(properties[name]) for name in BOUNDS_PROPERTIES[:2])
        for name in BOUNDS_PROPERTIES:
            if not str(properties[name]).lstrip("+-").isdigit():
                raise ValueError(name)
    except ValueError:
        return 0, 0
    return x, y


def rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Non-premultiplied ``(H, W, 4)`` uint8 → ``(H, W, 3)`` composited on white (OpenSlide marks
    what was not scanned as transparent; white is glass to the tissue mask)."""
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.float32) / 255.0
    return (rgba[..., :3] * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


def _mpp_pair(x, y) -> tuple[float, float] | None:
    try:
        pair = (float(x), float(y))
    except (TypeError, ValueError):
        return None
    return pair if all(math.isfinite(v) and v > 0 for v in pair) else None


# --------------------------------------------------------------------------- tifffile


class TiffSlide(Slide):
    """A pyramidal (or single-level) RGB TIFF read with tifffile, one tile or strip at a time."""

    reader = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        try:
            self._tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
            raise WsssError(f"cannot read slide {path}: {exc}") from None
        try:
            if not self._tif.series:
                raise WsssError(f"{path} holds no image (a TIFF without pages)")
            pages = [level.keyframe for level in self._tif.series[0].levels]
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
            self._tif.close()
            raise WsssError(f"cannot read slide {path}: {exc}") from None
        except WsssError:
            self._tif.close()
            raise
        try:
            for page in pages:
                _check_rgb_page(page, path)
        except WsssError:
            self._tif.close()
            raise
        self._pages = pages
        (w0, h0) = (pages[0].imagewidth, pages[0].imagelength)
        dims = [(p.imagewidth, p.imagelength) for p in pages]
        downsamples = [(w0 / w + h0 / h) / 2 for w, h in dims]
        super().__init__(path, dims, downsamples, tiff_file_mpp(self._tif))

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        self._check_box(level, x, y, w, h)
        page = self._pages[level]
        ch, cw = _chunk_shape(page)
        per_row = -(-page.imagewidth // cw)
        out = np.empty((h, w, 3), dtype=np.uint8)
        for ty in range(y // ch, (y + h - 1) // ch + 1):
            for tx in range(x // cw, (x + w - 1) // cw + 1):
                seg = self._segment(page, ty * per_row + tx, (ch, cw))
                top, left = ty * ch, tx * cw
                r0, r1 = max(y, top), min(y + h, top + seg.shape[0])
                c0, c1 = max(x, left), min(x + w, left + seg.shape[1])
                out[r0 - y : r1 - y, c0 - x : c1 - x] = seg[r0 - top : r1 - top, c0 - left : c1 - left, :3]
        return out

    def _segment(self, page, index: int, shape: tuple[int, int]) -> np.ndarray:
        """Tile or strip ``index`` decoded to ``(rows, cols, samples)``; a missing one is white."""
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        data = None
        if count:
            self._tif.filehandle.seek(offset)
            data = self._tif.filehandle.read(count)
        try:
            seg = page.decode(data, index, jpegtables=page.jpegtables)[0]
        except (ValueError, RuntimeError, OSError, KeyError) as exc:  # RuntimeError: tifffile's NotImplemented too
            raise WsssError(f"cannot decode {self.path} (tifffile): {exc}; pip install imagecodecs, "
                            f"or read it with OpenSlide ({INSTALL_HINT})") from None
        if seg is None:
            return np.full((*shape, 3), 255, dtype=np.uint8)
        return seg.reshape(seg.shape[-3:])

    def close(self) -> None:
        self._tif.close()


def _chunk_shape(page) -> tuple[int, int]:
    """Rows and columns of one tile, or of one strip of an untiled page."""
    if page.is_tiled:
        return page.tilelength, page.tilewidth
    return min(page.rowsperstrip or page.imagelength, page.imagelength), page.imagewidth


def _check_rgb_page(page, path: Path) -> None:
    if page.dtype != np.uint8 or page.photometric not in _RGB_PHOTOMETRICS or page.samplesperpixel < 3:
        raise WsssError(f"{path} is not an 8-bit RGB TIFF (photometric {int(page.photometric)}, "
                        f"{page.samplesperpixel} samples of {page.dtype}); an RGB slide is needed")
    if page.samplesperpixel > 1 and page.planarconfig != 1:
        raise WsssError(f"{path} stores colour planes separately; convert it to a tiled RGB TIFF")
    if page.imagedepth > 1:
        raise WsssError(f"{path} is a volume (depth {page.imagedepth}); a 2-D slide is needed")


TAG_MPP_MAX = 10.0
"""Resolution tags that give more µm/px than this are a print or screen resolution, not a
microscope's, and are taken as no record: 72 to 1200 dpi is 353 to 21 µm/px, and a 1× objective's
pixel is about 10 µm."""


def tiff_mpp(tags) -> tuple[float, float] | None:
    """Microns per pixel ``(x, y)`` from TIFF resolution tags (pixels per inch or per centimetre);
    None without them, with ResolutionUnit "none", or above :data:`TAG_MPP_MAX` (a dpi)."""
    unit = tags.get("ResolutionUnit")
    if unit is None or int(unit.value) not in _MICRONS_PER_UNIT:
        return None
    pair = _resolution_mpp(tags, _MICRONS_PER_UNIT[int(unit.value)])
    return pair if pair is not None and max(pair) <= TAG_MPP_MAX else None


def _resolution_mpp(tags, microns_per_unit: float) -> tuple[float, float] | None:
    """``(x, y)`` µm/px of X/YResolution given in pixels per unit of ``microns_per_unit`` µm."""
    xres, yres = tags.get("XResolution"), tags.get("YResolution")
    if xres is None or yres is None:
        return None

    def mpp(value) -> float | None:
        num, den = value if isinstance(value, tuple) else (value, 1)
        return microns_per_unit * den / num if num else None

    return _mpp_pair(mpp(xres.value), mpp(yres.value))


_MICRONS_PER_IMAGEJ_UNIT = {"micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "\u03bcm": 1.0,
                            "\\u00B5m": 1.0, "\\u00b5m": 1.0,  # ImageJ writes µ escaped
                            "nm": 1e-3, "mm": 1e3, "cm": 1e4}


def imagej_mpp(metadata: dict | None, tags) -> tuple[float, float] | None:
    """Microns per pixel of an ImageJ/Fiji TIFF: its description's ``unit`` (micron, µm, mm, ...) and
    X/YResolution in pixels per that unit; None for other files or units (``pixel``, ``inch``)."""
    unit = (metadata or {}).get("unit")
    if not isinstance(unit, str) or unit not in _MICRONS_PER_IMAGEJ_UNIT:
        return None
    return _resolution_mpp(tags, _MICRONS_PER_IMAGEJ_UNIT[unit])


def tiff_file_mpp(tif) -> tuple[float, float] | None:
    """Microns per pixel ``(x, y)`` an open ``tifffile.TiffFile`` records, the first found of: an
    OME-TIFF's ``PhysicalSizeX/Y``, an Aperio description's ``MPP``, ImageJ's calibration, the
    resolution tags (:func:`tiff_mpp`)."""
    page = tif.pages[0]
    return ((ome_mpp(tif.ome_metadata) if tif.is_ome else None) or aperio_mpp(page.description)
            or (imagej_mpp(tif.imagej_metadata, page.tags) if tif.is_imagej else None) or tiff_mpp(page.tags))


def aperio_mpp(description: str | None) -> tuple[float, float] | None:
    """Microns per pixel from an Aperio (.svs) ImageDescription: ``Aperio ...|MPP = 0.499|...``, one
    value for both axes (as OpenSlide's ``aperio.MPP``); None for other descriptions."""
    if not description or not description.startswith("Aperio"):
        return None
    for field in description.split("|")[1:]:
        key, _, value = field.partition("=")
        if key.strip() == "MPP":
            return _mpp_pair(value, value)
    return None


_MICRONS_PER_OME_UNIT = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "mm": 1e3, "cm": 1e4,
                         "dm": 1e5, "m": 1e6, "Å": 1e-4}


def ome_mpp(xml: str | None) -> tuple[float, float] | None:
    """Microns per pixel ``(x, y)`` from the first image's ``PhysicalSizeX/Y`` of OME-XML (unit
    ``PhysicalSizeXUnit``, µm when absent); None without them, in another unit, or unreadable."""
    if not xml:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None

    def size(axis: str) -> float | None:
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if value is None or unit not in _MICRONS_PER_OME_UNIT:
            return None
        try:
            return float(value) * _MICRONS_PER_OME_UNIT[unit]
        except ValueError:
            return None

    return _mpp_pair(size("X"), size("Y"))


def recorded_tiff_mpp(path: Path) -> tuple[float, float] | None:
    """:func:`tiff_file_mpp` of the TIFF at ``path``; None also when tifffile cannot parse it
    (OpenSlide knows more TIFF variants)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tiff_file_mpp(tif)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return None


def image_file_mpp(path: Path) -> tuple[float | None, str | None]:
    """The µm/px an image file (``wsss predict``'s input) records, and why a recorded value is not
    used: TIFFs only (:func:`tiff_file_mpp`; what a PNG or JPEG records is a print resolution at
    most). ``(None, None)`` when it records none; ``(None, reason)`` when the value differs between
    the axes or lies outside :data:`~wsss.data.specs.MPP_RANGE`."""
    from wsss.data.scale import same_mpp

    if Path(path).suffix.lower() not in TIFF_SUFFIXES:
        return None, None
    pair = recorded_tiff_mpp(Path(path))
    if pair is None:
        return None, None
    if not same_mpp(*pair):
        return None, f"{path} records {pair[0]:g}×{pair[1]:g} µm/px (pixels that are not square)"
    if problem := out_of_range(path, pair):
        return None, problem
    return pair[0], None


def out_of_range(path: Path, mpp: tuple[float, float]) -> str | None:
    """What is wrong with a recorded µm/px outside :data:`~wsss.data.specs.MPP_RANGE` (None: nothing):
    the one range for a slide's and an image's record."""
    from wsss.data.specs import MPP_RANGE

    if all(MPP_RANGE[0] <= v <= MPP_RANGE[1] for v in mpp):
        return None
    return f"{path} records {'×'.join(f'{v:g}' for v in dict.fromkeys(mpp))} µm/px (outside {MPP_RANGE[0]:g} to " \
        f"{MPP_RANGE[1]:g})"


# --------------------------------------------------------------------------- opening


def output_stem(path: Path) -> str:
    """The stem of a slide's or image's output files: its name without the extension, OME-TIFF's
    two included (``x.ome.tif`` → ``x``)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _import_openslide() -> ModuleType | None:
    """The ``openslide`` module, or None when it (or its library) is not installed."""
    try:
        import openslide
    except (ImportError, OSError):
        return None
    return openslide


def open_slide(path: Path, reader: str = "auto") -> Slide:
    """Open a slide with ``reader`` (``auto``, ``openslide`` or ``tifffile``); a missing file, an
    unknown format or a missing OpenSlide is a user error. A recorded µm/px outside
    :data:`~wsss.data.specs.MPP_RANGE` is taken as no record, with a warning (as ``wsss predict``
    takes an image's)."""
    slide = _open(Path(path), reader)
    if slide.mpp is not None and (problem := out_of_range(path, slide.mpp)):
        warn_once(log, f"warning: {problem}: taken as not recorded (--slide-mpp or a manifest's mpp gives it)")
        slide.mpp = None
    return slide


def _open(path: Path, reader: str) -> Slide:
    if reader not in READERS:
        raise WsssError(f"unknown slide reader {reader!r}; use {', '.join(READERS)}")
    if not path.is_file():
        raise WsssError(f"slide not found: {path}")
    openslide = None if reader == "tifffile" else _import_openslide()
    if reader == "openslide" and openslide is None:
        raise WsssError(f"reading slides with OpenSlide needs it installed: {INSTALL_HINT}")
    if openslide is not None and (reader == "openslide" or _detect(openslide, path)):
        if path.suffix.lower() in TIFF_SUFFIXES:
            problem = _grey_tiff(path)  # OpenSlide reads a greyscale TIFF as grey RGB: refuse it as tifffile does
            if problem:
                raise WsssError(problem)
        slide = OpenSlideSlide(path, openslide)
        if path.suffix.lower() in TIFF_SUFFIXES:
            # what tifffile finds (OME-XML, ImageJ, ...) first; else OpenSlide's, which for a generic TIFF
            # comes from the resolution tags and is filtered as theirs are (a dpi is no record); a vendor's
            # (Philips, Ventana) comes from its own metadata and is kept
            recorded = recorded_tiff_mpp(path)
            if recorded is not None:
                slide.mpp = recorded
            elif slide.vendor == "generic-tiff" and slide.mpp is not None and max(slide.mpp) > TAG_MPP_MAX:
                slide.mpp = None
        return slide
    if reader == "tifffile" or path.suffix.lower() in TIFF_SUFFIXES:
        return TiffSlide(path)
    if openslide is None:
        raise WsssError(f"reading {path.suffix or 'these'} slides needs OpenSlide: {INSTALL_HINT}")
    raise WsssError(f"cannot read slide {path}: not a format OpenSlide knows")


def _grey_tiff(path: Path) -> str | None:
    """A problem line when a TIFF holds no page or a single-channel first page; None otherwise (also
    when tifffile cannot parse it: OpenSlide knows more TIFF variants)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                return f"{path} holds no image (a TIFF without pages)"
            page = tif.pages.first
            if page.samplesperpixel == 1 and int(page.photometric) in (0, 1):
                return f"{path} is a greyscale TIFF (photometric {int(page.photometric)}); an RGB slide is needed"
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError):
        return None
    return None


def _detect(openslide: ModuleType, path: Path) -> bool:
    try:
        return openslide.OpenSlide.detect_format(str(path)) is not None
    except openslide.OpenSlideError:
        return False


# --------------------------------------------------------------------------- resampled reads


def read_resampled(slide: Slide, level: int, box: tuple[float, float, float, float],
                   size: tuple[int, int]) -> np.ndarray:
    """The level-``level`` area ``box`` = ``(x0, y0, x1, y1)`` (level pixels, fractions allowed)
    resized to ``size`` = ``(w, h)``: ``(h, w, 3)`` uint8.

    An integral box of exactly ``size`` is read as it is. Otherwise the box is read with a margin
    wide enough for PIL's bilinear filter (whose support widens when shrinking), so neighbouring
    boxes read apart resample as if the level had been resized whole.
    """
    x0, y0, x1, y1 = box
    w, h = size
    if all(float(v).is_integer() for v in box) and (x1 - x0, y1 - y0) == (w, h):
        return slide.read(level, int(x0), int(y0), w, h)
    lw, lh = slide.dimensions[level]
    mx, my = math.ceil((x1 - x0) / w) + 1, math.ceil((y1 - y0) / h) + 1
    rx0, ry0 = max(0, math.floor(x0) - mx), max(0, math.floor(y0) - my)
    rx1, ry1 = min(lw, math.ceil(x1) + mx), min(lh, math.ceil(y1) + my)
    src = Image.fromarray(slide.read(level, rx0, ry0, rx1 - rx0, ry1 - ry0))
    return np.asarray(src.resize((w, h), Image.BILINEAR, box=(x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0)))


def fit_size(width: float, height: float, max_side: int) -> tuple[int, int]:
    """``(w, h)`` of a ``width × height`` area shrunk to at most ``max_side`` px a side, never enlarged."""
    f = min(1.0, max_side / max(width, height))
    return max(1, round(width * f)), max(1, round(height * f))


def read_thumbnail(slide: Slide, box0: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """The level-0 area ``box0`` = ``(x0, y0, x1, y1)`` as a ``size`` = ``(w, h)`` picture ``(h, w, 3)``.

    Read from the coarsest level still at least as fine as the picture, a few rows at a time so
    that no more than :data:`READ_BUDGET` bytes of source pixels are held (a slide without a
    pyramid is shrunk from level 0).
    """
    x0, y0, x1, y1 = box0
    w, h = size
    need = min((x1 - x0) / w, (y1 - y0) / h)
    level = max(i for i, d in enumerate(slide.downsamples) if d <= need * 1.001 or i == 0)
    ds = slide.downsamples[level]
    lw, lh = slide.dimensions[level]
    lx0, ly0, lx1, ly1 = x0 / ds, y0 / ds, min(x1 / ds, lw), min(y1 / ds, lh)
    step = (ly1 - ly0) / h  # level rows per picture row
    rows = max(1, int(READ_BUDGET / (3 * (lx1 - lx0 + 2) * (step + 2))))
    out = np.empty((h, w, 3), dtype=np.uint8)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        out[r0:r1] = read_resampled(slide, level, (lx0, ly0 + r0 * step, lx1, ly0 + r1 * step), (w, r1 - r0))
    return out
