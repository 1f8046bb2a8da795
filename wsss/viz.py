"""Pictures of masks: palette colouring, overlays on the image, a class legend, image grids.

Everything works on uint8 NumPy arrays / PIL images and needs nothing beyond Pillow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsss.data.specs import BACKGROUND_NAME, DatasetSpec


def colour_table(spec: DatasetSpec) -> np.ndarray:
    """``(256, 3)`` uint8 lookup table: the dataset's palette, unused indices black."""
    return np.asarray(spec.flat_palette(), dtype=np.uint8).reshape(256, 3)


def colorize(mask: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Class indices ``(H, W)`` → RGB ``(H, W, 3)`` in the dataset's palette colours."""
    return colour_table(spec)[np.asarray(mask, dtype=np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, spec: DatasetSpec, alpha: float = 0.45) -> np.ndarray:
    """The image with each tissue pixel blended towards its class colour by ``alpha``.

    Background pixels (the background index) keep the image unchanged, so white glass stays white.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    colours = colorize(mask, spec).astype(np.float32)
    blend = image.astype(np.float32) * (1.0 - alpha) + colours * alpha
    tissue = (np.asarray(mask) != spec.background_index)[..., None]
    return np.where(tissue, blend, image.astype(np.float32)).round().clip(0, 255).astype(np.uint8)


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def legend(spec: DatasetSpec, swatch: int = 14, pad: int = 6, background: bool = True) -> Image.Image:
    """A one-row legend: a colour swatch and the name of every class (and the background), in the
    spec's colours."""
    names = list(spec.classes) + ([BACKGROUND_NAME] if background else [])
    colours = list(spec.colors) + ([spec.background_color] if background else [])
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [int(probe.textlength(n, font=font)) for n in names]
    width = pad + sum(swatch + 4 + w + 2 * pad for w in widths)
    img = Image.new("RGB", (width, swatch + 2 * pad), "white")
    draw = ImageDraw.Draw(img)
    x = pad
    for name, colour, w in zip(names, colours, widths):
        draw.rectangle([x, pad, x + swatch - 1, pad + swatch - 1], fill=colour, outline=(0, 0, 0))
        draw.text((x + swatch + 4, pad), name, fill=(0, 0, 0), font=font)
        x += swatch + 4 + w + 2 * pad
    return img


def grid(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str] | None = None,
    cell: int = 160,
    gap: int = 4,
    footer: Image.Image | None = None,
    row_titles: Sequence[str] | None = None,
    outline: tuple[int, int, int] | None = None,
) -> Image.Image:
    """Images ``rows[r][c]`` (RGB uint8, any size) resized to ``cell``×``cell`` in a labelled grid.

    ``titles`` label the columns; ``footer`` (e.g. a :func:`legend`) goes under the grid;
    ``row_titles`` (may hold newlines) go in a margin left of the rows, centred on each row;
    ``outline`` draws a 1-px frame of that colour around each picture, in the gap (so white
    background in a mask does not melt into the white page).
    """
    font = _font()
    margin = _row_title_margin(row_titles, font, gap)
    ncols = max(len(r) for r in rows)
    title_h = 18 if titles else 0
    width = margin + ncols * cell + (ncols + 1) * gap
    height = title_h + len(rows) * cell + (len(rows) + 1) * gap
    if footer is not None:
        width = max(width, footer.width + 2 * gap)
        height += footer.height + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles or []):
        x = margin + gap + c * (cell + gap)
        draw.text((x + 2, 2), title, fill=(0, 0, 0), font=font)
    for r, row_title in enumerate(row_titles or []):
        centre = title_h + gap + r * (cell + gap) + cell // 2
        draw.multiline_text((gap, centre), row_title, fill=(0, 0, 0), font=font, anchor="lm", spacing=2)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
            # Nearest keeps mask colours pure; the patches are small enough that it looks fine too.
            tile = tile.resize((cell, cell), Image.NEAREST)
            x, y = margin + gap + c * (cell + gap), title_h + gap + r * (cell + gap)
            canvas.paste(tile, (x, y))
            if outline is not None and gap > 0:
                draw.rectangle([x - 1, y - 1, x + cell, y + cell], outline=outline)
    if footer is not None:
        canvas.paste(footer, (gap, height - footer.height - gap))
    return canvas


