"""Tile grid geometry: target-resolution tiles with a halo, cores that partition the plane.

Frames
------
``t_`` (target px)
    Pixels at the tiling resolution ``tile_mpp``; target px ``t`` maps to level-0 px
    ``t * l0_per_t_px`` with ``l0_per_t_px = tile_mpp / slide_mpp``. The origin is the slide's
    top-left corner in both frames.
``l0_`` (level-0 px)
    Pixels of the slide's full-resolution level.

Layout
------
``halo_px = overlap_px // 2`` and ``stride_px = tile_size_px - overlap_px``. The *core* of tile
``(col, row)`` is the target-px square ``[col * stride_px, (col + 1) * stride_px)`` (same for y);
cores partition the plane, so every target pixel belongs to exactly one core. The tile adds the
halo on each side: it covers ``[col * stride_px - halo_px, col * stride_px - halo_px +
tile_size_px)``. Tiles of the first row/column therefore start at ``-halo_px``; everything outside
the slide is padded by the reader and the tile is flagged ``is_partial``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, overload

import numpy as np
import numpy.typing as npt

from slidestream.errors import ConfigError

from ._tissue import TissueMask

__all__ = [
    "SlideExtent",
    "SlideGeometry",
    "TileGrid",
    "TileSpec",
    "TilingConfig",
    "plan_tiles",
    "tissue_fractions",
]


class SlideGeometry(Protocol):
    """What :func:`plan_tiles` needs from a slide: level-0 size and µm/px."""

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in px."""
        ...

    @property
    def mpp(self) -> float:
        """Level-0 µm/px."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideExtent:
    """A slide's level-0 ``dimensions`` (px) and ``mpp`` (µm/px), without the slide."""

    dimensions: tuple[int, int]
    mpp: float

    def __post_init__(self) -> None:
        if len(self.dimensions) != 2 or min(self.dimensions) < 1:
            raise ConfigError(f"SlideExtent.dimensions={self.dimensions!r}; expected (w, h) >= 1")
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ConfigError(f"SlideExtent.mpp={self.mpp!r}; expected µm/px > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class TilingConfig:
    """How to cut a slide into tiles.

    Parameters
    ----------
    tile_mpp
        Target resolution of the tiles in µm/px.
    tile_size_px
        Full tile edge in target px, halo included.
    overlap_px
        Overlap of neighbouring tiles in target px; even (a halo of ``overlap_px // 2`` on each
        side), smaller than ``tile_size_px``.
    min_tissue_fraction
        Keep a tile when the tissue fraction of its core (within the slide) reaches this (0..1).
        At 0 every tile with any tissue is kept; tiles without tissue never are.
    """

    tile_mpp: float
    tile_size_px: int
    overlap_px: int = 0
    min_tissue_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not (isinstance(self.tile_mpp, int | float) and math.isfinite(self.tile_mpp)) or (
            self.tile_mpp <= 0
        ):
            raise ConfigError(f"tile_mpp={self.tile_mpp!r}; expected µm/px > 0, e.g. 0.5")
        if not isinstance(self.tile_size_px, int) or self.tile_size_px < 1:
            raise ConfigError(f"tile_size_px={self.tile_size_px!r}; expected an int >= 1, e.g. 256")
        if (
            not isinstance(self.overlap_px, int)
            or self.overlap_px < 0
            or self.overlap_px % 2
            or self.overlap_px >= self.tile_size_px
        ):
            raise ConfigError(
                f"overlap_px={self.overlap_px!r}; expected an even int in [0, tile_size_px="
                f"{self.tile_size_px}), e.g. 32"
            )
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ConfigError(
                f"min_tissue_fraction={self.min_tissue_fraction!r}; expected 0..1, e.g. 0.1"
            )

    @property
    def halo_px(self) -> int:
        """Margin around the core on each side, in target px."""
        return self.overlap_px // 2

    @property
    def stride_px(self) -> int:
        """Distance between neighbouring tiles = core edge, in target px."""
        return self.tile_size_px - self.overlap_px


@dataclass(frozen=True, slots=True, kw_only=True)
class TileSpec:
    """One planned tile.

    Parameters
    ----------
    index
        Position in the grid's (row-major) tile list.
    col, row
        Grid cell; the core is target px ``[col * stride, (col + 1) * stride)`` (same for y).
    t_x, t_y
        Top-left of the tile, halo included, in target px (negative on the first column/row).
    l0_x, l0_y
        The same top-left in level-0 px (float).
    l0_width, l0_height
        Extent of the whole tile in level-0 px (float).
    core
        ``(t_x0, t_y0, t_x1, t_y1)`` of the core in tile-local target px (x1, y1 exclusive).
    tissue_fraction
        Tissue fraction of the core's part inside the slide (0..1).
    is_partial
        True when any part of the tile lies outside the slide (that part is padding).
    """

    index: int
    col: int
    row: int
    t_x: int
    t_y: int
    l0_x: float
    l0_y: float
    l0_width: float
    l0_height: float
    core: tuple[int, int, int, int]
    tissue_fraction: float
    is_partial: bool

    def __post_init__(self) -> None:
        if self.index < 0 or self.col < 0 or self.row < 0:
            raise ConfigError(f"TileSpec index/col/row must be >= 0; got {self}")
        if not (self.l0_width > 0 and self.l0_height > 0):
            raise ConfigError(f"TileSpec l0_width/l0_height must be > 0; got {self}")
        t_x0, t_y0, t_x1, t_y1 = self.core
        if not (0 <= t_x0 < t_x1 and 0 <= t_y0 < t_y1):
            raise ConfigError(
                f"TileSpec.core={self.core!r}; expected 0 <= x0 < x1 and 0 <= y0 < y1"
            )
        if not 0.0 <= self.tissue_fraction <= 1.0:
            raise ConfigError(f"TileSpec.tissue_fraction={self.tissue_fraction!r}; expected 0..1")


@dataclass(frozen=True, slots=True, kw_only=True)
class TileGrid:
    """The planned tiles of one slide plus everything needed to map coordinates.

    Iterable (row-major :class:`TileSpec` in ``index`` order) and sized.

    Parameters
    ----------
    config
        The tiling configuration.
    l0_dimensions
        Level-0 ``(width, height)`` of the slide in px.
    slide_mpp
        Level-0 µm/px of the slide.
    n_cols, n_rows
        Grid cells across and down (kept or not): cores cover ``[0, n_cols * stride)`` target px.
    tiles
        The kept tiles, row-major, ``tiles[i].index == i``.
    """

    config: TilingConfig
    l0_dimensions: tuple[int, int]
    slide_mpp: float
    n_cols: int
    n_rows: int
    tiles: tuple[TileSpec, ...]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.slide_mpp) and self.slide_mpp > 0):
            raise ConfigError(f"TileGrid.slide_mpp={self.slide_mpp!r}; expected µm/px > 0")
        if self.n_cols < 1 or self.n_rows < 1:
            raise ConfigError(
                f"TileGrid needs n_cols, n_rows >= 1; got {self.n_cols}, {self.n_rows}"
            )
        for i, tile in enumerate(self.tiles):
            if tile.index != i:
                raise ConfigError(f"TileGrid.tiles[{i}].index == {tile.index}; expected {i}")

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[TileSpec]:
        return iter(self.tiles)

    def __getitem__(self, index: int) -> TileSpec:
        return self.tiles[index]

    @property
    def l0_per_t_px(self) -> float:
        """Level-0 px per target px."""
        return self.config.tile_mpp / self.slide_mpp

    @property
    def l0_stride(self) -> float:
        """Core edge (grid pitch) in level-0 px."""
        return self.config.stride_px * self.l0_per_t_px

    @property
    def t_dimensions(self) -> tuple[float, float]:
        """Slide extent ``(width, height)`` in target px (float)."""
        l0_w, l0_h = self.l0_dimensions
        return l0_w / self.l0_per_t_px, l0_h / self.l0_per_t_px

    def to_l0(self, t_x: float, t_y: float) -> tuple[float, float]:
        """Map a target-px point to level-0 px."""
        return t_x * self.l0_per_t_px, t_y * self.l0_per_t_px

    def to_target(self, l0_x: float, l0_y: float) -> tuple[float, float]:
        """Map a level-0 px point to target px."""
        return l0_x / self.l0_per_t_px, l0_y / self.l0_per_t_px

    @overload
    def core_owner(self, t_x: float, t_y: float) -> tuple[int, int]: ...
    @overload
    def core_owner(
        self, t_x: npt.NDArray[np.floating], t_y: npt.NDArray[np.floating]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
    def core_owner(
        self, t_x: float | npt.NDArray[np.floating], t_y: float | npt.NDArray[np.floating]
    ) -> tuple[int, int] | tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Grid cell ``(col, row)`` whose core holds target-px point(s) ``(t_x, t_y)``.

        The point may lie in a cell whose tile was not kept (check with :meth:`tile_at`); points
        outside the slide give cells outside ``[0, n_cols) x [0, n_rows)``.
        """
        stride = self.config.stride_px
        if isinstance(t_x, np.ndarray) or isinstance(t_y, np.ndarray):
            return _owner_cells(np.asarray(t_x, np.float64), stride), _owner_cells(
                np.asarray(t_y, np.float64), stride
            )
        col = int(_owner_cells(np.asarray([t_x], np.float64), stride)[0])
        row = int(_owner_cells(np.asarray([t_y], np.float64), stride)[0])
        return col, row

    def tile_at(self, col: int, row: int) -> TileSpec | None:
        """The kept tile of grid cell ``(col, row)``, or None."""
        key = row * self.n_cols + col
        pos = bisect.bisect_left(self.tiles, key, key=lambda t: t.row * self.n_cols + t.col)
        if pos < len(self.tiles) and self.tiles[pos].col == col and self.tiles[pos].row == row:
            return self.tiles[pos]
        return None


def _owner_cells(t: npt.NDArray[np.float64], stride: int) -> npt.NDArray[np.int64]:
    """Cell index ``c`` with ``c * stride <= t < (c + 1) * stride``, exact despite round-off."""
    cells = np.floor(t / stride).astype(np.int64)
    cells -= (t < cells * stride).astype(np.int64)
    cells += (t >= (cells + 1) * stride).astype(np.int64)
    return cells


def _grid_shape(
    l0_dimensions: tuple[int, int], l0_per_t_px: float, stride_px: int
) -> tuple[int, int]:
    l0_w, l0_h = l0_dimensions
    l0_stride = stride_px * l0_per_t_px
    # Columns whose core starts inside the slide (guarding against float round-off).
    n_cols = max(1, math.ceil(l0_w / l0_stride - 1e-9))
    n_rows = max(1, math.ceil(l0_h / l0_stride - 1e-9))
    return n_cols, n_rows


def _integral_at(
    integral: npt.NDArray[np.float64], m_x: npt.NDArray[np.float64], m_y: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Exact area integral of a pixel-constant image over ``[0, x) x [0, y)`` (outer product).

    ``integral`` is the ``(H + 1, W + 1)`` summed-area table; the continuous integral is bilinear
    inside each pixel, so bilinear interpolation of the table is exact for fractional edges.
    """
    m_h, m_w = integral.shape[0] - 1, integral.shape[1] - 1
    x = np.clip(m_x, 0.0, float(m_w))
    y = np.clip(m_y, 0.0, float(m_h))
    x0 = np.minimum(np.floor(x).astype(np.int64), max(m_w - 1, 0))
    y0 = np.minimum(np.floor(y).astype(np.int64), max(m_h - 1, 0))
    fx = (x - x0)[None, :]
    fy = (y - y0)[:, None]
    s00 = integral[np.ix_(y0, x0)]
    s01 = integral[np.ix_(y0, x0 + 1)]
    s10 = integral[np.ix_(y0 + 1, x0)]
    s11 = integral[np.ix_(y0 + 1, x0 + 1)]
    result: npt.NDArray[np.float64] = (
        s00 + fx * (s01 - s00) + fy * (s10 - s00) + fx * fy * (s11 - s01 - s10 + s00)
    )
    return result


def tissue_fractions(
    mask: TissueMask, *, l0_per_t_px: float, stride_px: int, n_cols: int, n_rows: int
) -> npt.NDArray[np.float64]:
    """Tissue fraction of every core's in-slide part, ``(n_rows, n_cols)`` float64 in 0..1.

    Exact for fractional pixel overlaps (summed-area table, no loop over pixels); fractions below
    1e-9 are rounded to 0 so float round-off never keeps an empty tile.
    """
    l0_w, l0_h = mask.l0_dimensions
    l0_stride = stride_px * l0_per_t_px
    l0_x_edges = np.minimum(np.arange(n_cols + 1, dtype=np.float64) * l0_stride, l0_w)
    l0_y_edges = np.minimum(np.arange(n_rows + 1, dtype=np.float64) * l0_stride, l0_h)
    integral = np.zeros((mask.mask.shape[0] + 1, mask.mask.shape[1] + 1), dtype=np.float64)
    integral[1:, 1:] = mask.mask.cumsum(axis=0, dtype=np.float64).cumsum(axis=1)
    area = _integral_at(integral, l0_x_edges / mask.l0_per_m_px, l0_y_edges / mask.l0_per_m_px)
    m_tissue = area[1:, 1:] - area[:-1, 1:] - area[1:, :-1] + area[:-1, :-1]
    m_core_area = np.outer(np.diff(l0_y_edges), np.diff(l0_x_edges)) / mask.l0_per_m_px**2
    fractions = np.clip(m_tissue / np.maximum(m_core_area, 1e-300), 0.0, 1.0)
    fractions[fractions < 1e-9] = 0.0
    return fractions


def plan_tiles(
    slide: SlideGeometry,
    config: TilingConfig,
    mask: TissueMask | None = None,
) -> TileGrid:
    """Plan the tiles of a slide: every grid cell whose core holds enough tissue.

    Parameters
    ----------
    slide
        The slide (or anything with level-0 ``dimensions`` and ``mpp``, e.g.
        :class:`SlideExtent`).
    config
        Tile size, overlap, target µm/px and tissue threshold.
    mask
        Tissue mask of the same slide; None keeps every tile (``tissue_fraction`` 1.0).

    Returns
    -------
    TileGrid
        Kept tiles in deterministic row-major order.

    Raises
    ------
    ConfigError
        For non-positive dimensions or µm/px, or a mask of another slide.

    Examples
    --------
    >>> extent = SlideExtent(dimensions=(1000, 600), mpp=0.25)
    >>> grid = plan_tiles(extent, TilingConfig(tile_mpp=0.5, tile_size_px=256, overlap_px=32))
    >>> (grid.n_cols, grid.n_rows, len(grid)), grid[0].t_x, grid[0].l0_x, grid[0].is_partial
    ((3, 2, 6), -16, -32.0, True)
    """
    l0_dimensions = (int(slide.dimensions[0]), int(slide.dimensions[1]))
    slide_mpp = float(slide.mpp)
    l0_w, l0_h = l0_dimensions
    if l0_w < 1 or l0_h < 1:
        raise ConfigError(f"plan_tiles: slide dimensions {l0_dimensions!r}; expected >= 1 px")
    if not (math.isfinite(slide_mpp) and slide_mpp > 0):
        raise ConfigError(f"plan_tiles: slide_mpp={slide_mpp!r}; expected µm/px > 0 (pass --mpp)")
    if mask is not None and (
        tuple(mask.l0_dimensions) != (l0_w, l0_h) or abs(mask.slide_mpp / slide_mpp - 1) > 1e-6
    ):
        raise ConfigError(
            f"plan_tiles: tissue mask is for a {mask.l0_dimensions} slide at "
            f"{mask.slide_mpp} µm/px, not {l0_dimensions} at {slide_mpp}; "
            "detect tissue on the same slide"
        )
    l0_per_t = config.tile_mpp / slide_mpp
    stride, halo, size = config.stride_px, config.halo_px, config.tile_size_px
    n_cols, n_rows = _grid_shape(l0_dimensions, l0_per_t, stride)
    if mask is None:
        fractions = np.ones((n_rows, n_cols), dtype=np.float64)
    else:
        fractions = tissue_fractions(
            mask, l0_per_t_px=l0_per_t, stride_px=stride, n_cols=n_cols, n_rows=n_rows
        )
    keep = (fractions > 0) & (fractions >= config.min_tissue_fraction)
    rows, cols = np.nonzero(keep)  # row-major
    core = (halo, halo, halo + stride, halo + stride)
    l0_size = size * l0_per_t
    tiles: list[TileSpec] = []
    for i, (row, col) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        t_x, t_y = col * stride - halo, row * stride - halo
        l0_x, l0_y = t_x * l0_per_t, t_y * l0_per_t
        partial = t_x < 0 or t_y < 0 or l0_x + l0_size > l0_w + 1e-9 or l0_y + l0_size > l0_h + 1e-9
        tiles.append(
            TileSpec(
                index=i,
                col=col,
                row=row,
                t_x=t_x,
                t_y=t_y,
                l0_x=l0_x,
                l0_y=l0_y,
                l0_width=l0_size,
                l0_height=l0_size,
                core=core,
                tissue_fraction=float(fractions[row, col]),
                is_partial=bool(partial),
            )
        )
    return TileGrid(
        config=config,
        l0_dimensions=(l0_w, l0_h),
        slide_mpp=slide_mpp,
        n_cols=n_cols,
        n_rows=n_rows,
        tiles=tuple(tiles),
    )


def tiles_as_arrays(tiles: Sequence[TileSpec]) -> dict[str, npt.NDArray[np.generic]]:
    """Column arrays (``index``, ``l0_x``, ``l0_y``, ...) of ``tiles``, e.g. for a dataset."""
    return {
        "index": np.fromiter((t.index for t in tiles), dtype=np.int64, count=len(tiles)),
        "l0_x": np.fromiter((t.l0_x for t in tiles), dtype=np.float64, count=len(tiles)),
        "l0_y": np.fromiter((t.l0_y for t in tiles), dtype=np.float64, count=len(tiles)),
    }
