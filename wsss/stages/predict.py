"""``wsss predict``: a stage-2 segmenter (optionally gated by the stage-1 classifier) on the user's own
images, of any size.

Outputs, for every input image ``<name>.<ext>``::

    OUT/<name>_mask.png      palette PNG of class indices (the spec's palette; its background index = white
                             background, for specs whose white is background)
    OUT/<name>_overlay.png   the image blended with the class colours, a legend underneath
    OUT/summary.csv          one row per processed image: size and area fraction of every class
    OUT/<name>_probs.ome.tif with --save-probs: the class probabilities, uint8 0-255, one channel per
                             class (named by class), a tiled pyramidal OME-TIFF (channel_image.py)
    OUT/<name>_tissue.png    with --save-tissue-mask: 255 where the pixel is tissue (saturation above
                             Otsu's threshold of the image, as predict-wsi's tissue), else 0

Each image is segmented by the sliding window of :mod:`wsss.tiling` with the tile predictor of
:mod:`wsss.inference`; each window is resized by ``image_size / tile`` when the checkpoint records
the input size it was trained at, so tissue appears at the scale the model learned.

Magnification: an image's µm per pixel is what the file records (a TIFF's OME-XML, Aperio, ImageJ or
microscope-range resolution tags: :func:`wsss.wsi.slide.image_file_mpp`), else ``--mpp``. When the
checkpoint records the µm/px of its training patches (:mod:`wsss.data.scale`), every image is
resampled to it first and its mask back to the image's size; when either is unknown the images are
taken as they are, with one warning. The window (``--tile``) defaults to the checkpoint's training
patch size.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.data import stain
from wsss.data.png import check_rgb_mode, write_mask, write_rgb
from wsss.data.scale import image_side, resample_factor, resampled_size, same_mpp
from wsss.data.specs import DatasetSpec, check_mpp
from wsss.errors import WsssError
from wsss.gate import DEFAULT_GATE_THRESHOLD, check_gate_options
from wsss.inference import (
    TilePredictor, check_tta, check_window_options, load_models, model_scale, run_precision, segment_image,
    upgrade_settings, window_for, windows_counted,
)
from wsss.runs.journal import diff_settings
from wsss.runs.owner import Owner, check_output_folder, file_sha256, owned_folder
from wsss.pixels import class_fractions, overlay_with_legend, row_blocks
from wsss.runtime import atomic_path, check_precision, note_saved, progress_bar
from wsss.wsi.channel_image import write_probability_image, write_tissue_png
from wsss.wsi.slide import WSI_ONLY_SUFFIXES, image_file_mpp
from wsss.wsi.tissue import image_tissue

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SUMMARY_NAME = "summary.csv"

MAX_PIXELS = 1_000_000_000
"""Largest image read (3 GB as RGB); PIL's own decompression-bomb limit (89 Mpx) is lifted up to this."""



@dataclass(frozen=True)
class PredictConfig:
    """``wsss predict``: which images, which models, where to write, how to tile and run."""

    inputs: tuple[Path, ...]
    checkpoint: Path
    out: Path
    dataset: str | None = None  # None: the spec recorded in the checkpoint
    gate: bool = False
    stage1_checkpoint: Path | None = None
    gate_threshold: float = DEFAULT_GATE_THRESHOLD
    gate_mode: str = "mask"
    tile: int | None = None  # None: the checkpoint's training patch size (window_for)
    overlap: int | None = None  # None: 32 px, or half the window when that is less
    batch_size: int = 8
    device: str = "auto"
    precision: str = "fp32"  # fp32, bf16, fp16 or auto (wsss.runtime.resolve_precision)
    tta: str = "none"
    force: bool = False  # replace files in OUT that wsss did not write, and predictions of other settings
    mpp: float | None = None  # µm per pixel of the input images; None: not known
    save_probs: bool = False  # also <name>_probs.ome.tif
    save_tissue_mask: bool = False  # also <name>_tissue.png

    def __post_init__(self) -> None:
        check_precision(self.precision)
        check_window_options(self.tile, self.overlap, self.batch_size, self.gate, self.stage1_checkpoint)
        check_gate_options(self.gate_mode, self.gate_threshold)
        check_tta(self.tta)
        if self.mpp is not None:
            check_mpp(self.mpp, "--mpp")


