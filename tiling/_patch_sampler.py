"""Training patches from annotated regions of a slide, streamed from the slide.

:func:`plan_patches` lays a grid of candidate patches (side ``patch_size_px`` at
``patch_mpp``, step ``stride`` patch sides) over every class region and keeps a candidate for a
class when at least ``min_inside`` of its area lies inside that class's region (exact polygon
intersection) and, with a tissue mask, at least ``min_tissue`` of it is tissue; at most
``max_per_class`` per class and slide are kept, drawn at random (seeded). :func:`read_patches`
then reads only those patches, one ``read_at_mpp`` each in raster order (the slide reader's tile
cache serves neighbours), so no whole-slide array is ever built.

Frames: ``l0_`` level-0 px of the slide; a patch is the level-0 square
``[l0_x, l0_x + l0_size) x [l0_y, l0_y + l0_size)`` with ``l0_size = patch_size_px * patch_mpp
/ slide_mpp``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely

from slidestream.errors import AnnotationError, ConfigError

from ._protocols import SlideLike
from ._tissue import TissueMask

__all__ = ["PatchLocations", "PatchSamplingConfig", "plan_patches", "read_patches"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class PatchSamplingConfig:
    """Where training patches are taken from annotated regions.

    Attributes
    ----------
    patch_mpp : float
        Resolution of the patches, µm/px (the model's working resolution).
    patch_size_px : int
        Patch side, px at ``patch_mpp``.
    min_inside : float
        Share of a patch's area that must lie inside its class region (0-1].
    min_tissue : float
        Share of the patch that must be tissue in the slide's tissue mask (0: not checked).
    stride : float
        Step of the candidate grid, in patch sides (0.5: patches overlap by half).
    max_per_class : int
        Most patches kept per class and slide.
    seed : int
        Seed of the random choice among candidates.
    """

    patch_mpp: float
    patch_size_px: int
    min_inside: float = 0.75
    min_tissue: float = 0.5
    stride: float = 0.5
    max_per_class: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.patch_mpp) and self.patch_mpp > 0) or self.patch_size_px < 8:
            raise ConfigError(
                f"patch sampling needs patch_mpp > 0 and patch_size_px >= 8; got "
                f"{self.patch_mpp}, {self.patch_size_px}"
            )
        if not 0 < self.min_inside <= 1 or not 0 <= self.min_tissue <= 1:
            raise ConfigError(
                f"--min-inside must be in (0, 1] and --min-tissue in [0, 1]; got "
                f"{self.min_inside}, {self.min_tissue}"
            )
        if not 0.05 <= self.stride <= 4 or self.max_per_class < 1:
            raise ConfigError(
                f"need stride in [0.05, 4] patch sides and max_per_class >= 1; got "
                f"{self.stride}, {self.max_per_class}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class PatchLocations:
    """The patches chosen on one slide.

    Attributes
    ----------
    l0_xy : ndarray, float64, (N, 2)
        Top-left corner of each patch, level-0 px.
    labels : ndarray, int64, (N,)
        Class index into ``class_names``.
    inside : ndarray, float64, (N,)
        Share of each patch inside its class region.
    class_names : tuple of str
    l0_size : float
        Patch side in level-0 px.
    candidates : dict of str to int
        Candidates per class that passed the checks (before ``max_per_class``).
    """

    l0_xy: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    inside: npt.NDArray[np.float64]
    class_names: tuple[str, ...]
    l0_size: float
    candidates: dict[str, int]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def counts(self) -> dict[str, int]:
        """Patches per class."""
        bins = np.bincount(self.labels, minlength=len(self.class_names))
        return {c: int(bins[i]) for i, c in enumerate(self.class_names)}


def _tissue_share(
    mask: TissueMask, l0_x: npt.NDArray[np.float64], l0_y: npt.NDArray[np.float64], l0_size: float
) -> npt.NDArray[np.float64]:
    """Share of tissue-mask pixels in each level-0 square (pixels whose centre falls inside)."""
    m = mask.mask
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(m, axis=0, dtype=np.int64), axis=1)
    s = mask.l0_per_m_px

    def edge(v: npt.NDArray[np.float64], limit: int) -> npt.NDArray[np.int64]:
        return np.clip(np.round(v / s), 0, limit).astype(np.int64)

    x0, x1 = edge(l0_x, m.shape[1]), edge(l0_x + l0_size, m.shape[1])
    y0, y1 = edge(l0_y, m.shape[0]), edge(l0_y + l0_size, m.shape[0])
    x1, y1 = (
        np.maximum(x1, x0 + 1).clip(max=m.shape[1]),
        np.maximum(y1, y0 + 1).clip(max=m.shape[0]),
    )
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    out: npt.NDArray[np.float64] = total / area
    return out


def plan_patches(
    regions: Mapping[str, shapely.Geometry],
    *,
    slide_mpp: float,
    dimensions: tuple[int, int],
    config: PatchSamplingConfig,
    class_names: Sequence[str] | None = None,
    tissue_mask: TissueMask | None = None,
) -> PatchLocations:
    """Choose the training patches of one slide from its class regions.

    Parameters
    ----------
    regions : mapping of str to shapely geometry
        Disjoint polygonal region of each class, level-0 px (``AnnotationSet.regions()``).
    slide_mpp : float
        Level-0 µm/px of the slide.
    dimensions : (int, int)
        Level-0 ``(width, height)``; patches stay inside the slide.
    config : PatchSamplingConfig
    class_names : sequence of str, optional
        Class order of ``labels`` (default: sorted region names); regions of other classes
        raise.
    tissue_mask : TissueMask, optional
        With ``config.min_tissue > 0``, patches with less tissue are dropped.

    Returns
    -------
    PatchLocations
        In raster order within each class.

    Raises
    ------
    AnnotationError
        A region whose class is not in ``class_names``.
    """
    names = tuple(class_names) if class_names is not None else tuple(sorted(regions))
    unknown = sorted(set(regions) - set(names))
    if unknown:
        raise AnnotationError(
            f"annotated classes {unknown} are not among the classes {list(names)}"
        )
    l0_size = config.patch_size_px * config.patch_mpp / slide_mpp
    step = l0_size * config.stride
    width, height = dimensions
    rng = np.random.default_rng(config.seed)
    xy_all, lab_all, inside_all = [], [], []
    candidates: dict[str, int] = {}
    for k, name in enumerate(names):
        region = regions.get(name)
        if region is None or region.is_empty:
            candidates[name] = 0
            continue
        bx0, by0, bx1, by1 = region.bounds
        xs = np.arange(
            max(0.0, bx0), min(width - l0_size, bx1 - l0_size * config.min_inside) + 1e-9, step
        )
        ys = np.arange(
            max(0.0, by0), min(height - l0_size, by1 - l0_size * config.min_inside) + 1e-9, step
        )
        if not len(xs) or not len(ys):
            candidates[name] = 0
            continue
        mesh_y, mesh_x = np.meshgrid(ys, xs, indexing="ij")
        gx, gy = mesh_x.ravel(), mesh_y.ravel()
        boxes = shapely.box(gx, gy, gx + l0_size, gy + l0_size)
        shapely.prepare(region)
        share = np.zeros(len(boxes))
        within = shapely.contains(region, boxes)
        share[within] = 1.0
        edge = shapely.intersects(region, boxes) & ~within
        if edge.any():
            share[edge] = shapely.area(shapely.intersection(boxes[edge], region)) / (l0_size**2)
        keep = share >= config.min_inside
        if tissue_mask is not None and config.min_tissue > 0 and keep.any():
            tissue = np.zeros(len(boxes))
            tissue[keep] = _tissue_share(tissue_mask, gx[keep], gy[keep], l0_size)
            keep &= tissue >= config.min_tissue
        idx = np.flatnonzero(keep)
        candidates[name] = int(idx.size)
        if idx.size > config.max_per_class:
            idx = np.sort(rng.choice(idx, size=config.max_per_class, replace=False))
        xy_all.append(np.stack([gx[idx], gy[idx]], axis=1))
        lab_all.append(np.full(idx.size, k, dtype=np.int64))
        inside_all.append(share[idx])
    if xy_all:
        l0_xy = np.concatenate(xy_all).astype(np.float64)
        labels = np.concatenate(lab_all)
        inside = np.concatenate(inside_all).astype(np.float64)
    else:
        l0_xy = np.zeros((0, 2))
        labels = np.zeros(0, dtype=np.int64)
        inside = np.zeros(0)
    return PatchLocations(
        l0_xy=l0_xy,
        labels=labels,
        inside=inside,
        class_names=names,
        l0_size=float(l0_size),
        candidates=candidates,
    )


def read_patches(
    slide: SlideLike,
    locations: PatchLocations,
    config: PatchSamplingConfig,
    *,
    on_patch: Callable[[int], None] | None = None,
) -> npt.NDArray[np.uint8]:
    """Read the planned patches from the slide at ``config.patch_mpp``.

    Parameters
    ----------
    slide : SlideLike
    locations : PatchLocations
    config : PatchSamplingConfig
        Its ``patch_mpp`` and ``patch_size_px`` give the read size.
    on_patch : callable, optional
        Called with the number of patches read so far, after each patch (progress bars).

    Returns
    -------
    ndarray, uint8, (N, patch_size_px, patch_size_px, 3)
        In the order of ``locations``; read in raster order (rows of patches top to bottom).
    """
    size = config.patch_size_px
    out = np.empty((len(locations), size, size, 3), dtype=np.uint8)
    order = np.lexsort((locations.l0_xy[:, 0], locations.l0_xy[:, 1]))
    for n, i in enumerate(order.tolist(), start=1):
        x, y = locations.l0_xy[i]
        out[i] = slide.read_at_mpp((float(x), float(y)), (size, size), config.patch_mpp)
        if on_patch is not None:
            on_patch(n)
    return out
