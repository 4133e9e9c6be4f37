"""Whole-slide analysis: one streaming pass per analysis resolution, batch over slides.

For each slide: open it (:mod:`slidestream.wsi`), detect tissue and plan tiles
(:mod:`slidestream.tiling`), classify tissue patches and segment nuclei
(:mod:`slidestream.models`), stitch and write QuPath overlays, parquet and the overlay image
(:mod:`slidestream.overlays`), then record the run in the statistics database
(:mod:`slidestream.db`). This module is the only place these packages meet.

Data never goes back upstream and no level-0 region is read twice for the nucleus model:
tiles are read once by DataLoader workers, inferred in batches in this process, and post-processed
(instance separation, ownership, polygons, measurements) in a pool of CPU processes that runs
while the next batch is inferred. Results stream to disk in tile order.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import functools
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from slidestream._version import __version__
from slidestream.config import RunConfig
from slidestream.errors import NoTissueError, SlidestreamError
from slidestream.inputs import discover_slides
from slidestream.publish import (
    SUMMARY_NAME,
    publish,
    read_summary,
    staging_dir,
    write_json_atomic,
)
from slidestream.statistics import StatisticsAccumulator
from slidestream.tile_ring import SlotRef, TileRing

__all__ = [
    "LoadedModels",
    "SlideOutcome",
    "analyse_guarded",
    "analyse_slide",
    "load_models",
    "record_outcome",
    "run_batch",
    "write_failures",
]

logger = logging.getLogger(__name__)

SUMMARY_SCHEMA = "slidestream.summary/1"
# Tile readers start from a fork server: forking this process after torch has started its
# thread pools can deadlock a child, and spawn would re-import torch for every slide.
_LOADER_CONTEXT = "forkserver"
# Modules the fork server imports once, so that each reader forked from it starts in tens of ms
# instead of re-importing torch and the slide readers (~1 s per reader, twice per slide).
_LOADER_PRELOAD = ("torch", "slidestream.tiling", "slidestream.wsi")
# Batches between two returns of the C heap's free memory to the OS (see _release_free_heap).
_TRIM_EVERY_BATCHES = 4
# Nuclei classified, counted and written per block (tile results are concatenated up to this):
# per-tile blocks of ~60 nuclei spent most of the main process's time on fixed per-call costs,
# which caps a GPU run (bench/pipeline_host.py).
_NUCLEI_PER_BLOCK = 4096
OUTPUT_NAMES = {
    "nuclei_geojson": "nuclei.geojson.gz",
    "tissue_geojson": "tissue.geojson",
    "nuclei_parquet": "nuclei.parquet",
    "overlay_png": "overlay.png",
    "tissue_mask_png": "tissue_mask.png",
    "summary_json": SUMMARY_NAME,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideOutcome:
    """What happened to one slide of a batch.

    Attributes
    ----------
    path
        The slide as given.
    status
        ``"succeeded"``, ``"skipped"`` (results up to date) or ``"failed"``.
    error
        One-line reason when failed.
    summary
        The slide's ``summary.json`` content when succeeded or skipped.
    seconds
        Wall time spent on the slide.
    """

    path: Path
    status: Literal["succeeded", "skipped", "failed"]
    error: str | None = None
    summary: dict[str, Any] | None = None
    seconds: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedModels:
    """The models of a run, loaded once for the whole batch."""

    nuclei: Any
    """The nucleus model (``slidestream.models.load_nuclei_model``)."""
    tissue: Any
    """The tissue classifier (``slidestream.models.load_tissue_model``)."""
    device: str
    """Torch device string the models run on."""

    def hashes(self) -> dict[str, str]:
        """Model name -> weights sha256 (and the nucleus post-processing), for the parameters hash.

        A preset's post-processing thresholds can change while its weights stay the same, so
        they are part of what makes a stored result current.
        """
        out = {
            "nuclei": str(self.nuclei.weights_sha256),
            "tissue": str(self.tissue.weights_sha256),
        }
        if self.nuclei.postprocess_config is not None:
            pp = self.nuclei.postprocess_config.to_dict()
            out["nuclei_postprocess"] = json.dumps(pp, sort_keys=True)
        return out

    def provenance(self) -> dict[str, Any]:
        """The ``provenance.models`` block of ``summary.json``."""
        return {
            "nuclei": {
                "name": self.nuclei.name,
                "sha256": self.nuclei.weights_sha256,
                "mpp": float(self.nuclei.mpp),
                "postprocess": (
                    None
                    if self.nuclei.postprocess_config is None
                    else self.nuclei.postprocess_config.to_dict()
                ),
            },
            "tissue": {
                "name": self.tissue.name,
                "sha256": self.tissue.weights_sha256,
                "mpp": float(self.tissue.spec.spacing_um_px),
                "classes": list(self.tissue.spec.class_names),
            },
        }


class _ClassicalAsModel:
    """Adapts the no-weights classical segmenter to the batched model interface.

    ``predict`` passes the RGB tiles through as the "maps" (channels-last uint8) and
    ``postprocess`` segments one of them, so the classical path streams, stitches and writes
    exactly like the trained model. It has no thresholds to record and never refines.
    """

    postprocess_config = None

    def __init__(self, segmenter: Any) -> None:
        self.segmenter = segmenter
        self.name = str(segmenter.name)
        self.mpp = float(segmenter.mpp)
        self.weights_sha256 = "classical"
        self.postprocess = segmenter.segment_working

    def predict(self, batch: Any) -> npt.NDArray[np.uint8]:
        return np.ascontiguousarray(batch.permute(0, 2, 3, 1).cpu().numpy())

    def postprocess_for(self, input_mpp: float) -> Any:
        """The same segmentation at any input µm/px."""
        return self.postprocess


def resolve_device(spec: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; others pass through."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise SlidestreamError(f"--device {spec}: no CUDA device is available; use --device cpu")
    return spec


def load_models(config: RunConfig) -> LoadedModels:
    """Load the nucleus and tissue models of ``config`` onto its device."""
    from slidestream.models import load_nuclei_model, load_tissue_model

    _preload_forkserver()  # boots the readers' fork server while the models load
    device = resolve_device(config.device)
    nuclei: Any = load_nuclei_model(config.nuclei_model, device=device)
    if not hasattr(nuclei, "predict"):
        nuclei = _ClassicalAsModel(nuclei)
    return LoadedModels(
        nuclei=nuclei,
        tissue=load_tissue_model(config.tissue_model, device=device),
        device=device,
    )


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Up to this many CPU cores, an fp32 CPU run post-processes nucleus tiles in the main process.
_INLINE_POSTPROCESS_MAX_CPUS = 2


def _is_fp32_cpu_model(models: LoadedModels) -> bool:
    """Whether the nucleus model is a torch network computing in fp32 on the CPU."""
    return (
        models.device == "cpu"
        and getattr(models.nuclei, "net", None) is not None
        and getattr(models.nuclei, "precision", None) == "fp32"
    )


def _worker_counts(config: RunConfig, models: LoadedModels) -> tuple[int, int]:
    """(tile-reading workers, post-processing workers) for this machine and ``models``.

    A nucleus network computing in fp32 on <= 2 CPU cores (:func:`_is_fp32_cpu_model`) gets its
    post-processing in the main process (0 workers).
    """
    cpus = _cpu_count()
    readers = (
        config.workers if config.workers is not None else (1 if cpus <= 4 else min(4, cpus // 4))
    )
    if config.postprocess_workers is not None:
        post = config.postprocess_workers
    elif models.device.startswith("cuda"):
        post = max(1, cpus - readers - 1)
    elif _is_fp32_cpu_model(models) and cpus <= _INLINE_POSTPROCESS_MAX_CPUS:
        # The model's fp32 torch threads already use every core; a post-processing process
        # beside them only steals cycles from (spinning) OpenMP threads: on a 2-core AVX2 CPU the
        # nucleus pass took 9.2-11.3 s inline vs 11.5-17.4 s with one worker (8 alternated pairs).
        # Not applied to bf16 networks (there post-processing costs as much as the model, so the
        # overlap should pay; inline was not measured on such a CPU) nor to the classical model
        # (no torch threads).
        post = 0
    else:
        post = max(1, cpus // 2)
    return readers, post


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _release_free_heap() -> None:
    """Give the free pages of every glibc malloc arena back to the OS (no-op without glibc).

    CPU inference in this process allocates and frees tens of MB of activations per batch from
    several threads. glibc keeps freed blocks below its (self-raising) mmap threshold in
    per-thread arenas, and on some runs the resident size of the main process grew from 0.6 GB to
    2.9 GB of free heap during the tissue pass of a 157 mm² slide (``bench/memory.py``). Trimming
    every few batches (a few ms each) keeps it near the working set.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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