@dataclass
class PredictResult:
    """What a run did: one summary row per processed image, one message per image that failed."""

    rows: list[dict]
    failures: list[str]
    total: int
    summary: Path | None


# --------------------------------------------------------------------------- inputs


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly or found (not recursively) in folders, in order, without repeats.

    A folder contributes its ``.png/.jpg/.jpeg/.tif/.tiff`` files. A path that does not exist or a
    folder holding no image is a user error (nothing is processed).
    """
    images: list[Path] = []
    seen: set[Path] = set()
    for path in map(Path, inputs):
        if path.is_dir():
            found = _folder_images(path)
            if not found:
                slides = any(p.suffix.lower() in WSI_ONLY_SUFFIXES for p in path.iterdir())
                raise WsssError(f"{path} holds no PNG, JPEG or TIFF images"
                                + (" (it holds whole-slide images: segment them with wsss predict-wsi)" if slides else ""))
        elif path.exists():
            check_not_a_slide(path)
            found = [path]
        else:
            raise WsssError(f"input not found: {path}")
        for image in found:
            if image.resolve() not in seen:
                seen.add(image.resolve())
                images.append(image)
    if not images:
        raise WsssError("no input images given")
    _check_output_names(images)
    return images


def check_not_a_slide(path: Path) -> None:
    """A whole-slide file (:data:`~wsss.wsi.slide.WSI_ONLY_SUFFIXES`) is refused: levels, tissue and µm/px are
    predict-wsi's."""
    if Path(path).suffix.lower() in WSI_ONLY_SUFFIXES:
        raise WsssError(f"{path} is a whole-slide image: segment it with wsss predict-wsi")


