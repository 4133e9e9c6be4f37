"""Streaming planned tiles through a torch ``Dataset``/``DataLoader``.

The dataset holds only the slide path and plain arrays (tile indices and level-0 corners), so it
pickles cheaply; the slide is opened lazily on first use in each process and cached per PID, which
works with ``num_workers=0`` and with worker processes started by fork or spawn (a forked worker
never reuses its parent's handle).

The loader's unit of work is a whole batch, not a tile: a worker reads the batch's tiles straight
into one channels-last ``(N, H, W, 3)`` uint8 array in shared memory, so the batch crosses the
process boundary without a copy (no per-tile tensors, no ``torch.stack``, no re-sharing).
:class:`TileBatch` exposes it as ``(N, 3, H, W)`` through a zero-copy ``permute`` view. That
array is one of a few batch slots per worker, set up once per pass and reused
(:mod:`._batch_slots`): only the slot number crosses, and a slot is refilled only after the
caller has dropped every view of the batch in it. A worker allocates a fresh shared batch only
when all its slots are still held (a caller keeping many batches).

Where a process may not start children (a daemonic process, such as a Dask worker run by its
nanny), ``make_loader(..., workers_as="threads")`` reads the same batches, in the same order, on
background threads of this process instead; each thread opens its own slide handle.

Read errors never cross the process boundary as raw tracebacks: the loader's workers turn a
:class:`~slidestream.errors.SlidestreamError` into a small failure record, and the main process
re-raises it as a one-line :class:`~slidestream.errors.SlideReadError` naming the file and region.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import numpy.typing as npt

from slidestream.errors import ConfigError, SlideReadError, SlidestreamError

from ._batch_slots import BatchSlots, SlotFilled, SlotsHandle, give_back, take_slot
from ._grid import TileSpec, tiles_as_arrays
from ._protocols import SlideLike

if TYPE_CHECKING:
    import torch

__all__ = ["ReaderKind", "SlideOpener", "TileBatch", "TileDataset", "TileLoader", "make_loader"]

logger = logging.getLogger(__name__)

#: Opens a slide from ``(path, mpp_override)``; must be a module-level function to pickle.
SlideOpener = Callable[[Path, float | None], SlideLike]

ReaderKind = Literal["processes", "threads"]
"""How a loader's readers run: DataLoader worker processes, or threads of this process."""

