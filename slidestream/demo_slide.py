"""A realistic synthetic H&E demo slide, generated on the fly (no user data needed).

The image is composed in optical-density space from the standard haematoxylin and eosin
stain vectors (Ruifrok & Johnston), so colour deconvolution behaves on it as on a real scan:

* white glass background with a little noise and a pen-free tissue outline made of smooth blobs;
* eosin-rich fibrous stroma with sparse, small, elongated nuclei;
* "tumour" regions: crowded, large, pleomorphic, hyperchromatic nuclei with chromatin texture;
* "gland" regions: rings of epithelial nuclei around pale lumina;
* a lymphocyte-rich band (a tumour-infiltrating inflammatory front): densely packed, small,
  round, very dark nuclei in the stroma along part of the tumour border.

Each nucleus has a known type (:func:`render_demo_truth`): tumour and gland nuclei are
``epithelial``, stromal ones ``spindle``, the infiltrate's ``inflammatory``, so the typed outputs
of ``slidestream run`` show regions where the types differ.

The result is written as a pyramidal, JPEG-compressed, Aperio-style TIFF with its µm/px, so every
reader path of :mod:`slidestream.wsi` is exercised. All randomness is seeded: the same arguments
give the same slide byte for byte.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from slidestream._atomic import atomic_path
from slidestream.errors import ConfigError

__all__ = [
    "DEMO_TYPES",
    "DemoSlideSpec",
    "DemoTruth",
    "render_demo_image",
    "render_demo_truth",
    "write_demo_slide",
]

DEMO_TYPES: tuple[str, ...] = ("other", "inflammatory", "epithelial", "spindle")
"""Type names of :attr:`DemoTruth.types` values ``1..4`` (0 background), the nucleus model's."""

