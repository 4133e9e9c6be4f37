"""Tile-grid geometry: coverage, bounds, partition, partial tiles and coordinate round-trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from slidestream.errors import ConfigError
from slidestream.tiling import (
    SlideExtent,
    TileGrid,
    TilingConfig,
    TissueMask,
    plan_tiles,
)


@st.composite
def grids(draw: st.DrawFn, *, tiny_threshold: bool = True) -> tuple[TileGrid, TissueMask]:
    """A slide extent, a random tissue mask (<= 40 x 40 px) and a tiling config."""
    slide_mpp = draw(st.floats(0.2, 1.0))
    tile_size = draw(st.integers(4, 300))
    overlap = 2 * draw(st.integers(0, (tile_size - 1) // 2))
    tile_mpp = draw(st.floats(0.1, 4.0))
    # At most 30 x 30 grid cells keep each example fast.
    l0_max = max(1, min(4000, int(30 * (tile_size - overlap) * tile_mpp / slide_mpp)))
    l0_w = draw(st.integers(1, l0_max))
    l0_h = draw(st.integers(1, l0_max))
    l0_per_m = max(l0_w, l0_h) / draw(st.integers(1, 40)) * draw(st.floats(1.0, 1.5))
    m_w, m_h = math.ceil(l0_w / l0_per_m - 1e-9), math.ceil(l0_h / l0_per_m - 1e-9)
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    mask = np.random.default_rng(seed).random((max(m_h, 1), max(m_w, 1))) < density
    tissue = TissueMask(
        mask=mask, mpp=l0_per_m * slide_mpp, slide_mpp=slide_mpp, l0_dimensions=(l0_w, l0_h)
    )
    threshold = 0.0 if tiny_threshold else draw(st.floats(0.0, 1.0))
    config = TilingConfig(
        tile_mpp=tile_mpp, tile_size_px=tile_size, overlap_px=overlap, min_tissue_fraction=threshold
    )
    grid = plan_tiles(SlideExtent(dimensions=(l0_w, l0_h), mpp=slide_mpp), config, tissue)
    if (l0_w / grid.l0_stride) % 1 > 1e-9:
        event("smaller last column")
    return grid, tissue


def _overlaps(
    a0: np.ndarray, a1: np.ndarray, b0: np.ndarray | float, b1: np.ndarray | float
) -> np.ndarray:
    return np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0.0, None)


@settings(max_examples=100, deadline=None)
@given(grids())
def test_kept_cores_cover_all_tissue(case: tuple[TileGrid, TissueMask]) -> None:
    grid, tissue = case
    l0_w, l0_h = grid.l0_dimensions
    d, s = tissue.l0_per_m_px, grid.l0_stride
    m_h, m_w = tissue.mask.shape
    # Overlap (level-0 px) of every mask pixel with every core, per axis, within the slide.
    px_x0, px_y0 = np.arange(m_w) * d, np.arange(m_h) * d
    cx0, cy0 = np.arange(grid.n_cols) * s, np.arange(grid.n_rows) * s
    ox = _overlaps(
        px_x0[None, :], px_x0[None, :] + d, cx0[:, None], np.minimum(cx0 + s, l0_w)[:, None]
    )
    oy = _overlaps(
        px_y0[None, :], px_y0[None, :] + d, cy0[:, None], np.minimum(cy0 + s, l0_h)[:, None]
    )
    # Cells that share more than a sliver (0.1 % of the core edge per axis) with a tissue pixel.
    touched = (oy > 1e-3 * s).astype(np.int64) @ tissue.mask @ (ox > 1e-3 * s).astype(np.int64).T
    kept = np.zeros((grid.n_rows, grid.n_cols), dtype=bool)
    for tile in grid:
        kept[tile.row, tile.col] = True
    missing = np.argwhere((touched > 0) & ~kept)
    assert missing.size == 0, f"tissue not covered in cells (row, col) {missing[:5].tolist()}"
    if not tissue.mask.any():
        assert len(grid) == 0


@settings(max_examples=100, deadline=None)
@given(grids(tiny_threshold=False))
def test_tiles_stay_within_declared_padding(case: tuple[TileGrid, TissueMask]) -> None:
    grid, _ = case
    cfg = grid.config
    l0_w, l0_h = grid.l0_dimensions
    f = grid.l0_per_t_px
    # The grid's cores start inside the slide and cover it, with less than one core to spare.
    assert (grid.n_cols - 1) * grid.l0_stride < l0_w <= grid.n_cols * grid.l0_stride + 1e-6
    assert (grid.n_rows - 1) * grid.l0_stride < l0_h <= grid.n_rows * grid.l0_stride + 1e-6
    for tile in grid:
        assert tile.l0_width == pytest.approx(cfg.tile_size_px * f)
        # Padding never exceeds the halo before the slide, nor halo + one core after it.
        assert tile.l0_x >= -cfg.halo_px * f - 1e-9
        assert tile.l0_y >= -cfg.halo_px * f - 1e-9
        assert tile.l0_x + tile.l0_width <= l0_w + (cfg.halo_px + cfg.stride_px) * f + 1e-6
        assert tile.l0_y + tile.l0_height <= l0_h + (cfg.halo_px + cfg.stride_px) * f + 1e-6
        outside = (
            tile.l0_x < 0
            or tile.l0_y < 0
            or tile.l0_x + tile.l0_width > l0_w + 1e-9
            or tile.l0_y + tile.l0_height > l0_h + 1e-9
        )
        assert tile.is_partial == outside
        assert tile.tissue_fraction >= cfg.min_tissue_fraction
        assert tile.tissue_fraction > 0


@settings(max_examples=100, deadline=None)
@given(grids(), st.lists(st.tuples(st.floats(-50, 5000), st.floats(-50, 5000)), max_size=20))
def test_cores_partition_the_plane(
    case: tuple[TileGrid, TissueMask], points: list[tuple[float, float]]
) -> None:
    grid, _ = case
    stride = grid.config.stride_px
    for tile in grid:
        assert tile.core == (grid.config.halo_px,) * 2 + (grid.config.halo_px + stride,) * 2
        # Global core of the tile is exactly the cell (col, row).
        assert tile.t_x + tile.core[0] == tile.col * stride
        assert tile.t_y + tile.core[1] == tile.row * stride
        assert grid.tile_at(tile.col, tile.row) is tile
    cells = [(t.col, t.row) for t in grid]
    assert len(set(cells)) == len(cells)
    assert cells == sorted(cells, key=lambda c: (c[1], c[0]))  # row-major
    for t_x, t_y in points:
        col, row = grid.core_owner(t_x, t_y)
        # Exactly one cell holds the point: its own (half-open intervals).
        assert col * stride <= t_x < (col + 1) * stride
        assert row * stride <= t_y < (row + 1) * stride
        tile = grid.tile_at(col, row)
        if tile is not None:
            assert tile.t_x + tile.core[0] <= t_x < tile.t_x + tile.core[2]
    arr = np.array(points, dtype=np.float64).reshape(-1, 2)
    cols, rows = grid.core_owner(arr[:, 0], arr[:, 1])
    assert [(int(c), int(r)) for c, r in zip(cols, rows, strict=True)] == [
        grid.core_owner(x, y) for x, y in points
    ]


@settings(max_examples=100, deadline=None)
@given(grids(), st.floats(-1e5, 1e5), st.floats(-1e5, 1e5))
def test_coordinates_round_trip(case: tuple[TileGrid, TissueMask], x: float, y: float) -> None:
    grid, _ = case
    assert grid.to_target(*grid.to_l0(x, y)) == pytest.approx((x, y), rel=1e-12, abs=1e-9)
    assert grid.to_l0(*grid.to_target(x, y)) == pytest.approx((x, y), rel=1e-12, abs=1e-9)
    for tile in grid.tiles[:5]:
        assert grid.to_l0(tile.t_x, tile.t_y) == pytest.approx((tile.l0_x, tile.l0_y))
        assert grid.to_target(tile.l0_x, tile.l0_y) == pytest.approx((tile.t_x, tile.t_y))


@settings(max_examples=60, deadline=None)
@given(grids(tiny_threshold=False))
def test_tissue_fraction_matches_brute_force(case: tuple[TileGrid, TissueMask]) -> None:
    grid, tissue = case
    l0_w, l0_h = grid.l0_dimensions
    d, s = tissue.l0_per_m_px, grid.l0_stride
    m_h, m_w = tissue.mask.shape
    px_x0 = np.arange(m_w) * d
    px_y0 = np.arange(m_h) * d
    for tile in grid.tiles[:20]:
        cx0, cx1 = tile.col * s, min((tile.col + 1) * s, l0_w)
        cy0, cy1 = tile.row * s, min((tile.row + 1) * s, l0_h)
        ox = _overlaps(px_x0, px_x0 + d, cx0, cx1)
        oy = _overlaps(px_y0, px_y0 + d, cy0, cy1)
        expected = float((np.outer(oy, ox) * tissue.mask).sum() / ((cx1 - cx0) * (cy1 - cy0)))
        assert tile.tissue_fraction == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_partial_last_tile_is_flagged() -> None:
    # 1000 px at 0.5 µm/px read at 0.5: stride 224 -> 5 columns, the last core sticks out.
    cfg = TilingConfig(tile_mpp=0.5, tile_size_px=256, overlap_px=32, min_tissue_fraction=0.0)
    grid = plan_tiles(SlideExtent(dimensions=(1000, 448), mpp=0.5), cfg)
    assert (grid.n_cols, grid.n_rows) == (5, 2)
    by_cell = {(t.col, t.row): t for t in grid}
    assert by_cell[(4, 0)].is_partial and by_cell[(0, 0)].is_partial  # edge and halo
    assert by_cell[(4, 0)].l0_x + by_cell[(4, 0)].l0_width > 1000
    # Without overlap, a tile fully inside the slide is not partial; the last one is.
    grid0 = plan_tiles(
        SlideExtent(dimensions=(1000, 512), mpp=0.5),
        TilingConfig(tile_mpp=0.5, tile_size_px=256, min_tissue_fraction=0.0),
    )
    flags = [(t.col, t.row, t.is_partial) for t in grid0]
    assert flags == [(c, r, c == 3) for r in range(2) for c in range(4)]


def test_threshold_uses_core_fraction_and_mask_mapping() -> None:
    # 4 x 4 mask at 4x downsample over a 16 x 16 slide; tissue in the top-left mask pixel only.
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    tissue = TissueMask(mask=mask, mpp=2.0, slide_mpp=0.5, l0_dimensions=(16, 16))
    cfg = TilingConfig(tile_mpp=0.5, tile_size_px=8, overlap_px=0, min_tissue_fraction=0.25)
    grid = plan_tiles(SlideExtent(dimensions=(16, 16), mpp=0.5), cfg, tissue)
    assert [(t.col, t.row, t.tissue_fraction) for t in grid] == [(0, 0, 0.25)]
    strict = TilingConfig(tile_mpp=0.5, tile_size_px=8, min_tissue_fraction=0.3)
    assert len(plan_tiles(SlideExtent(dimensions=(16, 16), mpp=0.5), strict, tissue)) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile_mpp": 0.0, "tile_size_px": 256},
        {"tile_mpp": 0.5, "tile_size_px": 0},
        {"tile_mpp": 0.5, "tile_size_px": 256, "overlap_px": 3},
        {"tile_mpp": 0.5, "tile_size_px": 256, "overlap_px": 256},
        {"tile_mpp": 0.5, "tile_size_px": 256, "min_tissue_fraction": 1.5},
    ],
)
def test_invalid_config_raises_config_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        TilingConfig(**kwargs)  # type: ignore[arg-type]


def test_mask_of_another_slide_is_rejected() -> None:
    tissue = TissueMask(
        mask=np.ones((2, 2), dtype=bool), mpp=8.0, slide_mpp=0.5, l0_dimensions=(32, 32)
    )
    with pytest.raises(ConfigError, match="same slide"):
        plan_tiles(
            SlideExtent(dimensions=(64, 64), mpp=0.5),
            TilingConfig(tile_mpp=0.5, tile_size_px=16),
            tissue,
        )
