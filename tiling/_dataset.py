"""Streaming planned tiles through a torch ``Dataset``/``DataLoader``.

The dataset holds only the slide path and plain arrays (tile indices and level-0 corners), so it
pickles cheaply; the slide is opened lazily on first use in each process and cached per PID, which
works with ``num_workers=0`` and with worker processes started by fork or spawn (a forked worker
never reuses its parent's handle).

Read errors never cross the process boundary as raw tracebacks: the loader's workers turn a
:class:`~slidestream.errors.SlidestreamError` into a small failure record, and the main process
re-raises it as a one-line :class:`~slidestream.errors.SlideReadError` naming the file and region.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from slidestream.errors import ConfigError, SlideReadError, SlidestreamError

from ._grid import TileSpec, tiles_as_arrays
from ._protocols import SlideLike

if TYPE_CHECKING:
    import torch

__all__ = ["SlideOpener", "TileBatch", "TileDataset", "TileLoader", "make_loader"]

logger = logging.getLogger(__name__)

#: Opens a slide from ``(path, mpp_override)``; must be a module-level function to pickle.
SlideOpener = Callable[[Path, float | None], SlideLike]

#: Tile µm/px within this relative distance of the slide's µm/px is read at level 0 unresampled.
_NATIVE_TOLERANCE = 0.01


def _open_with_wsi(path: Path, mpp: float | None) -> SlideLike:
    from slidestream.wsi import open_slide

    slide: SlideLike = open_slide(path, mpp=mpp)
    return slide


class TileDataset:
    """A map-style torch dataset of the tiles of one slide.

    Parameters
    ----------
    slide_path
        The slide file (or DICOM folder).
    tiles
        Planned tiles (e.g. a :class:`~slidestream.tiling.TileGrid`).
    tile_mpp
        Resolution of the tiles in µm/px.
    tile_size_px
        Tile edge in target px.
    slide_mpp
        Override of the slide's own level-0 µm/px (``--mpp``); None uses the file's.
    opener
        Function opening the slide, ``(path, mpp) -> SlideLike``; defaults to
        :func:`slidestream.wsi.open_slide`. Must be picklable (module level) for spawn workers.

    Notes
    -----
    ``dataset[i]`` returns ``(image, index)``: uint8 tensor ``(3, tile_size_px, tile_size_px)``
    and the tile's ``index`` (int). The read is ``slide.read_region`` at level 0 when
    ``tile_mpp`` equals the slide's µm/px within 1 % (no resampling), else
    ``slide.read_at_mpp``.
    """

    def __init__(
        self,
        slide_path: str | Path,
        tiles: Sequence[TileSpec],
        *,
        tile_mpp: float,
        tile_size_px: int,
        slide_mpp: float | None = None,
        opener: SlideOpener | None = None,
    ) -> None:
        if not (math.isfinite(tile_mpp) and tile_mpp > 0):
            raise ConfigError(f"TileDataset: tile_mpp={tile_mpp!r}; expected µm/px > 0")
        if tile_size_px < 1:
            raise ConfigError(f"TileDataset: tile_size_px={tile_size_px!r}; expected >= 1")
        if slide_mpp is not None and not (math.isfinite(slide_mpp) and slide_mpp > 0):
            raise ConfigError(f"TileDataset: slide_mpp={slide_mpp!r}; expected µm/px > 0 or None")
        self.slide_path = Path(slide_path)
        self.tile_mpp = float(tile_mpp)
        self.tile_size_px = int(tile_size_px)
        self.slide_mpp = slide_mpp
        self.opener: SlideOpener = opener if opener is not None else _open_with_wsi
        arrays = tiles_as_arrays(tiles)
        self.indices: npt.NDArray[np.int64] = arrays["index"].astype(np.int64)
        self.l0_xy: npt.NDArray[np.float64] = np.stack(
            [arrays["l0_x"], arrays["l0_y"]], axis=1
        ).astype(np.float64)
        self._slide: SlideLike | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _get_slide(self) -> SlideLike:
        pid = os.getpid()
        if self._slide is None or self._pid != pid:
            # Never close a handle inherited through fork: it belongs to the parent.
            self._slide = self.opener(self.slide_path, self.slide_mpp)
            self._pid = pid
            logger.debug("opened %s in process %d", self.slide_path, pid)
        return self._slide

    def close(self) -> None:
        """Close this process's slide handle (idempotent)."""
        slide, self._slide = self._slide, None
        if slide is not None and self._pid == os.getpid():
            close = getattr(slide, "close", None)
            if callable(close):
                close()
        self._pid = None

    def read_tile(self, i: int) -> npt.NDArray[np.uint8]:
        """Pixels of the ``i``-th tile as uint8 ``(H, W, 3)`` at ``tile_mpp``.

        Raises
        ------
        SlideReadError
            When the region cannot be read; the message names the file and the region.
        """
        slide = self._get_slide()
        l0_x, l0_y = (float(v) for v in self.l0_xy[i])
        size = (self.tile_size_px, self.tile_size_px)
        native = abs(self.tile_mpp / slide.mpp - 1.0) <= _NATIVE_TOLERANCE
        try:
            if native:
                rgb = slide.read_region((round(l0_x), round(l0_y)), size, level=0)
            else:
                rgb = slide.read_at_mpp((l0_x, l0_y), size, self.tile_mpp)
        except SlidestreamError as exc:
            raise SlideReadError(
                f"{self.slide_path}: cannot read tile {int(self.indices[i])} (level-0 x={l0_x:.1f},"
                f" y={l0_y:.1f}, {size[0]}x{size[1]} px at {self.tile_mpp} µm/px): {exc}"
            ) from exc
        if rgb.shape != (size[1], size[0], 3) or rgb.dtype != np.uint8:
            raise SlideReadError(
                f"{self.slide_path}: reader returned {rgb.dtype} {rgb.shape} for tile "
                f"{int(self.indices[i])}; expected uint8 {(size[1], size[0], 3)}"
            )
        return rgb

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import torch

        rgb = self.read_tile(i)
        image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        return image, int(self.indices[i])


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class TileBatch:
    """One batch of tiles.

    Parameters
    ----------
    images
        uint8 ``(N, 3, H, W)`` on the loader's device.
    indices
        int64 ``(N,)`` tile indices (``TileSpec.index``), on the CPU.
    l0_xy
        float64 ``(N, 2)`` level-0 ``(x, y)`` of each tile's top-left (halo included), on the CPU.
    """

    images: torch.Tensor
    indices: torch.Tensor
    l0_xy: torch.Tensor