logger = logging.getLogger(__name__)

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin), unit length, RGB order.
_H_VEC = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_E_VEC = np.array([0.072, 0.990, 0.105], dtype=np.float32)
_RESIDUAL = np.array([0.268, 0.570, 0.776], dtype=np.float32)


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoSlideSpec:
    """Geometry of the demo slide.

    Attributes
    ----------
    width_px, height_px
        Level-0 size in pixels ``(width, height)``.
    mpp
        Level-0 resolution in µm per pixel.
    seed
        Seed of every random choice.
    """

    width_px: int = 6144
    height_px: int = 4608
    mpp: float = 0.25
    seed: int = 20261126

    def __post_init__(self) -> None:
        if self.width_px < 256 or self.height_px < 256:
            raise ConfigError(
                f"demo slide size {self.width_px}x{self.height_px} px is too small; "
                "use at least 256x256"
            )
        if not 0.05 <= self.mpp <= 5.0:
            raise ConfigError(f"demo slide mpp {self.mpp} is outside 0.05..5 µm/px")


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma_px: float
) -> npt.NDArray[np.float32]:
    """Gaussian-filtered white noise scaled to zero mean, unit standard deviation."""
    import cv2

    h, w = shape
    # Filter at reduced resolution for large sigmas, then upsample: same look, far less work.
    factor = max(1, int(sigma_px // 4))
    noise = rng.standard_normal((max(2, h // factor + 1), max(2, w // factor + 1)))
    k = sigma_px / factor
    small = cv2.GaussianBlur(noise.astype(np.float32), (0, 0), sigmaX=max(k, 0.5))
    out = np.asarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), dtype=np.float32)
    out -= out.mean()
    std = float(out.std())
    return (out / std if std > 0 else out).astype(np.float32)


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoTruth:
    """The demo slide's pixels and ground truth.

    Attributes
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        The level-0 image.
    labels : ndarray of int32, shape (H, W)
        Nucleus instances (0 background, 1..N).
    types : ndarray of uint8, shape (H, W)
        Nucleus type per pixel: ``k`` is ``DEMO_TYPES[k - 1]``, 0 background.
    infiltrate : ndarray of bool, shape (H, W)
        The lymphocyte-rich band.
    """

    rgb: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int32]
    types: npt.NDArray[np.uint8]
    infiltrate: npt.NDArray[np.bool_]


def _infiltrate_band(
    rng: np.random.Generator,
    tissue: npt.NDArray[np.bool_],
    tumour: npt.NDArray[np.bool_],
    gland: npt.NDArray[np.bool_],
    mpp: float,
) -> npt.NDArray[np.bool_]:
    """Stroma within ~120 µm of the tumour border, on the left half of the slide."""
    import cv2

    if not tumour.any():
        return np.zeros_like(tumour)
    # Distance to the tumour at 1/8 scale (cheap), then back to level 0.
    f = 8
    small = tumour[::f, ::f].astype(np.uint8)
    dist = cv2.distanceTransform((1 - small).astype(np.uint8), cv2.DIST_L2, 5) * (f * mpp)
    near = np.asarray(
        cv2.resize((dist < 120.0).astype(np.uint8), tumour.shape[::-1], interpolation=0), bool
    )
    half = np.zeros_like(tumour)
    half[:, : tumour.shape[1] // 2] = True
    return near & half & tissue & ~tumour & ~gland


def _region_maps(
    rng: np.random.Generator, spec: DemoSlideSpec
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Tissue, tumour and gland masks at level 0 (each ``(H, W)`` bool)."""
    shape = (spec.height_px, spec.width_px)
    scale_px = 250.0 / spec.mpp  # structures ~250 µm across
    tissue_field = _smooth_noise(rng, shape, scale_px * 1.5)
    yy, xx = np.mgrid[0 : spec.height_px, 0 : spec.width_px].astype(np.float32)
    # An elliptical tissue section with an irregular edge, leaving glass around it.
    cy, cx = spec.height_px / 2, spec.width_px / 2
    radial = ((yy - cy) / (0.42 * spec.height_px)) ** 2 + ((xx - cx) / (0.44 * spec.width_px)) ** 2
    tissue = (1.0 - radial + 0.25 * tissue_field) > 0.15
    region_field = _smooth_noise(rng, shape, scale_px)
    tumour = tissue & (region_field > 0.45)
    # Glands: small round structures (60-130 µm across) scattered in the non-tumour tissue.
    import cv2

    gland_u8 = np.zeros(shape, dtype=np.uint8)
    free = tissue & ~tumour
    n_glands = int(float(free.sum()) * spec.mpp**2 / 60_000.0)
    cand = np.flatnonzero(free)
    if cand.size:
        for idx in rng.choice(cand, size=min(n_glands, cand.size), replace=False).tolist():
            gy, gx = divmod(idx, spec.width_px)
            r_px = int(rng.uniform(30.0, 65.0) / spec.mpp)
            axes = (r_px, int(r_px * rng.uniform(0.6, 1.0)))
            cv2.ellipse(gland_u8, (gx, gy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    gland = gland_u8.astype(bool) & free
    return tissue, tumour, gland


def _place_nuclei(
    rng: np.random.Generator,
    allowed: npt.NDArray[np.bool_],
    *,
    count: int,
    radius_px: tuple[float, float],
    elongation: tuple[float, float],
    hema: tuple[float, float],
    h_od: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int32],
    next_label: int,
    types: npt.NDArray[np.uint8] | None = None,
    type_id: int = 0,
) -> int:
    """Draw up to ``count`` non-overlapping elliptical nuclei where ``allowed``; return next id."""
    import cv2

    h, w = allowed.shape
    candidates = np.flatnonzero(allowed)
    if candidates.size == 0 or count <= 0:
        return next_label
    picks = rng.choice(candidates, size=min(count, candidates.size), replace=False)
    ys, xs = np.divmod(picks, w)
    for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
        r = float(rng.uniform(*radius_px))
        e = float(rng.uniform(*elongation))
        ax = (max(2, round(r * e)), max(2, round(r / e)))
        angle = float(rng.uniform(0, 180))
        pad = ax[0] + 3
        y0, y1, x0, x1 = max(0, y - pad), min(h, y + pad + 1), max(0, x - pad), min(w, x + pad + 1)
        crop_lab = labels[y0:y1, x0:x1]
        stamp = np.zeros(crop_lab.shape, dtype=np.uint8)
        cv2.ellipse(stamp, (x - x0, y - y0), ax, angle, 0, 360, 1, -1)
        inside = stamp.astype(bool)
        if not inside.any() or (crop_lab[inside] != 0).any():
            continue  # would overlap an existing nucleus
        crop_lab[inside] = next_label
        if types is not None:
            types[y0:y1, x0:x1][inside] = type_id
        density = float(rng.uniform(*hema))
        chromatin = 1.0 + 0.25 * rng.standard_normal(int(inside.sum())).astype(np.float32)
        h_od[y0:y1, x0:x1][inside] = density * chromatin
        next_label += 1
    return next_label


def render_demo_image(
    spec: DemoSlideSpec | None = None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int32]]:
    """Render the demo slide in memory.

    Parameters
    ----------
    spec
        Geometry and seed; defaults to :class:`DemoSlideSpec()`.

    Returns
    -------
    rgb : ndarray of uint8, shape (H, W, 3)
        The level-0 image.
    labels : ndarray of int32, shape (H, W)
        The ground-truth nucleus instance map (0 background, 1..N nuclei).
    """
    truth = render_demo_truth(spec)
    return truth.rgb, truth.labels


def render_demo_truth(spec: DemoSlideSpec | None = None) -> DemoTruth:
    """Render the demo slide with its typed ground truth (see :class:`DemoTruth`)."""
    import cv2

    spec = spec or DemoSlideSpec()
    rng = np.random.default_rng(spec.seed)
    shape = (spec.height_px, spec.width_px)
    tissue, tumour, gland = _region_maps(rng, spec)

    # Eosin: fibrous stroma (anisotropic noise), paler in gland lumina.
    fibres = _smooth_noise(rng, shape, 15.0 / spec.mpp)
    streaks = np.asarray(
        cv2.GaussianBlur(
            rng.standard_normal(shape).astype(np.float32), (0, 0), sigmaX=6.0, sigmaY=1.0
        ),
        dtype=np.float32,
    )
    streaks /= max(float(streaks.std()), 1e-6)
    e_od = np.where(tissue, 0.55 + 0.08 * fibres + 0.12 * streaks, 0.0).astype(np.float32)
    e_od[tumour] *= 0.75
    h_od = np.where(tissue, 0.05, 0.0).astype(np.float32)
    labels = np.zeros(shape, dtype=np.int32)
    types = np.zeros(shape, dtype=np.uint8)
    epithelial, inflammatory, spindle = (
        DEMO_TYPES.index(n) + 1 for n in ("epithelial", "inflammatory", "spindle")
    )
    infiltrate = _infiltrate_band(rng, tissue, tumour, gland, spec.mpp)

    um2 = spec.mpp**2
    tumour_area_um2 = float(tumour.sum()) * um2
    stroma = tissue & ~tumour & ~gland & ~infiltrate
    nxt = 1
    nxt = _place_nuclei(
        rng,
        tumour,
        count=int(tumour_area_um2 / 70.0),
        radius_px=(4.5 / spec.mpp, 7.0 / spec.mpp),
        elongation=(1.0, 1.4),
        hema=(0.9, 1.3),
        h_od=h_od,
        labels=labels,
        next_label=nxt,
        types=types,
        type_id=epithelial,
    )
    # The infiltrate: lymphocytes, ~7 µm across, round, very dark, densely packed.
    nxt = _place_nuclei(
        rng,
        infiltrate,
        count=int(float(infiltrate.sum()) * um2 / 45.0),
        radius_px=(2.8 / spec.mpp, 3.6 / spec.mpp),
        elongation=(1.0, 1.15),
        hema=(1.3, 1.7),
        h_od=h_od,
        labels=labels,
        next_label=nxt,
        types=types,
        type_id=inflammatory,
    )
    # Glands: epithelial nuclei on rings around lumina.
    rim_px = max(3, int(8.0 / spec.mpp))
    kernel = np.ones((2 * rim_px + 1, 2 * rim_px + 1), np.uint8)
    gland_edge = gland & ~cv2.erode(gland.astype(np.uint8), kernel).astype(bool)
    nxt = _place_nuclei(
        rng,
        gland_edge,
        count=int(float(gland_edge.sum()) * um2 / 40.0),
        radius_px=(3.0 / spec.mpp, 4.0 / spec.mpp),
        elongation=(1.2, 1.6),
        hema=(0.7, 1.0),
        h_od=h_od,
        labels=labels,
        next_label=nxt,
        types=types,
        type_id=epithelial,
    )
    e_od[gland & ~gland_edge] *= 0.25  # lumen
    nxt = _place_nuclei(
        rng,
        stroma,
        count=int(float(stroma.sum()) * um2 / 600.0),
        radius_px=(2.5 / spec.mpp, 3.5 / spec.mpp),
        elongation=(1.6, 2.6),
        hema=(0.6, 0.9),
        h_od=h_od,
        labels=labels,
        next_label=nxt,
        types=types,
        type_id=spindle,
    )
    e_od = np.clip(e_od, 0.0, 2.0)
    h_od = np.clip(h_od, 0.0, 2.5)
    # optical blur at nucleus edges
    h_od = np.asarray(cv2.GaussianBlur(h_od, (0, 0), sigmaX=0.35 / spec.mpp), dtype=np.float32)
    od = h_od[..., None] * _H_VEC + e_od[..., None] * _E_VEC + 0.02 * _RESIDUAL
    rgb = 255.0 * np.exp(-od)
    rgb += rng.normal(0.0, 2.0, size=rgb.shape).astype(np.float32)
    out = np.clip(rgb, 0, 255).astype(np.uint8)
    logger.info("demo slide: %d nuclei, tissue %.2f mm²", nxt - 1, tissue.sum() * um2 / 1e6)
    return DemoTruth(rgb=out, labels=labels, types=types, infiltrate=infiltrate)


def write_demo_slide(path: Path, spec: DemoSlideSpec | None = None) -> Path:
    """Render the demo slide and write it as a pyramidal Aperio-style JPEG TIFF.

    Parameters
    ----------
    path
        Output file (``.svs`` or ``.tif``); written atomically.
    spec
        Geometry and seed.

    Returns
    -------
    Path
        ``path``.
    """
    from slidestream.wsi.synthetic import write_pyramidal_tiff

    spec = spec or DemoSlideSpec()
    rgb, _ = render_demo_image(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_pyramidal_tiff(
            tmp, rgb, mpp=spec.mpp, tile_size=256, compression="jpeg", vendor_style="aperio"
        )
    return path