def submit_nucleus_tile(
    pool: ProcessPoolExecutor | None,
    postprocess: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.int32]],
    maps: npt.NDArray[np.float32],
    rgb: npt.NDArray[np.uint8],
    *rest: Any,
    ring: TileRing | None = None,
) -> Future[Any] | Any:
    """Run :func:`_process_nucleus_tile` on a tile in ``pool``, or here when ``pool`` is None.

    With a ``ring``, the tile's maps and pixels travel through its shared memory (the slot is freed
    when the Future is done); without one, or when no slot is free, they are pickled. ``rest`` are
    :func:`_process_nucleus_tile`'s arguments after ``rgb``.

    Returns a Future (pool) or the tile's NucleusTable; :func:`nucleus_tile_result` takes either.
    """
    if pool is None:
        return _process_nucleus_tile(postprocess, maps, np.ascontiguousarray(rgb), *rest)
    ref = ring.put(maps, rgb) if ring is not None else None
    if ring is None or ref is None:
        return pool.submit(
            _process_nucleus_tile, postprocess, maps, np.ascontiguousarray(rgb), *rest
        )
    future = pool.submit(_process_ring_tile, postprocess, ref, *rest)
    future.add_done_callback(lambda _: ring.release(ref))
    return future


def nucleus_tile_result(item: Future[Any] | Any) -> Any:
    """The NucleusTable of a :func:`submit_nucleus_tile` result (waits for a Future)."""
    return item.result() if isinstance(item, Future) else item


