"""Stage 3, inference: the tissue pass (class probabilities per patch) and the nucleus pass.

The nucleus pass infers batches in this process and post-processes each tile (instance
separation, ownership, polygons, measurements) in a pool of CPU processes that runs while the
next batch is inferred; tiles reach the pool through a :class:`~slidestream.tile_ring.TileRing`
(shared memory: only a small ``SlotRef`` is pickled). Results come back in tile order.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from slidestream.config import RunConfig
from slidestream.tile_ring import SlotRef, TileRing

from ._heap import TRIM_EVERY_BATCHES, release_free_heap
from ._models import LoadedModels
from .stream import TileStream, read_sample, tile_stream

if TYPE_CHECKING:
    from slidestream.models.nuclei import InstanceTypes
    from slidestream.overlays import NucleusTable, TissueRegions
    from slidestream.tiling import ReaderKind, TissueMask
    from slidestream.wsi import Slide

__all__ = [
    "TissuePass",
    "measure_typed",
    "nucleus_stream",
    "nucleus_tables",
    "nucleus_tile_result",
    "postprocess_pool",
    "submit_nucleus_tile",
    "tissue_pass",
]

logger = logging.getLogger(__name__)

#: Tissue patches sampled (evenly over the tile grid) for a slide's stain gains.
_STAIN_SAMPLE_TILES = 64


class Progress:
    """A thin wrapper over tqdm that is a no-op when progress is hidden."""

    def __init__(self, total: int, desc: str, enabled: bool, position: int = 1) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="tile", leave=False, position=position)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class TissuePass:
    """The tissue classes of a slide."""

    regions: TissueRegions
    """Smoothed class regions (level-0), for nucleus class lookup and polygons."""
    class_names: tuple[str, ...]
    class_colors: dict[str, tuple[int, int, int]]
    stain_gains: tuple[float, ...] | None
    """The slide's H and E gains (``None``: the model does not normalise stains)."""


def tissue_pass(
    slide: Slide,
    mask: TissueMask,
    models: LoadedModels,
    config: RunConfig,
    readers: int,
    *,
    reader_kind: ReaderKind = "processes",
) -> TissuePass:
    """Classify the tissue patches of ``slide`` (at the classifier's µm/px) into regions."""
    from slidestream.overlays import tissue_class_regions
    from slidestream.tiling import TilingConfig

    spec = models.tissue.spec
    tiling = TilingConfig(
        tile_mpp=float(spec.spacing_um_px),
        tile_size_px=int(spec.patch_size_pixels),
        overlap_px=0,
        min_tissue_fraction=config.min_tissue_fraction,
    )
    stream = tile_stream(
        slide,
        mask,
        tiling,
        config,
        readers=readers,
        batch_size=max(config.batch_size, 16),
        device=models.device,
        reader_kind=reader_kind,
    )
    grid = stream.grid
    class_names = tuple(str(c) for c in spec.class_names)
    probs = np.full((grid.n_rows, grid.n_cols, len(class_names)), np.nan, dtype=np.float32)
    gains = _slide_stain_gains(slide, stream, models, config)
    bar = Progress(len(grid), "tissue", config.show_progress)
    try:
        for n_batches, batch in enumerate(stream.loader, start=1):
            p = models.tissue.predict_proba(batch.images, stain_gains=gains)
            for i, idx in enumerate(batch.indices.tolist()):
                tile = grid.tiles[idx]
                probs[tile.row, tile.col] = p[i]
            bar.update(len(batch.indices))
            if n_batches % TRIM_EVERY_BATCHES == 0:
                release_free_heap()
    finally:
        bar.close()
    release_free_heap()
    regions = tissue_class_regions(
        probs,
        None,
        class_names=class_names,
        l0_cell_size=(grid.l0_stride, grid.l0_stride),
        mpp=float(slide.mpp),
        smoothing_sigma_cells=config.tissue_smoothing_cells,
        min_island_area_um2=config.min_class_island_um2,
    )
    colors = {n: tuple(int(v) for v in c) for n, c in zip(class_names, spec.colors, strict=True)}
    return TissuePass(
        regions=regions,
        class_names=class_names,
        class_colors=colors,  # type: ignore[arg-type]
        stain_gains=None if gains is None else tuple(round(float(g), 4) for g in gains),
    )


def _slide_stain_gains(
    slide: Slide, stream: TileStream, models: LoadedModels, config: RunConfig
) -> Any:
    """One pair of H and E gains for the whole slide, or None (the tissue model has no
    image-level stain normalisation): levels pooled over up to 64 tissue patches spread evenly
    over the grid, read at the model's µm/px in this process."""
    if models.tissue.stain_reference is None or not len(stream.grid):
        return None
    patches = read_sample(slide, stream, config, _STAIN_SAMPLE_TILES)
    gains = models.tissue.stain_gains(patches)
    if gains is not None:
        logger.info(
            "%s: tissue-model stain gains H %.2f, E %.2f (%d patches)",
            slide.path,
            float(gains[0]),
            float(gains[1]),
            len(patches),
        )
    return gains