#: Seconds a reader thread or the consumer waits on a queue before checking for a stop.
_POLL_S = 0.2

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

    def _is_native(self, slide: SlideLike) -> bool:
        return abs(self.tile_mpp / slide.mpp - 1.0) <= _NATIVE_TOLERANCE

    def _read(
        self, slide: SlideLike, i: int, l0_x: float, l0_y: float, native: bool
    ) -> npt.NDArray[np.uint8]:
        size = (self.tile_size_px, self.tile_size_px)
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

    def read_tile(self, i: int) -> npt.NDArray[np.uint8]:
        """Pixels of the ``i``-th tile as uint8 ``(H, W, 3)`` at ``tile_mpp``.

        Raises
        ------
        SlideReadError
            When the region cannot be read; the message names the file and the region.
        """
        slide = self._get_slide()
        l0_x, l0_y = self.l0_xy[i].tolist()
        return self._read(slide, i, l0_x, l0_y, self._is_native(slide))

    def read_tiles_into(self, start: int, out: npt.NDArray[np.uint8]) -> None:
        """Read tiles ``start .. start + len(out) - 1`` into ``out``.

        Parameters
        ----------
        start
            Position (not ``TileSpec.index``) of the first tile in this dataset.
        out
            uint8 ``(N, tile_size_px, tile_size_px, 3)``, channels last; tile ``start + k`` is
            written to ``out[k]``. At native resolution each tile is one level-0
            ``read_region`` copied once into ``out`` (no resampling).

        Raises
        ------
        SlideReadError
            When a region cannot be read; the message names the file and the region.
        ConfigError
            When ``out`` has the wrong shape or dtype, or the range runs past the dataset.
        """
        count = int(out.shape[0]) if out.ndim == 4 else -1
        expected = (count, self.tile_size_px, self.tile_size_px, 3)
        if out.shape != expected or out.dtype != np.uint8:
            raise ConfigError(
                f"read_tiles_into: out is {out.dtype} {out.shape}; expected uint8 (N, "
                f"{self.tile_size_px}, {self.tile_size_px}, 3)"
            )
        if start < 0 or start + count > len(self):
            raise ConfigError(
                f"read_tiles_into: tiles {start}..{start + count - 1} outside 0..{len(self) - 1}"
            )
        slide = self._get_slide()
        native = self._is_native(slide)
        read = self._read
        for k, (l0_x, l0_y) in enumerate(self.l0_xy[start : start + count].tolist()):
            out[k] = read(slide, start + k, l0_x, l0_y, native)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """``(image, index)``: uint8 ``(3, H, W)`` (a channels-first view of the read array)."""
        import torch

        rgb = self.read_tile(i)
        return torch.from_numpy(rgb).permute(2, 0, 1), int(self.indices[i])


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class TileBatch:
    """One batch of tiles.

    Parameters
    ----------
    images
        uint8 ``(N, 3, H, W)`` on the loader's device. This is a zero-copy ``permute`` view of a
        contiguous channels-last ``(N, H, W, 3)`` array (``images.is_contiguous(memory_format=
        torch.channels_last)`` holds), so ``images.permute(0, 2, 3, 1)`` is contiguous again.
        Models accept it as is; call ``.contiguous()`` if plain NCHW strides are needed.
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


class _BatchedTiles:
    """Batch ``b`` of a :class:`TileDataset` as one ``(b, images (N, H, W, 3))`` item.

    Inside a loader worker the images go to one of the worker's shared batch slots when
    ``slots`` is set (the item is then a :class:`SlotFilled`, the slot number), else to a new
    shared-memory storage, so sending them to the main process passes a slot number or a handle,
    never the pixels. Read errors travel back as :class:`_Failure` data.
    """

    def __init__(self, dataset: TileDataset, batch_size: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.slots: SlotsHandle | None = None
        """The pass's batch slots, set while the workers start (they keep their copy)."""

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __getitem__(self, b: int) -> tuple[int, torch.Tensor] | SlotFilled | _Failure:
        import torch
        from torch.utils.data import get_worker_info

        start = b * self.batch_size
        count = min(len(self.dataset), start + self.batch_size) - start
        if b < 0 or count <= 0:
            raise IndexError(f"batch {b} outside 0..{len(self) - 1}")
        size = self.dataset.tile_size_px
        shape = (count, size, size, 3)
        worker = get_worker_info()
        if worker is not None and self.slots is not None:
            taken = take_slot(self.slots, worker.id, count)
            if taken is not None:
                slot, pixels = taken
                try:
                    self.dataset.read_tiles_into(start, pixels)
                except BaseException as exc:
                    give_back(self.slots, slot)
                    if isinstance(exc, SlidestreamError):
                        return _Failure(str(exc))
                    raise
                return SlotFilled(self.slots.ring_id, b, slot, count)
        if worker is not None:
            # Allocated in shared memory up front (as torch's default_collate does): sending it
            # to the main process then shares a handle instead of copying the pixels.
            new_shared = cast(
                "Callable[[int], torch.UntypedStorage]", torch.UntypedStorage._new_shared
            )
            storage = new_shared(count * size * size * 3)
            strides = (size * size * 3, size * 3, 3, 1)
            images = torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape, strides)
        else:
            images = torch.empty(shape, dtype=torch.uint8)
        try:
            self.dataset.read_tiles_into(start, images.numpy())
        except SlidestreamError as exc:
            return _Failure(str(exc))
        return b, images