def _process_ring_tile(
    postprocess: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.int32]],
    ref: SlotRef,
    *rest: Any,
) -> Any:
    """Worker: :func:`_process_nucleus_tile` on a tile read from a :class:`TileRing` slot."""
    maps, rgb = ref.load()
    return _process_nucleus_tile(postprocess, maps, rgb, *rest)


def _process_nucleus_tile(
    postprocess: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.int32]],
    maps: npt.NDArray[np.float32],
    rgb: npt.NDArray[np.uint8],
    core: tuple[int, int, int, int],
    l0_origin: tuple[float, float],
    l0_per_px: float,
    mpp: float,
) -> Any:
    """Worker: instance labels from model maps, then the nuclei this tile owns (level-0).

    ``core`` is in the tile's pixels at the model's µm/px, ``l0_per_px`` level-0 pixels per tile
    pixel. Post-processing may return labels ``u`` times finer than the maps
    (``PostprocessConfig.upsample``): the tile frame is then scaled by ``u`` so that outlines and
    measurements use the finer labels. The RGB is enlarged by pixel replication, so colour and
    optical-density means are means of the tile's own pixels (interpolated colours would lower
    the mean OD, which is convex in intensity).
    """
    from slidestream.overlays import extract_tile_nuclei

    labels = postprocess(maps)
    u = labels.shape[0] // rgb.shape[0]  # (maps are channels-last RGB for the classical model)
    if u > 1:
        rgb = np.ascontiguousarray(rgb.repeat(u, axis=0).repeat(u, axis=1))
        x0, y0, x1, y1 = core
        core = (x0 * u, y0 * u, x1 * u, y1 * u)
        l0_per_px, mpp = l0_per_px / u, mpp / u
    return extract_tile_nuclei(
        labels, rgb, core=core, l0_origin=l0_origin, l0_per_px=l0_per_px, mpp=mpp
    )