def _row_title_margin(row_titles: Sequence[str] | None, font: ImageFont.ImageFont, gap: int) -> int:
    """Width of the left margin that fits the widest line of ``row_titles`` (0 without titles)."""
    if not row_titles:
        return 0
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(probe.multiline_textbbox((0, 0), t, font=font, spacing=2)[2] for t in row_titles)
    return int(widest) + 2 * gap


def heatmap(values: np.ndarray) -> np.ndarray:
    """Values in ``[0, 1]`` ``(H, W)`` → RGB ``(H, W, 3)`` on a blue–yellow–red scale."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    stops = np.array([[0, 0, 130], [0, 120, 255], [255, 230, 0], [200, 0, 0]], dtype=np.float32)
    pos = v * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).round().astype(np.uint8)


def heatmap_overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image ``(H, W, 3)`` blended by ``alpha`` with the :func:`heatmap` of ``values`` ``(H, W)`` in [0, 1]."""
    if image.shape[:2] != np.shape(values):
        raise ValueError(f"image {image.shape[:2]} and values {np.shape(values)} differ in size")
    blend = image.astype(np.float32) * (1.0 - alpha) + heatmap(values).astype(np.float32) * alpha
    return blend.round().clip(0, 255).astype(np.uint8)


def colorbar(length: int = 160, thickness: int = 12, low: str = "0", high: str = "1", caption: str = "",
             pad: int = 6) -> Image.Image:
    """A horizontal :func:`heatmap` scale, ``length`` px long, labelled ``low`` … ``high``, then ``caption``."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    low_w, high_w, caption_w = (int(probe.textlength(t, font=font)) for t in (low, high, caption))
    width = pad + low_w + 4 + length + 4 + high_w + (2 * pad + caption_w if caption else 0) + pad
    img = Image.new("RGB", (width, thickness + 2 * pad), "white")
    bar = heatmap(np.broadcast_to(np.linspace(0.0, 1.0, length, dtype=np.float32), (thickness, length)))
    x = pad + low_w + 4
    img.paste(Image.fromarray(bar), (x, pad))
    draw = ImageDraw.Draw(img)
    middle = pad + thickness / 2
    draw.text((pad, middle), low, fill=(0, 0, 0), font=font, anchor="lm")
    draw.text((x + length + 4, middle), high, fill=(0, 0, 0), font=font, anchor="lm")
    if caption:
        draw.text((x + length + 4 + high_w + 2 * pad, middle), caption, fill=(0, 0, 0), font=font, anchor="lm")
    return img


def contact_sheet(rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]], cell: int = 128, gap: int = 6,
                  footer: Image.Image | None = None) -> Image.Image:
    """Rows of captioned pictures: ``rows[r] = (title, [(image, caption), ...])``, the title above the
    row, each picture (RGB uint8, any size) resized to ``cell`` × ``cell`` with its caption under it,
    ``footer`` (e.g. a :func:`legend`) at the bottom. Empty rows are left out."""
    rows = [(title, items) for title, items in rows if items]
    font = _font()
    line = 14
    ncols = max((len(items) for _, items in rows), default=1)
    row_h = line + cell + line + gap
    width = gap + ncols * (cell + gap)
    height = gap + len(rows) * row_h
    if footer is not None:
        width = max(width, footer.width + 2 * gap)
        height += footer.height + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, items) in enumerate(rows):
        top = gap + r * row_h
        draw.text((gap, top), title, fill=(0, 0, 0), font=font)
        for c, (image, caption) in enumerate(items):
            x, y = gap + c * (cell + gap), top + line
            tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").resize((cell, cell), Image.BILINEAR)
            canvas.paste(tile, (x, y))
            draw.rectangle([x - 1, y - 1, x + cell, y + cell], outline=(160, 160, 160))
            draw.text((x, y + cell + 1), _fit(caption, cell, draw, font), fill=(0, 0, 0), font=font)
    if footer is not None:
        canvas.paste(footer, (gap, height - footer.height - gap))
    return canvas


def _fit(text: str, width: int, draw: ImageDraw.ImageDraw, font) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