class _ThreadedBatches:
    """The items of :class:`_BatchedTiles`, read ahead by ``threads`` threads, in batch order.

    Thread ``k`` reads batches ``k, k + threads, ...`` with its own copy of the dataset (its own
    slide handle: a slide's decoded-tile cache is not thread-safe) into its own queue of
    ``prefetch_factor`` batches; iterating takes batch ``b`` from queue ``b % threads``. Each
    ``iter()`` starts a fresh set of threads, which stop when the iterator is exhausted, closed or
    garbage collected.
    """

    def __init__(
        self, dataset: TileDataset, batch_size: int, threads: int, prefetch_factor: int
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.threads = threads
        self.prefetch_factor = prefetch_factor

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> _ThreadedIterator:
        return _ThreadedIterator(self)


class _ThreadedIterator:
    """One pass of :class:`_ThreadedBatches` (see there)."""

    def __init__(self, source: _ThreadedBatches) -> None:
        self._n_batches = len(source)
        n_threads = max(1, min(source.threads, self._n_batches))
        self._stop = threading.Event()
        self._queues: list[queue.Queue[Any]] = [
            queue.Queue(maxsize=source.prefetch_factor) for _ in range(n_threads)
        ]
        self._next = 0
        self._threads = [
            threading.Thread(
                target=_read_batches,
                args=(
                    _BatchedTiles(copy.copy(source.dataset), source.batch_size),
                    range(k, self._n_batches, n_threads),
                    self._queues[k],
                    self._stop,
                ),
                name=f"tile-reader-{k}",
                daemon=True,
            )
            for k in range(n_threads)
        ]
        for thread in self._threads:
            thread.start()
        self._finalizer = weakref.finalize(self, self._stop.set)

    def __iter__(self) -> _ThreadedIterator:
        return self

    def __next__(self) -> Any:
        b = self._next
        if b >= self._n_batches:
            self.close()
            raise StopIteration
        q = self._queues[b % len(self._queues)]
        while True:
            try:
                item = q.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if self._stop.is_set():
                    raise StopIteration from None
        self._next = b + 1
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stop the reader threads and wait for them (idempotent)."""
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()


def _read_batches(
    batches: _BatchedTiles, which: range, out: queue.Queue[Any], stop: threading.Event
) -> None:
    """Reader thread: put ``batches[b]`` for each ``b`` of ``which`` into ``out``, in order."""
    try:
        for b in which:
            item: Any
            try:
                item = batches[b]
            except Exception as exc:  # re-raised by the consumer, in its thread
                item = exc
            while not stop.is_set():
                try:
                    out.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if stop.is_set() or isinstance(item, BaseException):
                return
    finally:
        batches.dataset.close()


def _identity(item: Any) -> Any:
    return item


def _worker_init(worker_id: int) -> None:
    import torch

    # One thread per worker: the workers are the parallelism (no intra-op oversubscription).
    # Not cv2.setNumThreads: in a forked child of a process whose OpenCV pool has run (e.g. after
    # tissue detection) it deadlocks tearing the inherited pool down.
    torch.set_num_threads(1)


def _start_readers(loader: Any) -> Iterator[Any]:
    """``iter(loader)`` (which starts the reader processes) with SIGINT and SIGTERM held back.

    An interrupt in the middle of a reader's start would leave a process the caller does not
    know yet, which then fails on the queues the unwinding caller frees (a stray traceback).
    Held back, a signal is re-raised as soon as every reader is started (and known, so it can
    be stopped). Python handlers run in the main thread whichever thread the kernel picks, so
    the signals are held back by swapping the handlers, not by a thread's signal mask.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return iter(loader)
    pending: list[int] = []

    def hold(signum: int, frame: object) -> None:
        pending.append(signum)

    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, hold) for sig in held}
    try:
        return iter(loader)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