class _Progress:
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


@functools.cache
def _preload_forkserver() -> None:
    """Start the tile readers' fork server, importing :data:`_LOADER_PRELOAD`.

    Called once per process, as early as possible; no effect on a fork server already running
    (its preload is fixed at start).
    """
    import multiprocessing as mp
    from multiprocessing import forkserver

    ctx = mp.get_context(_LOADER_CONTEXT)
    ctx.set_forkserver_preload(list(_LOADER_PRELOAD))  # type: ignore[attr-defined]
    # Start it now: it imports the preload in its own process while this one carries on.
    forkserver.ensure_running()


def _tile_stream(
    slide: Any,
    mask: Any,
    tiling: Any,
    config: RunConfig,
    *,
    readers: int,
    batch_size: int,
    device: str,
) -> tuple[Any, Any]:
    """Plan the tissue tiles of ``tiling`` and open their batch loader: ``(grid, loader)``."""
    from slidestream.tiling import TileDataset, make_loader, plan_tiles

    _preload_forkserver()
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
        multiprocessing_context=_LOADER_CONTEXT,
    )
    return grid, loader


def _tissue_pass(
    slide: Any, mask: Any, models: LoadedModels, config: RunConfig, readers: int
) -> tuple[Any, dict[str, float], list[float] | None]:
    """Classify tissue patches; return the class regions, per-class areas (mm²) and the slide's
    H and E stain gains (None when the tissue model does not normalise stains)."""
    from slidestream.overlays import tissue_class_regions
    from slidestream.tiling import TilingConfig

    spec = models.tissue.spec
    tiling = TilingConfig(
        tile_mpp=float(spec.spacing_um_px),
        tile_size_px=int(spec.patch_size_pixels),
        overlap_px=0,
        min_tissue_fraction=config.min_tissue_fraction,
    )
    grid, loader = _tile_stream(
        slide,
        mask,
        tiling,
        config,
        readers=readers,
        batch_size=max(config.batch_size, 16),
        device=models.device,
    )
    n_classes = len(spec.class_names)
    probs = np.full((grid.n_rows, grid.n_cols, n_classes), np.nan, dtype=np.float32)
    gains = _slide_stain_gains(slide, grid, tiling, models, config)
    bar = _Progress(len(grid), "tissue", config.show_progress)
    try:
        for n_batches, batch in enumerate(loader, start=1):
            p = models.tissue.predict_proba(batch.images, stain_gains=gains)
            for i, idx in enumerate(batch.indices.tolist()):
                tile = grid.tiles[idx]
                probs[tile.row, tile.col] = p[i]
            bar.update(len(batch.indices))
            if n_batches % _TRIM_EVERY_BATCHES == 0:
                _release_free_heap()
    finally:
        bar.close()
    _release_free_heap()
    regions = tissue_class_regions(
        probs,
        None,
        class_names=tuple(spec.class_names),
        l0_cell_size=(grid.l0_stride, grid.l0_stride),
        mpp=float(slide.mpp),
        smoothing_sigma_cells=config.tissue_smoothing_cells,
        min_island_area_um2=config.min_class_island_um2,
    )
    areas = _class_areas_on_mask(regions, mask, tuple(spec.class_names))
    return regions, areas, None if gains is None else [round(float(g), 4) for g in gains]


#: Tissue patches sampled (evenly over the tile grid) for a slide's stain gains.
_STAIN_SAMPLE_TILES = 64


