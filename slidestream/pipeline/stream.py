"""Stage 2, read: plan a slide's tiles at a model's resolution and stream them in batches.

Tile readers are DataLoader workers started from a fork server (forking this process after
torch has started its thread pools can deadlock a child, and spawn would re-import torch for
every slide). The fork server imports torch and the slide readers once, so a reader starts in
tens of ms. A process that may not start children (:func:`can_start_processes` is false: a Dask
worker under its nanny) reads with threads instead (``reader_kind="threads"``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from slidestream.config import RunConfig

if TYPE_CHECKING:
    from slidestream.tiling import ReaderKind, TileGrid, TileLoader, TilingConfig, TissueMask
    from slidestream.wsi import Slide

__all__ = [
    "LOADER_CONTEXT",
    "TileStream",
    "can_start_processes",
    "preload_forkserver",
    "read_sample",
    "tile_stream",
]

logger = logging.getLogger(__name__)

LOADER_CONTEXT = "forkserver"
"""Multiprocessing start method of the tile readers."""
_LOADER_PRELOAD = ("torch", "slidestream.tiling", "slidestream.wsi")
"""Modules the fork server imports once, so that each reader forked from it starts in tens of
ms instead of re-importing torch and the slide readers (~1 s per reader, twice per slide)."""


def can_start_processes() -> bool:
    """Whether this process may start child processes (it is not daemonic).

    A Dask worker started by a nanny (``dask worker``, ``LocalCluster(processes=True)``) is a
    daemonic process: ``multiprocessing`` refuses to start a child of one.
    """
    import multiprocessing as mp

    return not mp.current_process().daemon


@functools.cache
def preload_forkserver() -> None:
    """Start the tile readers' fork server, importing :data:`_LOADER_PRELOAD`.

    Called once per process, as early as possible; no effect on a fork server already running
    (its preload is fixed at start).
    """
    import multiprocessing as mp
    from multiprocessing import forkserver

    ctx = mp.get_context(LOADER_CONTEXT)
    ctx.set_forkserver_preload(list(_LOADER_PRELOAD))  # type: ignore[attr-defined]
    # Start it now: it imports the preload in its own process while this one carries on.
    forkserver.ensure_running()


@dataclass(frozen=True, slots=True, kw_only=True)
class TileStream:
    """The tissue tiles of one pass and the loader that streams them (tile order)."""

    grid: TileGrid
    """Tile geometry (level-0 and target px)."""
    loader: TileLoader
    """Batches of ``uint8 (N, 3, H, W)`` tiles with their grid indices."""
    tiling: TilingConfig


def tile_stream(
    slide: Slide,
    mask: TissueMask,
    tiling: TilingConfig,
    config: RunConfig,
    *,
    readers: int,
    batch_size: int,
    device: str,
    reader_kind: ReaderKind = "processes",
) -> TileStream:
    """Plan the tissue tiles of ``tiling`` and open their batch loader (``readers`` worker
    processes, or threads with ``reader_kind="threads"``)."""
    from slidestream.tiling import TileDataset, make_loader, plan_tiles

    if reader_kind == "processes" and readers > 0:
        preload_forkserver()
    grid = plan_tiles(slide, tiling, mask)
    dataset = TileDataset(
        slide.path,
        grid.tiles,
        tile_mpp=tiling.tile_mpp,
        tile_size_px=tiling.tile_size_px,
        slide_mpp=config.mpp_override,
    )
    loader = make_loader(
        dataset,
        batch_size=batch_size,
        num_workers=readers,
        device=device,
        multiprocessing_context=LOADER_CONTEXT,
        workers_as=reader_kind,
    )
    return TileStream(grid=grid, loader=loader, tiling=tiling)


def read_sample(
    slide: Slide, stream: TileStream, config: RunConfig, count: int
) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Up to ``count`` tiles spread evenly over the grid, read here: uint8 (P, 3, H, W)."""
    from slidestream.tiling import TileDataset

    grid = stream.grid
    picks = np.unique(np.linspace(0, len(grid) - 1, min(len(grid), count)).round())
    dataset = TileDataset(
        slide.path,
        [grid.tiles[int(i)] for i in picks],
        tile_mpp=stream.tiling.tile_mpp,
        tile_size_px=stream.tiling.tile_size_px,
        slide_mpp=config.mpp_override,
    )
    try:
        patches = np.stack([dataset.read_tile(k) for k in range(len(dataset))])
    finally:
        dataset.close()
    return np.ascontiguousarray(patches.transpose(0, 3, 1, 2))