class TileLoader:
    """Iterable of :class:`TileBatch` over a :class:`TileDataset` (see :func:`make_loader`)."""

    def __init__(
        self,
        loader: Any,
        device: torch.device,
        dataset: TileDataset,
        batch_size: int,
        *,
        slots_per_reader: int = 0,
    ) -> None:
        self._loader = loader
        self.device = device
        self.dataset = dataset
        self._batch_size = batch_size
        self._slots_per_reader = slots_per_reader
        self._started: tuple[Iterator[Any], BatchSlots | None] | None = None

    def start(self) -> TileLoader:
        """Start the readers and their read-ahead now, before the first iteration.

        Lets a caller overlap the readers' start-up and first reads with other work (e.g. the
        tissue pass before the nucleus pass). The next iteration consumes what was started.
        """
        if self._started is None:
            self._started = self._start_pass()
        return self

    def _start_pass(self) -> tuple[Iterator[Any], BatchSlots | None]:
        """Start one pass's readers, with the pass's batch slots when they are worker processes."""
        batched = getattr(self._loader, "dataset", None)
        workers = int(getattr(self._loader, "num_workers", 0))
        if not isinstance(batched, _BatchedTiles) or workers < 1 or self._slots_per_reader < 1:
            return _start_readers(self._loader), None
        size = self.dataset.tile_size_px
        slots = BatchSlots.create(
            readers=workers,
            per_reader=self._slots_per_reader,
            batch_shape=(max(1, min(self._batch_size, len(self.dataset))), size, size, 3),
        )
        batched.slots = None if slots is None else slots.handle
        try:
            # The workers get their copy of `batched` (pickled or forked) as they start.
            return _start_readers(self._loader), slots
        except BaseException:
            if slots is not None:
                slots.close()
            raise
        finally:
            batched.slots = None

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[TileBatch]:
        import torch

        non_blocking = self.device.type == "cuda"
        batch_size = self._batch_size
        indices = torch.from_numpy(self.dataset.indices)
        l0_xy = torch.from_numpy(self.dataset.l0_xy)
        source, self._started = self._started, None
        batches, slots = source if source is not None else self._start_pass()
        try:
            for expected, item in enumerate(batches):
                if isinstance(item, _Failure):
                    raise SlideReadError(item.message)
                if isinstance(item, SlotFilled):
                    if slots is None:  # a slot of a ring this pass does not have: a bug
                        raise RuntimeError(f"tile loader: batch {item.batch} from unknown slots")
                    b = item.batch
                    # A view of the slot; the slot is reused once every view of it is dropped.
                    images = torch.from_numpy(slots.lease(item))
                    copy_async = False  # pageable: the slot must be read before it is released
                else:
                    b, images = item
                    copy_async = non_blocking  # pinned by the DataLoader
                if b != expected:  # the loader is sequential; anything else is a bug
                    raise RuntimeError(f"tile loader: got batch {b}, expected batch {expected}")
                if images.device != self.device:
                    images = images.to(self.device, non_blocking=copy_async)
                start = b * batch_size
                stop = start + int(images.shape[0])
                yield TileBatch(
                    images=images.permute(0, 3, 1, 2),
                    indices=indices[start:stop].clone(),
                    l0_xy=l0_xy[start:stop].clone(),
                )
        finally:
            if isinstance(batches, _ThreadedIterator):
                batches.close()  # stop the reader threads now, even if the pass was abandoned
            # The last reference to the DataLoader's iterator: dropping it stops its workers.
            del batches, source
            if slots is not None:
                slots.close()  # batches still held by the caller stay readable


def make_loader(
    dataset: TileDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: str | torch.device = "cpu",
    prefetch_factor: int = 2,
    multiprocessing_context: str | None = None,
    workers_as: ReaderKind = "processes",
    shared_slots_per_reader: int | None = None,
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
    workers_as
        ``"processes"`` (DataLoader workers) or ``"threads"``: ``num_workers`` threads of this
        process, for a process that may not start children (daemonic); same batches, same order.
    shared_slots_per_reader
        Reusable shared-memory batch slots per worker process (one pass's file of
        ``num_workers * shared_slots_per_reader`` batches on ``/dev/shm``, reserved when the pass
        starts). None: ``prefetch_factor + 2`` (the batches in flight, the one the caller is
        using and one more). 0: a new shared-memory batch per batch, as before slots (1.3-1.4
        times slower on 2 cores, ``bench/stream.py --compare``). A worker whose slots are all
        held allocates a new batch too, so keeping batches is always safe.

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
    if shared_slots_per_reader is not None and shared_slots_per_reader < 0:
        raise ConfigError(
            f"make_loader: shared_slots_per_reader={shared_slots_per_reader!r}; expected >= 0"
            " or None"
        )
    if workers_as not in ("processes", "threads"):
        raise ConfigError(
            f"make_loader: workers_as={workers_as!r}; expected 'processes' or 'threads'"
        )
    target = torch.device(device)
    if workers_as == "threads" and num_workers > 0:
        threaded = _ThreadedBatches(dataset, batch_size, num_workers, prefetch_factor)
        return TileLoader(threaded, target, dataset, batch_size)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {
            "prefetch_factor": prefetch_factor,
            "worker_init_fn": _worker_init,
            "multiprocessing_context": multiprocessing_context,
        }
    # batch_size=None: each dataset item is already a whole batch, read by one worker.
    loader: DataLoader[Any] = DataLoader(
        _BatchedTiles(dataset, batch_size),  # type: ignore[arg-type]
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=target.type == "cuda",
        **extra,
    )
    slots = prefetch_factor + 2 if shared_slots_per_reader is None else shared_slots_per_reader
    return TileLoader(loader, target, dataset, batch_size, slots_per_reader=slots)