# ----------------------------------------------------------------------------- nucleus pass


def _init_postprocess_worker() -> None:
    """Keep each post-processing process single-threaded (the pool provides parallelism)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


def postprocess_pool(workers: int) -> ProcessPoolExecutor | None:
    """A spawn process pool of ``workers`` nucleus post-processing processes (``None`` for 0:
    post-processing then runs in the calling process)."""
    import multiprocessing as mp

    if workers <= 0:
        return None
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context("spawn"),
        initializer=_init_postprocess_worker,
    )


PostprocessFn = Callable[[npt.NDArray[Any]], npt.NDArray[np.int32]]


def submit_nucleus_tile(
    pool: Executor | None,
    postprocess: PostprocessFn,
    maps: npt.NDArray[Any],
    rgb: npt.NDArray[np.uint8],
    core: tuple[int, int, int, int],
    l0_origin: tuple[float, float],
    l0_per_px: float,
    mpp: float,
    *,
    ring: TileRing | None = None,
    l0_bounds: tuple[float, float] | None = None,
    type_names: tuple[str, ...] = (),
) -> Future[NucleusTable] | NucleusTable:
    """Run :func:`process_nucleus_tile` on a tile in ``pool`` (processes or threads), or here
    when ``pool`` is None.

    With a ``ring``, the tile's maps and pixels travel through its shared memory (the slot is freed
    when the Future is done); without one, or when no slot is free, they are pickled.

    Returns a Future (pool) or the tile's NucleusTable; :func:`nucleus_tile_result` takes either.
    """
    rest = (core, l0_origin, l0_per_px, mpp, l0_bounds, type_names)
    if pool is None:
        return process_nucleus_tile(postprocess, maps, np.ascontiguousarray(rgb), *rest)
    ref = ring.put(maps, rgb) if ring is not None else None
    if ring is None or ref is None:
        return pool.submit(
            process_nucleus_tile, postprocess, maps, np.ascontiguousarray(rgb), *rest
        )
    future = pool.submit(_process_ring_tile, postprocess, ref, *rest)
    future.add_done_callback(lambda _: ring.release(ref))
    return future


def nucleus_tile_result(item: Future[NucleusTable] | NucleusTable) -> NucleusTable:
    """The NucleusTable of a :func:`submit_nucleus_tile` result (waits for a Future)."""
    return item.result() if isinstance(item, Future) else item


def _process_ring_tile(
    postprocess: PostprocessFn,
    ref: SlotRef,
    core: tuple[int, int, int, int],
    l0_origin: tuple[float, float],
    l0_per_px: float,
    mpp: float,
    l0_bounds: tuple[float, float] | None,
    type_names: tuple[str, ...],
) -> NucleusTable:
    """Worker: :func:`process_nucleus_tile` on a tile read from a :class:`TileRing` slot."""
    maps, rgb = ref.load()
    return process_nucleus_tile(
        postprocess, maps, rgb, core, l0_origin, l0_per_px, mpp, l0_bounds, type_names
    )


def process_nucleus_tile(
    postprocess: PostprocessFn,
    maps: npt.NDArray[Any],
    rgb: npt.NDArray[np.uint8],
    core: tuple[int, int, int, int],
    l0_origin: tuple[float, float],
    l0_per_px: float,
    mpp: float,
    l0_bounds: tuple[float, float] | None = None,
    type_names: tuple[str, ...] = (),
) -> NucleusTable:
    """Worker: instance labels from model maps, then the nuclei this tile owns (level-0).

    ``core`` is in the tile's pixels at the model's µm/px, ``l0_per_px`` level-0 pixels per tile
    pixel, ``l0_bounds`` the slide's level-0 ``(width, height)`` (outlines are clipped to it).
    Post-processing may return labels ``u`` times finer than the maps
    (``PostprocessConfig.upsample``): the tile frame is then scaled by ``u`` so that outlines and
    measurements use the finer labels. The RGB is enlarged by pixel replication, so colour and
    optical-density means are means of the tile's own pixels (interpolated colours would lower
    the mean OD, which is convex in intensity).

    With ``type_names`` (a typing model: the last ``len(type_names)`` channels of ``maps`` are
    its per-pixel type probabilities) every nucleus also gets measurements ``p_<type>``, the
    mean type probability over its pixels (:func:`slidestream.models.nuclei.instance_types`).
    """
    from slidestream.models import measure_nuclei
    from slidestream.overlays import extract_tile_nuclei

    labels = postprocess(maps)
    measure = measure_nuclei
    if type_names:
        from slidestream.models import instance_types

        types = instance_types(labels, maps[-len(type_names) :], type_names)
        measure = functools.partial(measure_typed, types=types)
    u = labels.shape[0] // rgb.shape[0]  # (maps are channels-last RGB for the classical model)
    if u > 1:
        rgb = np.ascontiguousarray(rgb.repeat(u, axis=0).repeat(u, axis=1))
        x0, y0, x1, y1 = core
        core = (x0 * u, y0 * u, x1 * u, y1 * u)
        l0_per_px, mpp = l0_per_px / u, mpp / u
    return extract_tile_nuclei(
        labels,
        rgb,
        core=core,
        l0_origin=l0_origin,
        l0_per_px=l0_per_px,
        mpp=mpp,
        measure=measure,
        l0_bounds=l0_bounds,
    )


def measure_typed(
    labels: npt.NDArray[np.int32],
    rgb: npt.NDArray[np.uint8],
    mpp: float,
    *,
    types: InstanceTypes,
) -> dict[str, npt.NDArray[Any]]:
    """``measure_nuclei`` plus ``p_<type>`` columns: each instance's mean type probability
    (``types``, of the same labels; NaN for an instance ``types`` does not describe). Used as the
    ``measure`` of :func:`~slidestream.overlays.extract_tile_nuclei`, so the columns follow the
    nuclei through ownership, clipping and repair."""
    from slidestream.models import measure_nuclei
    from slidestream.overlays import type_probability_key

    columns = measure_nuclei(labels, rgb, mpp)
    ids = np.asarray(columns["label"], np.int64)
    probs = np.full((ids.size, len(types.names)), np.nan, np.float64)
    if types.ids.size and ids.size:
        row = np.minimum(np.searchsorted(types.ids, ids), types.ids.size - 1)
        found = types.ids[row] == ids
        probs[found] = types.probabilities[row[found]]
    for t, name in enumerate(types.names):
        columns[type_probability_key(name)] = probs[:, t]
    return columns


def nucleus_stream(
    slide: Slide,
    mask: TissueMask,
    models: LoadedModels,
    config: RunConfig,
    readers: int,
    *,
    reader_kind: ReaderKind = "processes",
) -> TileStream:
    """Plan the nucleus tiles (halo = ``nucleus_halo_um``) and open their loader."""
    from slidestream.tiling import TilingConfig

    halo_px = math.ceil(config.nucleus_halo_um / float(models.nuclei.mpp))
    tiling = TilingConfig(
        tile_mpp=float(models.nuclei.mpp),
        tile_size_px=config.nuclei_tile_size_px,
        overlap_px=2 * halo_px,
        min_tissue_fraction=config.min_tissue_fraction,
    )
    return tile_stream(
        slide,
        mask,
        tiling,
        config,
        readers=readers,
        batch_size=config.batch_size,
        device=models.device,
        reader_kind=reader_kind,
    )


def nucleus_tables(
    slide: Slide,
    stream: TileStream,
    models: LoadedModels,
    pool: Executor | None,
    *,
    max_pending: int,
    show_progress: bool,
    batch_size: int,
) -> Iterator[NucleusTable]:
    """Stream the nuclei of every tissue tile, in tile order, as NucleusTables (level-0).

    ``batch_size`` is the loader's. Tiles go to a process ``pool`` through a
    :class:`~slidestream.tile_ring.TileRing` (a thread pool shares them as they are); outlines
    are clipped to the slide.
    """
    nmodel = models.nuclei
    grid = stream.grid
    l0_per_px = float(nmodel.mpp) / float(slide.mpp)
    l0_bounds = (float(slide.dimensions[0]), float(slide.dimensions[1]))
    # A refining preset refines its watershed only as far as the slide's own resolution needs.
    postprocess = nmodel.postprocess_for(float(slide.mpp))
    type_names = tuple(nmodel.type_names)
    pending: deque[Future[NucleusTable] | NucleusTable] = deque()
    bar = Progress(len(grid), "nuclei", show_progress)
    # Slots for every tile that can be in flight: max_pending plus one batch.
    in_processes = isinstance(pool, ProcessPoolExecutor)
    ring = TileRing(max_pending + batch_size + 1) if in_processes else None
    try:
        for n_batches, batch in enumerate(stream.loader, start=1):
            maps = nmodel.predict(batch.images)
            rgb = batch.images.permute(0, 2, 3, 1).cpu().numpy()
            for i, idx in enumerate(batch.indices.tolist()):
                tile = grid.tiles[idx]
                pending.append(
                    submit_nucleus_tile(
                        pool,
                        postprocess,
                        maps[i],
                        rgb[i],
                        tile.core,
                        (float(tile.l0_x), float(tile.l0_y)),
                        l0_per_px,
                        float(nmodel.mpp),
                        ring=ring,
                        l0_bounds=l0_bounds,
                        type_names=type_names,
                    )
                )
            while len(pending) > max_pending:
                yield nucleus_tile_result(pending.popleft())
                bar.update(1)
            if n_batches % TRIM_EVERY_BATCHES == 0:
                release_free_heap()
        while pending:
            yield nucleus_tile_result(pending.popleft())
            bar.update(1)
    finally:
        for item in pending:
            if isinstance(item, Future):
                item.cancel()
        if ring is not None:
            ring.close()
        bar.close()
