"""Tissue detection on a low-resolution rendering of a slide.

The slide is read at a coarse resolution (``mask_mpp``, 8 µm/px by default) with
:meth:`~slidestream.wsi.Slide.read_at_mpp`, which picks a low pyramid level, so detection costs the
same on a 40,000 x 30,000 slide as on a small one. Pixels are classified as tissue when they are
stained (HSV saturation or mean optical density above an Otsu threshold clamped to a plausible
range) and are not artefacts: very dark pixels (black marker, scanner edge borders, folds filled
with ink) and strongly non-stain hues (green and saturated blue marker pen). Morphology then
closes small gaps, fills small holes and drops small objects, with all sizes in µm².
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from slidestream._atomic import atomic_path
from slidestream.errors import ConfigError

from ._protocols import SlideLike

if TYPE_CHECKING:
    import shapely

__all__ = ["TissueDetectionConfig", "TissueMask", "detect_tissue", "tissue_mask_from_rgb"]

logger = logging.getLogger(__name__)

#: Most pixels read at once from the chosen pyramid level while building the thumbnail.
_MAX_READ_PX = 48_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class TissueDetectionConfig:
    """Thresholds of :func:`tissue_mask_from_rgb` (defaults suit H&E and DAB IHC).

    Parameters
    ----------
    min_tissue_area_um2
        Connected tissue regions smaller than this (µm²) are dropped.
    min_hole_area_um2
        Holes inside tissue smaller than this (µm²) are filled.
    min_saturation, max_saturation
        Clamp range of the Otsu threshold on HSV saturation (0..1).
    min_od, max_od
        Clamp range of the Otsu threshold on mean optical density (OD units, log10).
    saturation_floor
        Pixels less saturated than this are never tissue (grey dust, shadows, marker halos).
    dark_value
        Pixels whose brightest channel is below this (0..255) and whose chroma (max - min
        channel) is below ``dark_chroma`` are black/grey artefacts (marker, slide-edge borders)
        when they form regions of at least ``min_artefact_area_um2``. Dark *stain* (dense
        haematoxylin, DAB) keeps its chroma and is not affected.
    dark_chroma
        See ``dark_value`` (0..255).
    min_artefact_area_um2
        Dark regions smaller than this (µm²) are not artefacts (dense nuclei clusters).
    pen_saturation
        Minimum HSV saturation (0..1) of a blue-hued pixel to count as marker pen.
    artefact_margin_um
        Artefacts are grown by this many µm before being removed, which removes their halo.
    closing_um
        Radius (µm) of the morphological closing that joins nearby tissue fragments.
    """

    min_tissue_area_um2: float = 10_000.0
    min_hole_area_um2: float = 5_000.0
    min_saturation: float = 0.04
    max_saturation: float = 0.08
    min_od: float = 0.10
    max_od: float = 0.25
    saturation_floor: float = 0.03
    dark_value: int = 60
    dark_chroma: int = 30
    min_artefact_area_um2: float = 2_500.0
    pen_saturation: float = 0.5
    artefact_margin_um: float = 16.0
    closing_um: float = 16.0

    def __post_init__(self) -> None:
        for name in (
            "min_tissue_area_um2",
            "min_hole_area_um2",
            "artefact_margin_um",
            "closing_um",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"tissue detection: {name}={value!r}; expected a finite value >= 0"
                )
        for lo_name, hi_name in (("min_saturation", "max_saturation"), ("min_od", "max_od")):
            lo, hi = getattr(self, lo_name), getattr(self, hi_name)
            if not (0 <= lo <= hi):
                raise ConfigError(
                    f"tissue detection: {lo_name}={lo!r}, {hi_name}={hi!r}; "
                    "expected 0 <= min <= max"
                )
        if not 0 <= self.saturation_floor <= 1 or not 0 <= self.pen_saturation <= 1:
            raise ConfigError(
                "tissue detection: saturation_floor and pen_saturation must lie in [0, 1]; "
                f"got {self.saturation_floor!r}, {self.pen_saturation!r}"
            )
        if not (0 <= self.dark_value <= 255 and 0 <= self.dark_chroma <= 255):
            raise ConfigError(
                f"tissue detection: dark_value={self.dark_value!r}, dark_chroma="
                f"{self.dark_chroma!r}; expected 0..255"
            )


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class TissueMask:
    """A binary tissue mask with its own resolution and its mapping to level 0.

    Mask pixel ``(m_x, m_y)`` covers the level-0 square
    ``[m_x * l0_per_m_px, (m_x + 1) * l0_per_m_px)`` (same for y), with
    ``l0_per_m_px = mpp / slide_mpp``. The mask may extend past the slide's right and bottom edges
    (that part is never tissue).

    Parameters
    ----------
    mask
        Boolean ``(H, W)`` array, True = tissue.
    mpp
        Resolution of the mask in µm/px.
    slide_mpp
        Level-0 resolution of the slide in µm/px.
    l0_dimensions
        Level-0 ``(width, height)`` of the slide in px.
    """

    mask: npt.NDArray[np.bool_]
    mpp: float
    slide_mpp: float
    l0_dimensions: tuple[int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.mask, np.ndarray) or self.mask.ndim != 2 or self.mask.dtype != bool:
            raise ConfigError(
                "TissueMask.mask must be a 2-D bool array; got "
                f"{getattr(self.mask, 'dtype', type(self.mask))!s} "
                f"with shape {getattr(self.mask, 'shape', None)}"
            )
        for name in ("mpp", "slide_mpp"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"TissueMask.{name}={value!r}; expected µm/px > 0")
        l0_w, l0_h = self.l0_dimensions
        if l0_w <= 0 or l0_h <= 0:
            raise ConfigError(f"TissueMask.l0_dimensions={self.l0_dimensions!r}; expected > 0")
        m_h, m_w = self.mask.shape
        if (
            m_w * self.l0_per_m_px < l0_w - 1e-6 * l0_w
            or m_h * self.l0_per_m_px < l0_h - 1e-6 * l0_h
        ):
            raise ConfigError(
                f"TissueMask of shape {self.mask.shape} at {self.mpp} µm/px does not cover the "
                f"slide ({l0_w} x {l0_h} px at {self.slide_mpp} µm/px); build it with detect_tissue"
            )

    @property
    def l0_per_m_px(self) -> float:
        """Level-0 px per mask px (the mask's downsample)."""
        return self.mpp / self.slide_mpp

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide area that is tissue (0..1)."""
        l0_w, l0_h = self.l0_dimensions
        l0_area = float(np.count_nonzero(self.mask)) * self.l0_per_m_px**2
        return min(1.0, l0_area / (l0_w * l0_h))

    @property
    def tissue_area_mm2(self) -> float:
        """Tissue area in mm² (mask pixel count times the mask pixel area)."""
        return float(np.count_nonzero(self.mask)) * self.mpp**2 / 1e6

    def to_png(self, path: str | Path) -> Path:
        """Write the mask as an 8-bit greyscale PNG (255 = tissue), atomically.

        The PNG is written as ``<name>.tmp`` in the target folder and renamed over ``path``.

        Returns
        -------
        Path
            The written file.
        """
        from PIL import Image

        out = Path(path)
        with atomic_path(out) as tmp:
            Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
        return out

    def to_polygons(self, *, simplify_m_px: float = 0.75) -> shapely.MultiPolygon:
        """Tissue outlines as a valid shapely ``MultiPolygon`` in level-0 px (holes kept).

        Parameters
        ----------
        simplify_m_px
            Simplification tolerance in mask px (removes the pixel staircase); 0 keeps the
            exact pixel outline.

        Returns
        -------
        shapely.MultiPolygon
            Clipped to the slide bounds; empty when there is no tissue.
        """
        from ._polygons import mask_to_multipolygon

        return mask_to_multipolygon(
            self.mask,
            l0_per_m_px=self.l0_per_m_px,
            l0_dimensions=self.l0_dimensions,
            simplify_m_px=simplify_m_px,
        )


def _otsu(values: npt.NDArray[np.float64], *, bins: int = 256) -> float:
    """Otsu threshold of ``values`` (any range); the midpoint when they are constant."""
    if values.size == 0:
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = hist.astype(np.float64)
    w0 = np.cumsum(weight)
    w1 = w0[-1] - w0
    m0 = np.cumsum(weight * centres)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))]) if bins > 1 else lo


def _disk(radius_px: int) -> npt.NDArray[np.uint8]:
    size = 2 * radius_px + 1
    yy, xx = np.mgrid[:size, :size] - radius_px
    disk: npt.NDArray[np.uint8] = (xx * xx + yy * yy <= radius_px * radius_px + radius_px).astype(
        np.uint8
    )
    return disk


def _remove_small(mask: npt.NDArray[np.bool_], min_px: float) -> npt.NDArray[np.bool_]:
    """Drop 8-connected components of ``mask`` with fewer than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    import cv2

    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    result: npt.NDArray[np.bool_] = keep[labels]
    return result


def _fill_small_holes(mask: npt.NDArray[np.bool_], max_px: float) -> npt.NDArray[np.bool_]:
    """Fill 4-connected background components not touching the border, smaller than ``max_px``."""
    if max_px <= 0 or mask.all():
        return mask
    import cv2

    background = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] < max_px
    small[0] = False
    small[labels[0, 0]] = False  # the outside, connected through the padding
    filled = mask | small[labels[1:-1, 1:-1]]
    result: npt.NDArray[np.bool_] = filled
    return result