def _slide_stain_gains(
    slide: Any, grid: Any, tiling: Any, models: LoadedModels, config: RunConfig
) -> Any:
    """One pair of H and E gains for the whole slide, or None (the tissue model has no
    image-level stain normalisation): levels pooled over up to 64 tissue patches spread evenly
    over the grid, read at the model's µm/px in this process."""
    if models.tissue.stain_reference is None or not len(grid):
        return None
    from slidestream.tiling import TileDataset

    picks = np.unique(np.linspace(0, len(grid) - 1, min(len(grid), _STAIN_SAMPLE_TILES)).round())
    dataset = TileDataset(
        slide.path,
        [grid.tiles[int(i)] for i in picks],
        tile_mpp=tiling.tile_mpp,
        tile_size_px=tiling.tile_size_px,
        slide_mpp=config.mpp_override,
    )
    try:
        patches = np.stack([dataset.read_tile(k) for k in range(len(dataset))])
    finally:
        dataset.close()
    gains = models.tissue.stain_gains(np.ascontiguousarray(patches.transpose(0, 3, 1, 2)))
    if gains is not None:
        logger.info(
            "%s: tissue-model stain gains H %.2f, E %.2f (%d patches)",
            slide.path,
            float(gains[0]),
            float(gains[1]),
            len(picks),
        )
    return gains


def _clip_to_tissue(class_polygons: dict[str, Any], mask: Any) -> dict[str, Any]:
    """Class regions intersected with the tissue mask's outline (polygonal parts only)."""
    import shapely

    tissue = mask.to_polygons()
    out: dict[str, Any] = {}
    for name, geom in class_polygons.items():
        parts = shapely.get_parts(shapely.intersection(geom, tissue))
        polys = [p for p in parts if isinstance(p, shapely.Polygon) and not p.is_empty]
        if polys:
            out[name] = polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)
    return out


def _class_areas_on_mask(
    regions: Any, mask: Any, class_names: tuple[str, ...], *, chunk_px: int = 1 << 18
) -> dict[str, float]:
    """Area of each tissue class in mm², counted on the tissue mask so classes sum to tissue.

    Every tissue-mask pixel takes the class of the region under its centre (level-0 lookup in
    the class raster); pixels beyond every classified patch count as ``UNCLASSIFIED``. The mask
    is looked up in bands of about ``chunk_px`` pixels: ``regions.assign`` builds a few arrays
    (class names included) per point, which for a whole large slide (~2.5 M mask pixels for
    150 mm² at 8 µm/px) would add about 0.4 GB to the peak memory.
    """
    from slidestream.overlays import UNCLASSIFIED

    counts = np.zeros(len(class_names) + 1, dtype=np.int64)
    m_height, m_width = mask.mask.shape
    rows = max(1, chunk_px // max(1, m_width))
    for m_y0 in range(0, m_height, rows):
        m_y, m_x = np.nonzero(mask.mask[m_y0 : m_y0 + rows])
        if m_y.size == 0:
            continue
        l0_x = (m_x.astype(np.float64) + 0.5) * mask.l0_per_m_px
        l0_y = (m_y.astype(np.float64) + (m_y0 + 0.5)) * mask.l0_per_m_px
        _, index = regions.assign(l0_x, l0_y)
        counts += np.bincount(index, minlength=len(class_names) + 1)
    mm2_per_px = float(mask.mpp) ** 2 / 1e6
    areas = {name: float(counts[i]) * mm2_per_px for i, name in enumerate(class_names)}
    areas[UNCLASSIFIED] = float(counts[len(class_names)]) * mm2_per_px
    return areas


def _nucleus_stream(
    slide: Any, mask: Any, models: LoadedModels, config: RunConfig, readers: int
) -> tuple[Any, Any]:
    """Plan the nucleus tiles (halo = ``nucleus_halo_um``) and open their loader: (grid, loader)."""
    from slidestream.tiling import TilingConfig

    halo_px = math.ceil(config.nucleus_halo_um / float(models.nuclei.mpp))
    tiling = TilingConfig(
        tile_mpp=float(models.nuclei.mpp),
        tile_size_px=config.nuclei_tile_size_px,
        overlap_px=2 * halo_px,
        min_tissue_fraction=config.min_tissue_fraction,
    )
    return _tile_stream(
        slide,
        mask,
        tiling,
        config,
        readers=readers,
        batch_size=config.batch_size,
        device=models.device,
    )


def _nucleus_tables(
    slide: Any,
    stream: tuple[Any, Any],
    models: LoadedModels,
    pool: ProcessPoolExecutor | None,
    max_pending: int,
    show_progress: bool,
    batch_size: int,
) -> Iterator[Any]:
    """Stream the nuclei of every tissue tile, in tile order, as NucleusTables (level-0).

    ``stream`` is :func:`_nucleus_stream`'s ``(grid, loader)``; ``batch_size`` is its loader's.
    Tiles go to ``pool`` through a :class:`~slidestream.tile_ring.TileRing`.
    """
    nmodel = models.nuclei
    grid, loader = stream
    l0_per_px = float(nmodel.mpp) / float(slide.mpp)
    # A refining preset refines its watershed only as far as the slide's own resolution needs.
    postprocess = nmodel.postprocess_for(float(slide.mpp))
    pending: deque[Future[Any] | Any] = deque()
    bar = _Progress(len(grid), "nuclei", show_progress)
    # Slots for every tile that can be in flight: max_pending plus one batch.
    ring = TileRing(max_pending + batch_size + 1) if pool is not None else None
    try:
        for n_batches, batch in enumerate(loader, start=1):
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
                    )
                )
            while len(pending) > max_pending:
                yield nucleus_tile_result(pending.popleft())
                bar.update(1)
            if n_batches % _TRIM_EVERY_BATCHES == 0:
                _release_free_heap()
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