def _folder_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _check_output_names(images: Sequence[Path]) -> None:
    """Two inputs with the same name stem would write the same output files."""
    by_stem: dict[str, Path] = {}
    for image in images:
        other = by_stem.setdefault(image.stem, image)
        if other != image:
            raise WsssError(f"{other} and {image} would both be written as {image.stem}_mask.png; rename one")


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An input image as ``(H, W, 3)`` uint8; raises :class:`WsssError` when it cannot be
    read, is not RGB (palette and CMYK images are converted) or has more than ``max_pixels``."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a clearer message
    try:
        with Image.open(path) as img:
            check_rgb_mode(img, path)
            if img.width * img.height > max_pixels:
                raise WsssError(f"{path} is {img.width}×{img.height} px; at most {max_pixels:,} pixels are read")
            img.load()
            return _pixels(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise WsssError(f"cannot read image {path}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _pixels(img: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 copy of an RGB PIL image, a block of rows at a time: ``np.asarray`` of the
    whole image goes through ``tobytes``, a third copy of a large image while PIL's is still held."""
    out = np.empty((img.height, img.width, 3), dtype=np.uint8)
    for rows in row_blocks(img.height, img.width):
        out[rows] = np.asarray(img.crop((0, rows.start, img.width, rows.stop)))
    return out


# --------------------------------------------------------------------------- one image, the run


def output_paths(out: Path, image: Path) -> tuple[Path, Path]:
    """``(OUT/<name>_mask.png, OUT/<name>_overlay.png)``."""
    return out / f"{image.stem}_mask.png", out / f"{image.stem}_overlay.png"


def probs_path(out: Path, image: Path) -> Path:
    return out / f"{image.stem}_probs.ome.tif"


def tissue_path(out: Path, image: Path) -> Path:
    return out / f"{image.stem}_tissue.png"


def optional_outputs(cfg: PredictConfig, image: Path) -> list[Path]:
    """The files ``--save-probs`` and ``--save-tissue-mask`` add for ``image``."""
    return ([probs_path(cfg.out, image)] if cfg.save_probs else []) + \
        ([tissue_path(cfg.out, image)] if cfg.save_tissue_mask else [])


MIN_SIDE_OF_TILE = 0.5
"""An image whose shorter side is below this fraction of ``--tile`` is refused: the model would see a
sliver of its training field of view (a 1×1 px image came out as "100 % one class")."""


def check_image_size(path: Path, image: np.ndarray, tile: int, factor: float | None = None) -> None:
    """Refuse an image smaller than the window allows, measured at the model's µm/px (``factor``:
    model pixels per image pixel, :func:`wsss.inference.segment_image`)."""
    height, width = image.shape[:2]
    resampled = ""
    if factor is not None and factor != 1.0:
        width, height = resampled_size((width, height), factor)
        resampled = f" ({width}×{height} at the model's µm/px)"
    need = math.ceil(tile * MIN_SIDE_OF_TILE)
    if min(height, width) < need:
        raise WsssError(f"{path} is {image.shape[1]}×{image.shape[0]} px{resampled}, far below the {tile} px window "
                        f"(at least {need} px a side is needed; a smaller --tile may fit)")


def predict_image(path: Path, predictor: TilePredictor, spec: DatasetSpec, cfg: PredictConfig,
                  progress: bool = False, factor: float | None = None, mpp: float | None = None) -> dict:
    """Segment one image and write its mask and overlay; returns its summary row. ``factor``: model
    pixels per image pixel (:func:`wsss.data.scale.resample_factor`); the image is resampled by it
    for the model and labels (and probabilities) taken back to the image's size. ``mpp``: the
    image's µm/px, recorded in its probability image (None: not known)."""
    image = read_image(path)
    check_image_size(path, image, cfg.tile, factor=factor)
    segmentation = segment_image(image, predictor, spec, cfg.tile, cfg.overlap, cfg.batch_size, cfg.save_probs,
                                 progress, factor)
    mask = segmentation.labels
    mask_path, overlay_path = output_paths(cfg.out, path)
    write_mask(mask_path, mask, spec.flat_palette())
    if cfg.save_probs:
        write_probability_image(probs_path(cfg.out, path), segmentation.probs_uint8(), spec,
                                (mpp, mpp) if mpp is not None else None)
    del segmentation
    if cfg.save_tissue_mask:
        write_tissue_png(tissue_path(cfg.out, path), image_tissue(image)[0])
    canvas = overlay_with_legend(image, mask, spec)
    del image  # the overlay's PNG encoder needs room too
    write_rgb(overlay_path, canvas)
    return summary_row(path, mask, spec)


def images_colour(factors: dict[Path, float | None], tile: int) -> stain.SetColour:
    """``reinhard-set``: the colour of the images (one set; ``factors``: each image's model pixels per
    image pixel), over at most :data:`~wsss.data.stain.FIT_PATCHES` windows of ``tile`` model pixels
    shared between them; an image that cannot be read is left out (its prediction reports it)."""
    def readable():
        for path, factor in factors.items():
            try:
                yield read_image(path), image_side(tile, factor)
            except WsssError:
                continue

    return stain.measure_images(readable(), len(factors))


def summary_row(path: Path, mask: np.ndarray, spec: DatasetSpec) -> dict:
    """``{"image", "width", "height", <class>..., "background"}`` with area fractions per class."""
    fractions = class_fractions(mask, max(spec.num_classes, spec.background_index) + 1)
    row = {"image": str(path), "width": mask.shape[1], "height": mask.shape[0]}
    row.update({name: float(f) for name, f in zip(spec.classes, fractions)})
    row["background"] = float(fractions[spec.background_index])
    return row


def write_summary(path: Path, rows: Sequence[dict], spec: DatasetSpec) -> None:
    """``summary.csv``: one row per image, fractions with 6 decimals; written atomically."""
    fields = ["image", "width", "height", *spec.classes, "background"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def settings(cfg: PredictConfig, spec: DatasetSpec) -> dict:
    """What a prediction depends on (the models' bytes, classes, tiling, gate, the images' µm/px);
    not where or how fast."""
    return {"checkpoint_sha256": file_sha256(cfg.checkpoint), "dataset": spec.name, "tile": cfg.tile,
            "overlap": cfg.overlap, "precision": run_precision(cfg), "tta": cfg.tta, "mpp": cfg.mpp,
            "gate": [file_sha256(cfg.stage1_checkpoint), cfg.gate_threshold, cfg.gate_mode] if cfg.gate else None}


def input_folders_of(images: Sequence[Path], inputs: Sequence[Path]) -> list[Path]:
    """The folders the images are read from: OUT may not be one of them."""
    return sorted({Path(p) for p in inputs if Path(p).is_dir()} | {Path(p).parent for p in images})


def run(cfg: PredictConfig, progress: bool = True) -> PredictResult:
    """Predict every input image; an image that cannot be read is listed in ``failures`` and the
    others still go on. ``summary.csv`` lists the processed images (none: not written), together with
    those an earlier run with the same settings wrote into OUT.

    OUT is held for the run; it may not be a folder the images are read from, files in it that wsss
    did not write are not replaced, nor predictions made with other settings, unless ``cfg.force``."""
    check_output_folder(cfg.out)
    images = collect_images(cfg.inputs)
    cfg, factors, mpps = with_model_scale(cfg, images)
    predictor, spec = load_models(cfg)
    predictor = predictor.for_set(lambda: images_colour(factors, cfg.tile),
                                  f"the {len(images)} input image{'s' if len(images) > 1 else ''}")
    now = settings(cfg, spec)
    with owned_folder(cfg.out, "predict", force=cfg.force, read_from=input_folders_of(images, cfg.inputs)) as owner:
        previous = _previous_settings(owner, now, cfg.force)
        owner.begin({"settings": now, "inputs": [str(p) for p in images]}, {"checkpoint": now["checkpoint_sha256"]})
        summary = cfg.out / SUMMARY_NAME
        owner.claim([summary, *(p for image in images for p in (*output_paths(cfg.out, image),
                                                                 *optional_outputs(cfg, image)))], "outputs")
        earlier = read_summary(summary, spec) if previous and owner.ours(summary) else []
        rows, failures = [], []
        note_saved(f"no image finished yet in {cfg.out}")
        for path in progress_bar(images, progress and len(images) > 1, desc="predict"):
            try:
                rows.append(predict_image(path, predictor, spec, cfg, progress, factors[path], mpps[path]))
            except WsssError as exc:
                failures.append(str(exc))
                log.debug("skipping %s: %s", path, exc)
            note_saved(f"{len(rows)} of {len(images)} images segmented into {cfg.out} (a rerun does them all again)")
        stain.log_counts(windows_counted(predictor))
        written = None
        if rows:
            written = summary
            done = {row["image"] for row in rows}
            write_summary(summary, [r for r in earlier if r["image"] not in done] + rows, spec)
    return PredictResult(rows, failures, len(images), written)


def with_model_scale(cfg: PredictConfig, images: Sequence[Path]
                     ) -> tuple[PredictConfig, dict[Path, float | None], dict[Path, float | None]]:
    """The configuration with the window the checkpoint was trained with (unless ``--tile`` gives
    one), and for each image the factor it is resampled by to the model's µm/px (None: as it is)
    and its µm/px (None: not known).

    An image's µm/px is what its file records (:func:`~wsss.wsi.slide.image_file_mpp`), else
    ``--mpp``; a recorded value that ``--mpp`` contradicts is kept, with one warning, as
    ``predict-wsi --slide-mpp`` does. Images whose scale is not known get one warning in all."""
    model_mpp, patch_size = model_scale(cfg.checkpoint)
    tile, overlap = window_for(cfg.tile, cfg.overlap, patch_size)
    cfg = replace(cfg, tile=tile, overlap=overlap)
    read = {path: image_file_mpp(path) for path in images}
    recorded = {path: mpp for path, (mpp, _) in read.items()}
    unusable = [problem for _, problem in read.values() if problem]
    if unusable:
        others = f" ({len(unusable) - 1} more images record a µm/px that cannot be used)" if len(unusable) > 1 else ""
        log.warning("warning: %s%s: taken as not recorded (--mpp, if given, is used instead)", unusable[0], others)
    kept = [(path, mpp) for path, mpp in recorded.items() if mpp is not None and cfg.mpp is not None
            and not same_mpp(mpp, cfg.mpp)]
    if kept:
        path, mpp = kept[0]
        others = f" ({len(kept) - 1} more images record a µm/px of their own)" if len(kept) > 1 else ""
        log.warning("warning: %s records %g µm/px%s; --mpp %g is for images that record none, so the recorded "
                    "value is used", path, mpp, others, cfg.mpp)
    image_mpp = {path: cfg.mpp if mpp is None else mpp for path, mpp in recorded.items()}
    factors = {path: resample_factor(mpp, model_mpp) for path, mpp in image_mpp.items()}
    unknown = [path for path, factor in factors.items() if factor is None]
    if unknown:
        images_known = any(mpp is not None for mpp in image_mpp.values())
        log.warning("warning: %s", unknown_scale(model_mpp, cfg.checkpoint, len(unknown), len(images), images_known))
    for mpp in sorted({image_mpp[p] for p, f in factors.items() if f not in (None, 1.0)}):
        log.info("images at %g µm/px are resampled by %.4g to the model's %g µm/px", mpp,
                 resample_factor(mpp, model_mpp), model_mpp)
    return cfg, factors, image_mpp


def unknown_scale(model_mpp: float | None, checkpoint: Path, unknown: int, total: int, images_known: bool) -> str:
    """What is not known about the images' and the model's µm/px, and what is done instead:
    ``unknown`` of the ``total`` images have none; ``images_known``: some image has one."""
    if model_mpp is None and not images_known:
        return (f"neither the images' µm/px (--mpp) nor that of the model is known ({checkpoint} records none): "
                "the images are segmented as they are, which is right only at the training patches' magnification")
    if model_mpp is None:
        return (f"{checkpoint} does not record the µm/px it was trained at: the images' µm/px (--mpp or their "
                "files') is not used, the images are segmented as they are")
    which = "the images'" if unknown == total else f"{unknown} of the {total} images'"
    return (f"{which} µm/px is not known (--mpp, or recorded in the file): they are taken to be at the model's "
            f"{model_mpp:g} µm/px (pass --mpp to have them resampled to it)")


def _previous_settings(owner: Owner, now: dict, force: bool) -> bool:
    """True when OUT holds predictions of an earlier run with the same settings (their summary rows
    are kept); a run of other settings stops here unless ``force``: one summary.csv, one model."""
    previous = owner.previous_run()
    if previous is None:
        return False
    then = upgrade_settings((previous.get("config") or {}).get("settings") or {})
    diff = diff_settings(then, now)
    if not diff:
        return True
    if force:
        return False
    raise WsssError(f"{owner.folder} holds the predictions of another model or settings ({'; '.join(diff)}): "
                    "pass --force to write these next to them (summary.csv then lists this run only), or choose "
                    "another --out")


def read_summary(path: Path, spec: DatasetSpec) -> list[dict]:
    """The rows of an earlier ``summary.csv`` with the columns :func:`write_summary` writes, or none."""
    fields = ["image", "width", "height", *spec.classes, "background"]
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != fields:
                return []
            return [{k: (int(v) if k in ("width", "height") else v if k == "image" else float(v))
                     for k, v in row.items()} for row in reader]
    except (OSError, ValueError):
        return []