def tissue_mask_from_rgb(
    rgb: npt.NDArray[np.uint8], *, mpp: float, config: TissueDetectionConfig | None = None
) -> npt.NDArray[np.bool_]:
    """Classify each pixel of a low-resolution RGB image as tissue or not.

    Parameters
    ----------
    rgb
        uint8 ``(H, W, 3)`` image of the slide (white background).
    mpp
        Resolution of ``rgb`` in µm/px (converts the µm and µm² settings to pixels).
    config
        Thresholds; defaults when omitted.

    Returns
    -------
    numpy.ndarray
        bool ``(H, W)``, True = tissue.
    """
    import cv2

    cfg = config if config is not None else TissueDetectionConfig()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ConfigError(
            f"tissue_mask_from_rgb: expected uint8 (H, W, 3); got {rgb.dtype} {rgb.shape}"
        )
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    hue_deg = hsv[..., 0].astype(np.float32) * 2.0
    sat = hsv[..., 1].astype(np.float32) / 255.0
    val = hsv[..., 2]
    od = -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / 255.0).mean(axis=2)

    chroma = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    px_area_um2 = mpp * mpp
    dark = _remove_small(
        (val < cfg.dark_value) & (chroma < cfg.dark_chroma), cfg.min_artefact_area_um2 / px_area_um2
    )
    green_pen = (hue_deg >= 75) & (hue_deg <= 170) & (sat >= 0.15)
    blue_pen = (hue_deg > 170) & (hue_deg < 240) & (sat >= cfg.pen_saturation)
    artefact = dark | green_pen | blue_pen
    margin_px = round(cfg.artefact_margin_um / mpp)
    if margin_px >= 1 and artefact.any():
        artefact = cv2.dilate(artefact.astype(np.uint8), _disk(margin_px)).astype(bool)

    candidates = ~artefact & (sat >= cfg.saturation_floor)
    t_sat = float(
        np.clip(_otsu(sat[~artefact].astype(np.float64)), cfg.min_saturation, cfg.max_saturation)
    )
    t_od = float(np.clip(_otsu(od[~artefact].astype(np.float64)), cfg.min_od, cfg.max_od))
    tissue = candidates & ((sat >= t_sat) | (od >= t_od))
    logger.debug("tissue thresholds: saturation %.3f, optical density %.3f", t_sat, t_od)

    closing_px = round(cfg.closing_um / mpp)
    if closing_px >= 1 and tissue.any():
        kernel = _disk(closing_px)
        padded = np.pad(tissue, closing_px).astype(np.uint8)
        closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
        tissue = closed[closing_px:-closing_px, closing_px:-closing_px].astype(bool) & ~artefact
    tissue = _fill_small_holes(tissue, cfg.min_hole_area_um2 / px_area_um2) & ~artefact
    return _remove_small(tissue, cfg.min_tissue_area_um2 / px_area_um2)