def _slide_block(slide: Any, path: Path) -> dict[str, Any]:
    return {
        "name": slide.name,
        "path": str(Path(path).resolve()),
        "fingerprint": slide.fingerprint,
        "vendor": slide.vendor,
        "width": int(slide.dimensions[0]),
        "height": int(slide.dimensions[1]),
        "mpp_x": float(slide.mpp_x),
        "mpp_y": float(slide.mpp_y),
        "objective_power": slide.objective_power,
    }


def analyse_slide(
    path: Path,
    config: RunConfig,
    models: LoadedModels,
    *,
    pool: ProcessPoolExecutor | None = None,
) -> SlideOutcome:
    """Analyse one slide and publish its outputs under ``config.out_dir/<slide-name>/``.

    Parameters
    ----------
    path
        Slide file (or DICOM folder).
    config
        Run configuration.
    models
        Loaded models (see :func:`load_models`).
    pool
        Post-processing process pool; ``None`` post-processes in this process.

    Returns
    -------
    SlideOutcome
        ``succeeded`` or ``skipped``; failures raise.

    Raises
    ------
    SlidestreamError
        Unreadable slide, missing µm/px, no tissue, ...
    """
    from slidestream.overlays import (
        UNCLASSIFIED,
        rebatch_tables,
        render_overlay_png,
        write_nuclei_geojson,
        write_tissue_geojson,
    )
    from slidestream.tiling import detect_tissue
    from slidestream.wsi import open_slide

    t_start = time.perf_counter()
    started_at = datetime.now(UTC).isoformat()
    timings: dict[str, float] = {}
    readers, post_workers = _worker_counts(config, models)
    with open_slide(path, mpp=config.mpp_override) as slide:
        slide_out = config.out_dir / slide.name
        params_hash = config.parameters_hash(models.hashes())
        previous = read_summary(slide_out)
        if (
            not config.force
            and previous is not None
            and previous.get("slide", {}).get("fingerprint") == slide.fingerprint
            and previous.get("provenance", {}).get("parameters_hash") == params_hash
        ):
            logger.info("%s: results up to date, skipped (use --force to redo)", path)
            return SlideOutcome(path=path, status="skipped", summary=previous)

        stage = staging_dir(config.out_dir, slide.name)
        t0 = time.perf_counter()
        mask = detect_tissue(
            slide,
            mask_mpp=config.tissue_mask_mpp,
            min_tissue_area_um2=config.min_tissue_area_um2,
        )
        if not mask.mask.any():
            raise NoTissueError(
                f"{path}: no tissue detected (mask at {mask.mpp:.1f} µm/px is empty); "
                "check that the slide holds stained tissue on a bright background"
            )
        mask.to_png(stage / OUTPUT_NAMES["tissue_mask_png"])
        timings["tissue_detection"] = time.perf_counter() - t0

        # The nucleus readers start now and read ahead while tissue is classified.
        nucleus_stream = _nucleus_stream(slide, mask, models, config, readers)
        nucleus_stream[1].start()
        t0 = time.perf_counter()
        regions, class_area_mm2, stain_gains = _tissue_pass(slide, mask, models, config, readers)
        timings["tissue_classification"] = time.perf_counter() - t0
        class_names = tuple(models.tissue.spec.class_names)
        class_polygons = _clip_to_tissue(regions.polygons(), mask)
        class_colors = dict(zip(class_names, models.tissue.spec.colors, strict=True))
        write_tissue_geojson(
            stage / OUTPUT_NAMES["tissue_geojson"],
            class_polygons,
            class_colors=class_colors,
            mpp=float(slide.mpp),
            id_namespace=slide.fingerprint,
        )

        t0 = time.perf_counter()
        stats = StatisticsAccumulator((*class_names, UNCLASSIFIED))
        centroids: list[npt.NDArray[np.float64]] = []
        truncated = 0

        def classified() -> Iterator[Any]:
            nonlocal truncated
            tile_tables = _nucleus_tables(
                slide,
                nucleus_stream,
                models,
                pool,
                max_pending=4 * max(1, post_workers),
                show_progress=config.show_progress,
                batch_size=config.batch_size,
            )
            for table in rebatch_tables(tile_tables, _NUCLEI_PER_BLOCK):
                names, index = regions.assign(table.centroid_x, table.centroid_y)
                table = table.with_classes(names)
                stats.add(
                    area_um2=table.measurements["area_um2"],
                    hematoxylin_od=table.measurements["hematoxylin_od"],
                    class_index=index,
                )
                centroids.append(np.stack([table.centroid_x, table.centroid_y], axis=1))
                truncated += table.truncated
                yield table

        n_written = write_nuclei_geojson(
            stage / OUTPUT_NAMES["nuclei_geojson"],
            classified(),
            id_namespace=slide.fingerprint,
            as_points=config.nuclei_as == "points",
            class_colors=class_colors,
            parquet_path=stage / OUTPUT_NAMES["nuclei_parquet"],
        )
        timings["nuclei"] = time.perf_counter() - t0
        if truncated:
            logger.warning(
                "%s: %d nuclei touched a tile border (halo %.1f µm may be too small)",
                path,
                truncated,
                config.nucleus_halo_um,
            )

        t0 = time.perf_counter()
        thumb = slide.get_thumbnail((2048, 2048))
        render_overlay_png(
            stage / OUTPUT_NAMES["overlay_png"],
            thumb,
            thumb_l0_scale=thumb.shape[1] / slide.dimensions[0],
            class_polygons=class_polygons,
            class_colors=class_colors,
            nucleus_centroids_l0=(
                np.concatenate(centroids) if centroids else np.zeros((0, 2), dtype=np.float64)
            ),
            slide_mpp=float(slide.mpp),
        )
        timings["overlay"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start

        statistics = stats.result(
            tissue_area_mm2=float(mask.tissue_area_mm2), class_area_mm2=class_area_mm2
        )
        unclassified = statistics["classes"][UNCLASSIFIED]
        if unclassified["nucleus_count"] == 0 and unclassified["area_mm2"] == 0.0:
            del statistics["classes"][UNCLASSIFIED]
        if statistics["nucleus_count"] != n_written:
            raise SlidestreamError(
                f"{path}: internal error, {n_written} nuclei written but "
                f"{statistics['nucleus_count']} measured; please report this"
            )
        summary = {
            "schema": SUMMARY_SCHEMA,
            "slide": _slide_block(slide, path),
            "statistics": statistics,
            "provenance": {
                "software_version": __version__,
                "models": models.provenance(),
                "parameters": config.result_parameters(),
                "run_options": config.all_parameters(),
                "parameters_hash": params_hash,
                "device": models.device,
                "workers": {"readers": readers, "postprocess": post_workers},
                "timings_s": timings,
                "tissue_mask_mpp": float(mask.mpp),
                "tissue_stain_gains": stain_gains,
                "truncated_nuclei": truncated,
                "started_at": started_at,
                "finished_at": datetime.now(UTC).isoformat(),
            },
            "outputs": dict(OUTPUT_NAMES),
        }

        write_json_atomic(stage / SUMMARY_NAME, summary)
        publish(stage, slide_out)
    return SlideOutcome(
        path=path, status="succeeded", summary=summary, seconds=time.perf_counter() - t_start
    )


def analyse_guarded(
    path: Path,
    config: RunConfig,
    models: LoadedModels,
    *,
    pool: ProcessPoolExecutor | None = None,
) -> SlideOutcome:
    """:func:`analyse_slide`, with a failure turned into a ``failed`` outcome (one-line reason).

    Library errors (unreadable slide, no µm/px, no tissue, ...) and I/O errors fail the slide,
    not the batch; the traceback goes to the debug log.
    """
    t0 = time.perf_counter()
    try:
        return analyse_slide(path, config, models, pool=pool)
    except SlidestreamError as exc:
        logger.error("%s", exc)
        logger.debug("traceback of the failure", exc_info=True)
        error = str(exc)
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        logger.exception("%s: unexpected failure", path)
        error = f"{path}: {type(exc).__name__}: {exc}"
    return SlideOutcome(path=path, status="failed", error=error, seconds=time.perf_counter() - t0)


def write_failures(out_dir: Path, failures: Sequence[SlideOutcome]) -> None:
    path = out_dir / "failures.csv"
    if not failures:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(".failures.csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "error", "time"])
        now = datetime.now(UTC).isoformat()
        for f in failures:
            writer.writerow([str(f.path), f.error or "", now])
    tmp.replace(path)


def record_outcome(config: RunConfig, outcome: SlideOutcome, models: LoadedModels | None) -> None:
    """Record one slide's outcome in the statistics database (main process only)."""
    if config.db_url is None:
        return
    from slidestream.db import connect, record_failure, record_run
    from slidestream.wsi import slide_name

    engine = connect(config.db_url, create=True)
    try:
        if outcome.status == "succeeded" and outcome.summary is not None:
            record_run(engine, outcome.summary)
        elif outcome.status == "failed":
            record_failure(
                engine,
                slide_path=str(outcome.path),
                slide_name=slide_name(outcome.path),
                fingerprint=None,
                error=outcome.error or "",
                parameters=config.result_parameters(),
                parameters_hash=config.parameters_hash(models.hashes() if models else {}),
                software_version=__version__,
            )
    finally:
        engine.dispose()


def run_batch(inputs: Sequence[Path], config: RunConfig) -> list[SlideOutcome]:
    """Analyse every slide of ``inputs``; a failing slide is recorded and the batch goes on.

    Parameters
    ----------
    inputs
        Slide files, folders and manifest CSVs (see :func:`slidestream.inputs.discover_slides`).
    config
        Run configuration.

    Returns
    -------
    list of SlideOutcome
        One per slide, in input order. Failures are also written to ``out_dir/failures.csv``.
    """

    slides = discover_slides(inputs)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    models = load_models(config)
    readers, post_workers = _worker_counts(config, models)
    logger.info(
        "%d slide(s); device %s, %d reader(s), %d post-processing worker(s)",
        len(slides),
        models.device,
        readers,
        post_workers,
    )
    pool = postprocess_pool(post_workers)
    outcomes: list[SlideOutcome] = []
    bar: Any = None
    if config.show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(slides), desc="slides", unit="slide", position=0)
    try:
        for path in slides:
            outcome = analyse_guarded(path, config, models, pool=pool)
            outcomes.append(outcome)
            if outcome.status != "skipped":
                record_outcome(config, outcome, models)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        write_failures(config.out_dir, [o for o in outcomes if o.status == "failed"])
    return outcomes