@dataclass(frozen=True, slots=True)
class _Failure:
    message: str


class _GuardedDataset:
    """Wraps a :class:`TileDataset` so that read errors travel back as data, not tracebacks."""

    def __init__(self, dataset: TileDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, npt.NDArray[np.float64]] | _Failure:
        try:
            image, index = self.dataset[i]
        except SlidestreamError as exc:
            return _Failure(str(exc))
        return image, index, self.dataset.l0_xy[i]


def _collate(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | _Failure:
    import torch

    for item in items:
        if isinstance(item, _Failure):
            return item
    images = torch.stack([item[0] for item in items])
    indices = torch.tensor([item[1] for item in items], dtype=torch.int64)
    l0_xy = torch.from_numpy(np.stack([item[2] for item in items]).astype(np.float64))
    return images, indices, l0_xy


def _worker_init(worker_id: int) -> None:
    import torch

    # One thread per worker: the workers are the parallelism.
    torch.set_num_threads(1)


class TileLoader:
    """Iterable of :class:`TileBatch` over a :class:`TileDataset` (see :func:`make_loader`)."""

    def __init__(self, loader: Any, device: torch.device, dataset: TileDataset) -> None:
        self._loader = loader
        self.device = device
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[TileBatch]:
        non_blocking = self.device.type == "cuda"
        for item in self._loader:
            if isinstance(item, _Failure):
                raise SlideReadError(item.message)
            images, indices, l0_xy = item
            if images.device != self.device:
                images = images.to(self.device, non_blocking=non_blocking)
            yield TileBatch(images=images, indices=indices, l0_xy=l0_xy)


def make_loader(
    dataset: TileDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: str | torch.device = "cpu",
    prefetch_factor: int = 2,
    multiprocessing_context: str | None = None,
) -> TileLoader:
    """Stream ``dataset`` in batches, in order, with a bounded prefetch queue.

    Parameters
    ----------
    dataset
        The tiles to read.
    batch_size
        Tiles per batch (the last batch may be smaller).
    num_workers
        Reader processes; 0 reads in the calling process.
    device
        Where the images go; for CUDA the batches are pinned and copied with
        ``non_blocking=True``.
    prefetch_factor
        Batches each worker reads ahead (at most ``num_workers * prefetch_factor`` batches are in
        flight, so memory does not grow with the slide).
    multiprocessing_context
        ``"fork"``, ``"spawn"``, ``"forkserver"`` or None (the platform default).

    Returns
    -------
    TileLoader
        Iterable of :class:`TileBatch`, in tile order.

    Raises
    ------
    ConfigError
        For non-positive ``batch_size``/``prefetch_factor`` or negative ``num_workers``.
    SlideReadError
        While iterating, when a tile cannot be read (the message names the file and region).
    """
    import torch
    from torch.utils.data import DataLoader

    if batch_size < 1:
        raise ConfigError(f"make_loader: batch_size={batch_size!r}; expected >= 1")
    if num_workers < 0:
        raise ConfigError(f"make_loader: num_workers={num_workers!r}; expected >= 0")
    if prefetch_factor < 1:
        raise ConfigError(f"make_loader: prefetch_factor={prefetch_factor!r}; expected >= 1")
    target = torch.device(device)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {
            "prefetch_factor": prefetch_factor,
            "worker_init_fn": _worker_init,
            "multiprocessing_context": multiprocessing_context,
        }
    loader: DataLoader[Any] = DataLoader(
        _GuardedDataset(dataset),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=target.type == "cuda",
        drop_last=False,
        **extra,
    )
    return TileLoader(loader, target, dataset)
