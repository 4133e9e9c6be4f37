"""``overlay.png``: slide thumbnail with tissue classes, nucleus-density heat map and legend.

Layout (what a pathologist looks at first): a title line, then two panels of the thumbnail's size
side by side — left *Tissue classes* (semi-transparent class fill, class outlines, a scale bar),
right *Nucleus density* (nuclei per mm², colour-mapped over the tissue, on a pale thumbnail) — and
a legend below: class swatches with area and share of tissue, and the density colour bar with
units. Drawn with PIL only.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import shapely
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from shapely.geometry.base import BaseGeometry

from slidestream._atomic import atomic_path
from slidestream.errors import ConfigError

__all__ = ["density_colormap", "render_overlay_png"]

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]
_PAD = 16
_BG: RGB = (250, 250, 248)
_INK: RGB = (30, 30, 30)
_MUTED: RGB = (110, 110, 110)
# "inferno"-like perceptual colour map anchors (dark -> bright)
_CMAP_ANCHORS = np.array(
    [(20, 11, 52), (87, 16, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39),
     (252, 255, 164)], np.float64,
)  # fmt: skip


_FONT_FILES = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "Arial.ttf")


def _font(size: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, bool]:
    """A font with µ and ² glyphs if the system has one; the flag says whether it does."""
    for name in _FONT_FILES:
        try:
            return ImageFont.truetype(name, size), True
        except OSError:
            continue
    return ImageFont.load_default(size=size), False


def _ascii(text: str) -> str:
    return text.replace("µ", "u").replace("²", "^2").replace("—", "-")


def _interpolate_anchors(values: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """Piecewise-linear colour between the anchors for values in [0, 1], (..., 3) uint8."""
    v = np.clip(values, 0, 1) * (len(_CMAP_ANCHORS) - 1)
    lo = np.floor(v).astype(np.intp).clip(0, len(_CMAP_ANCHORS) - 2)
    t = (v - lo)[..., None]
    rgb = _CMAP_ANCHORS[lo] * (1 - t) + _CMAP_ANCHORS[lo + 1] * t
    return np.asarray(rgb.round(), np.uint8)


# 1024 levels: neighbouring entries differ by at most 1 in any channel.
_CMAP_LUT = _interpolate_anchors(np.linspace(0.0, 1.0, 1024))


def _colormap(values: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """Map values in [0, 1] to RGB, shape (..., 3) uint8 (NaN as 0).

    A 1,024-entry look-up table of the anchor interpolation: within one level of it
    everywhere, 20x faster than interpolating every pixel of a 2,048 px thumbnail.
    """
    v = np.nan_to_num(np.asarray(values, np.float32), nan=0.0)
    idx = np.clip(v * 1023.0 + 0.5, 0, 1023).astype(np.intp)
    out: npt.NDArray[np.uint8] = _CMAP_LUT[idx]
    return out


density_colormap = _colormap
"""The nucleus-density colour map of ``overlay.png``: values in [0, 1] -> RGB ``(..., 3)`` uint8."""


def _nice(value: float) -> float:
    """Round up to 1, 2 or 5 x 10^k."""
    if value <= 0:
        return 1.0
    exp = math.floor(math.log10(value))
    for m in (1, 2, 5, 10):
        if m * 10**exp >= value:
            return float(m * 10**exp)
    return float(10 ** (exp + 1))


def _rings(geom: BaseGeometry, scale: float) -> list[tuple[list[tuple[float, float]], bool]]:
    """``(thumbnail-px vertices, is_hole)`` for every ring of a (Multi)Polygon."""
    out = []
    for poly in shapely.get_parts(geom):
        if shapely.get_type_id(poly) != 3:
            continue
        out.append(([(x * scale, y * scale) for x, y in poly.exterior.coords], False))
        out.extend(([(x * scale, y * scale) for x, y in r.coords], True) for r in poly.interiors)
    return out


def _fill_mask(
    size: tuple[int, int], rings: Sequence[tuple[list[tuple[float, float]], bool]]
) -> Image.Image:
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for pts, hole in sorted(rings, key=lambda r: r[1]):  # shells first, then punch holes
        if len(pts) >= 3:
            draw.polygon(pts, fill=0 if hole else 255)
    return mask


def render_overlay_png(
    path: str | os.PathLike[str],
    thumbnail: npt.NDArray[np.uint8],
    *,
    thumb_l0_scale: float,
    class_polygons: Mapping[str, BaseGeometry],
    class_colors: Mapping[str, RGB],
    nucleus_centroids_l0: npt.NDArray[np.floating],
    slide_mpp: float,
    density_bin_um: float = 100.0,
    fill_alpha: float = 0.4,
    heat_alpha: float = 0.75,
    title: str | None = None,
    density_of: str | None = None,
    type_legend: Sequence[tuple[str, RGB, int]] = (),
) -> tuple[int, int]:
    """Render and atomically write the overview PNG.

    Parameters
    ----------
    path : str or PathLike
        Output ``.png``.
    thumbnail : ndarray of uint8, shape (h, w, 3)
        RGB slide thumbnail; thumbnail px = level-0 px * ``thumb_l0_scale``.
    thumb_l0_scale : float
        Thumbnail px per level-0 px (e.g. ``1 / 64``).
    class_polygons : mapping
        Tissue class -> (Multi)Polygon in level-0 px.
    class_colors : mapping
        Tissue class -> ``(r, g, b)``.
    nucleus_centroids_l0 : ndarray of float, shape (N, 2)
        Nucleus centroids ``(x, y)`` in level-0 px.
    slide_mpp : float
        Level-0 µm/px (areas in mm², density in nuclei per mm²).
    density_bin_um : float
        Side of the square density bins, µm (smoothed by one bin).
    fill_alpha, heat_alpha : float
        Opacity of the class fill and of the heat map.
    title : str, optional
        Title line (e.g. the slide name and nucleus count).
    density_of : str, optional
        What ``nucleus_centroids_l0`` are, for the density panel's caption and colour bar (e.g.
        ``"Inflammatory"``: "Inflammatory nuclei per mm²"); default all nuclei.
    type_legend : sequence of (name, (r, g, b), count)
        Nucleus types with their fixed colour and count on the slide, listed under the tissue
        classes (typing models).

    Returns
    -------
    (width, height)
        Size of the written image: width ``max(2 w + 3 * 16, 560)``; the height adds the title,
        panel captions and the legend.
    """
    mpp = slide_mpp
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumb_l0_scale <= 0 or mpp <= 0:
        raise ConfigError(
            f"render_overlay_png: thumbnail {thumbnail.shape} must be (h, w, 3) RGB and "
            f"thumb_l0_scale {thumb_l0_scale} / mpp {mpp} positive"
        )
    h, w = thumbnail.shape[:2]
    base = Image.fromarray(np.ascontiguousarray(thumbnail, np.uint8), "RGB")

    # left panel: tissue classes
    tissue = base.copy()
    tissue_mask = Image.new("L", (w, h), 0)
    for name, geom in class_polygons.items():
        color = tuple(class_colors.get(name, (128, 128, 128)))
        rings = _rings(geom, thumb_l0_scale)
        mask = _fill_mask((w, h), rings)
        tissue_mask.paste(255, mask=mask)
        fill = Image.new("RGB", (w, h), color)  # type: ignore[arg-type]
        tissue.paste(Image.blend(tissue, fill, fill_alpha), mask=mask)
        draw = ImageDraw.Draw(tissue)
        for ring_pts, _ in rings:
            if len(ring_pts) >= 2:
                draw.line(ring_pts, fill=color, width=2, joint="curve")  # type: ignore[arg-type]

    # right panel: nucleus density on a pale thumbnail
    grey = np.asarray(base.convert("L"), np.float32)
    pale = (0.45 * grey + 0.55 * 255).astype(np.uint8)
    heat_panel = np.repeat(pale[..., None], 3, axis=2)
    bin_px = density_bin_um / mpp * thumb_l0_scale  # thumbnail px per bin
    bins = (max(1, math.ceil(w / bin_px)), max(1, math.ceil(h / bin_px)))
    pts = np.asarray(nucleus_centroids_l0, np.float64).reshape(-1, 2) * thumb_l0_scale
    counts, _, _ = np.histogram2d(
        pts[:, 1], pts[:, 0], bins=(bins[1], bins[0]),
        range=((0, bins[1] * bin_px), (0, bins[0] * bin_px)),
    )  # fmt: skip
    density = ndimage.gaussian_filter(counts, 1.0) / (density_bin_um**2 / 1e6)  # per mm²
    up_size = (round(bins[0] * bin_px), round(bins[1] * bin_px))
    full = cv2.resize(density.astype(np.float32), up_size,
                      interpolation=cv2.INTER_LINEAR)[:h, :w]  # fmt: skip
    full = np.pad(full, ((0, h - full.shape[0]), (0, w - full.shape[1])))
    m_tissue = np.asarray(tissue_mask) > 0 if class_polygons else full > 0
    vmax = _nice(float(np.percentile(full[m_tissue], 99))) if m_tissue.any() else 1.0
    alpha = np.float32(heat_alpha) * m_tissue[..., None].astype(np.float32)
    heat = _colormap(full / np.float32(vmax))
    heat_panel = (heat_panel * (1 - alpha) + heat * alpha).astype(np.uint8)

    # canvas
    (font_title, unicode_ok), (font, _), (font_small, _) = _font(17), _font(14), _font(12)

    def txt(text: str) -> str:
        return text if unicode_ok else _ascii(text)

    width = max(2 * w + 3 * _PAD, 560)
    caption_h, title_h = 22, 30
    swatch = 14
    line_h = 20
    items = list(class_polygons)
    total_um2 = sum(float(g.area) for g in class_polygons.values()) * mpp * mpp
    left_w = width // 2 - _PAD
    legend_lines = max(1, len(items)) + (len(type_legend) + 1 if type_legend else 0)
    legend_h = max(legend_lines * line_h, 70) + 24
    height = title_h + caption_h + h + _PAD + legend_h + _PAD
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    n_nuclei = len(pts)
    draw.text((_PAD, 6), txt(title or f"{n_nuclei:,} nuclei"), fill=_INK, font=font_title)
    y0 = title_h + caption_h
    x_right = width - _PAD - w
    draw.text((_PAD, title_h), "Tissue classes", fill=_INK, font=font)
    density_caption = f"{density_of} nucleus density" if density_of else "Nucleus density"
    draw.text((x_right, title_h), txt(density_caption), fill=_INK, font=font)
    canvas.paste(tissue, (_PAD, y0))
    canvas.paste(Image.fromarray(heat_panel, "RGB"), (x_right, y0))
    for x in (_PAD, x_right):
        draw.rectangle((x - 1, y0 - 1, x + w, y0 + h), outline=(200, 200, 200))

    # scale bar on the tissue panel
    um_per_thumb_px = mpp / thumb_l0_scale
    bar_um = _nice(0.2 * w * um_per_thumb_px) / 2
    bar_px = bar_um / um_per_thumb_px
    if 8 <= bar_px <= w - 16 and h >= 30:
        bx, by = _PAD + 8, y0 + h - 12
        draw.rectangle((bx - 3, by - 16, bx + bar_px + 3, by + 5), fill=(255, 255, 255))
        draw.line((bx, by, bx + bar_px, by), fill=_INK, width=3)
        label = f"{bar_um / 1000:g} mm" if bar_um >= 1000 else f"{bar_um:g} µm"
        draw.text((bx, by - 15), txt(label), fill=_INK, font=font_small)

    # legend: classes
    ly = y0 + h + _PAD
    draw.text((_PAD, ly), "Tissue class  (area, share of tissue)", fill=_MUTED, font=font_small)
    for i, name in enumerate(items):
        yy = ly + 20 + i * line_h
        color = tuple(class_colors.get(name, (128, 128, 128)))
        draw.rectangle((_PAD, yy, _PAD + swatch, yy + swatch), fill=color, outline=_INK)  # type: ignore[arg-type]
        area = float(class_polygons[name].area) * mpp * mpp
        share = 100 * area / total_um2 if total_um2 else 0.0
        text = f"{name}  {area / 1e6:.2f} mm²  ({share:.0f} %)"
        draw.text((_PAD + swatch + 6, yy - 1), txt(text), fill=_INK, font=font_small)
    if not items:
        draw.text((_PAD, ly + 20), "no tissue regions", fill=_MUTED, font=font_small)
    if type_legend:
        ty = ly + 20 + max(1, len(items)) * line_h
        total = sum(count for _, _, count in type_legend)
        draw.text(
            (_PAD, ty), "Nucleus type  (count, share of nuclei)", fill=_MUTED, font=font_small
        )
        for i, (name, color, count) in enumerate(type_legend):
            yy = ty + 20 + i * line_h
            draw.ellipse(
                (_PAD + 2, yy + 2, _PAD + swatch - 2, yy + swatch - 2), fill=color, outline=_INK
            )
            share = 100 * count / total if total else 0.0
            draw.text(
                (_PAD + swatch + 6, yy - 1),
                txt(f"{name}  {count:,}  ({share:.0f} %)"),
                fill=_INK,
                font=font_small,
            )

    # legend: density colour bar
    cb_w = min(w, max(160, width // 2 - 3 * _PAD))
    cx = max(_PAD + left_w // 2 + _PAD, x_right)
    cx = min(cx, width - _PAD - cb_w)
    unit = f"{density_of} nuclei per mm²" if density_of else "Nuclei per mm²"
    draw.text((cx, ly), txt(unit), fill=_MUTED, font=font_small)
    bar = _colormap(np.linspace(0, 1, cb_w)[None, :].repeat(12, axis=0))
    canvas.paste(Image.fromarray(bar, "RGB"), (cx, ly + 20))
    draw.rectangle((cx - 1, ly + 19, cx + cb_w, ly + 32), outline=_INK)
    for frac in (0.0, 0.5, 1.0):
        tx = cx + round(frac * (cb_w - 1))
        draw.line((tx, ly + 32, tx, ly + 36), fill=_INK)
        label = f"{frac * vmax:,.0f}" + ("+" if frac == 1.0 else "")
        tw = draw.textlength(label, font=font_small)
        draw.text(
            (min(max(tx - tw / 2, cx), cx + cb_w - tw), ly + 38), label, fill=_INK, font=font_small
        )
    draw.text(
        (cx, ly + 56),
        txt(f"{density_bin_um:g} µm bins, smoothed; top of scale = 99th percentile"),
        fill=_MUTED,
        font=font_small,
    )

    with atomic_path(Path(path)) as tmp:
        # zlib level 3: a third of the time of the default 6 for ~9 % more bytes.
        canvas.save(tmp, format="PNG", optimize=False, compress_level=3)
    return width, height