def _effective_mask_mpp(slide: SlideLike, mask_mpp: float) -> float:
    """Coarsen no further than 32 mask px across the slide's short side, nor finer than level 0."""
    l0_w, l0_h = slide.dimensions
    return max(slide.mpp, min(mask_mpp, min(l0_w, l0_h) * slide.mpp / 32.0))


def read_thumbnail(slide: SlideLike, mpp: float) -> npt.NDArray[np.uint8]:
    """Read the whole slide at ``mpp`` µm/px, in horizontal strips of bounded size.

    The result has ``ceil(width * slide.mpp / mpp)`` columns (likewise rows), so mask pixel
    ``m`` maps to level-0 ``m * mpp / slide.mpp`` exactly; the part past the slide edge is
    background padding.

    Returns
    -------
    numpy.ndarray
        uint8 ``(H, W, 3)``.
    """
    l0_w, l0_h = slide.dimensions
    l0_per_m = mpp / slide.mpp
    m_w = max(1, math.ceil(l0_w / l0_per_m - 1e-9))
    m_h = max(1, math.ceil(l0_h / l0_per_m - 1e-9))
    level = slide.best_level_for_mpp(mpp)
    lv_per_m = l0_per_m / slide.level_downsamples[level]
    lv_px_per_row = m_w * lv_per_m * lv_per_m
    rows_per_strip = max(1, int(_MAX_READ_PX // max(lv_px_per_row, 1.0)))
    out = np.empty((m_h, m_w, 3), dtype=np.uint8)
    for m_y0 in range(0, m_h, rows_per_strip):
        m_y1 = min(m_h, m_y0 + rows_per_strip)
        out[m_y0:m_y1] = slide.read_at_mpp((0.0, m_y0 * l0_per_m), (m_w, m_y1 - m_y0), mpp)
    return out


def detect_tissue(
    slide: SlideLike,
    *,
    mask_mpp: float = 8.0,
    min_tissue_area_um2: float | None = None,
    min_hole_area_um2: float | None = None,
    config: TissueDetectionConfig | None = None,
) -> TissueMask:
    """Detect tissue on a low-resolution rendering of ``slide``.

    Parameters
    ----------
    slide
        An open slide (:class:`slidestream.wsi.Slide` or any :class:`SlideLike`).
    mask_mpp
        Resolution of the mask in µm/px. Tiny slides get a finer mask (at least 32 px across the
        short side, never finer than level 0); the mask's actual µm/px is ``result.mpp``.
    min_tissue_area_um2, min_hole_area_um2
        Override the same fields of ``config``.
    config
        All thresholds; :class:`TissueDetectionConfig` defaults when omitted.

    Returns
    -------
    TissueMask
        The mask, its µm/px and its mapping to level 0. An empty mask is not an error here.

    Raises
    ------
    ConfigError
        For a non-positive ``mask_mpp`` or invalid thresholds.
    SlideReadError
        When the slide's low-resolution level cannot be read.
    """
    if not (math.isfinite(mask_mpp) and mask_mpp > 0):
        raise ConfigError(f"detect_tissue: mask_mpp={mask_mpp!r}; expected µm/px > 0, e.g. 8.0")
    cfg = config if config is not None else TissueDetectionConfig()
    if min_tissue_area_um2 is not None or min_hole_area_um2 is not None:
        from dataclasses import replace

        cfg = replace(
            cfg,
            min_tissue_area_um2=(
                cfg.min_tissue_area_um2 if min_tissue_area_um2 is None else min_tissue_area_um2
            ),
            min_hole_area_um2=cfg.min_hole_area_um2
            if min_hole_area_um2 is None
            else min_hole_area_um2,
        )
    m_mpp = _effective_mask_mpp(slide, mask_mpp)
    rgb = read_thumbnail(slide, m_mpp)
    mask = tissue_mask_from_rgb(rgb, mpp=m_mpp, config=cfg)
    result = TissueMask(mask=mask, mpp=m_mpp, slide_mpp=slide.mpp, l0_dimensions=slide.dimensions)
    logger.info(
        "%s: tissue %.2f mm² (%.1f %% of the slide) on a %d x %d mask at %.2f µm/px",
        slide.path,
        result.tissue_area_mm2,
        100 * result.tissue_fraction,
        mask.shape[1],
        mask.shape[0],
        m_mpp,
    )
    return result
