"""Reusable shared-memory batch slots for the tile loader's reader processes.

A reader process used to allocate a new torch shared-memory storage for every batch: on a 2-core
VM that cost about 1 ms to create and map, 5-9 ms of page faults writing the fresh pages
(6.3 MB for 32 tiles of 256 px), and a file-descriptor hand-over through the reader's
``resource_sharer`` thread plus a new mapping in the main process, per batch.
:class:`BatchSlots` instead lays out a fixed set of batch-sized slots in one shared file, mapped
(and faulted in) once per pass by the main process and by each reader. Reader ``k`` owns slots
``k * per_reader .. (k + 1) * per_reader - 1``; it fills a free one and sends back only the slot
number (:class:`SlotFilled`). The main process wraps the slot as an array without copying, and the
slot is free again only when the last view of that array (the batch, a tile, a tensor made from
it) has been garbage collected, so a batch the caller keeps is never overwritten.

Each slot has one status byte in the file's header: a reader sets it (free -> taken) before it
writes the pixels, and the main process clears it (taken -> free) when the batch's last view
dies. A reader never waits: with no free slot (the caller keeps more batches than the slots
hold) it allocates a batch as before.

The file is unlinked from the start (``tempfile.TemporaryFile`` on ``/dev/shm``): readers open it
as ``/proc/<main pid>/fd/<fd>`` and check its inode, so nothing can be left behind, even when a
process is killed; the memory is freed when the main process closes the file and the last
mapping goes. Its space is reserved when it is created (``posix_fallocate``: a full ``/dev/shm``
fails here, not with SIGBUS on a later write). Where that is impossible (no ``/proc/<pid>/fd``,
no room) :meth:`BatchSlots.create` returns ``None`` and the loader allocates per batch.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import tempfile
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

__all__ = ["BatchSlots", "SlotFilled", "SlotsHandle", "give_back", "take_slot"]

logger = logging.getLogger(__name__)

_SHM_DIR = Path("/dev/shm")
_PAGE = mmap.PAGESIZE
_FREE, _TAKEN = 0, 1


def _paged(nbytes: int) -> int:
    return -(-nbytes // _PAGE) * _PAGE


def _map(fileno: int, size: int) -> mmap.mmap:
    """A shared read-write mapping of ``size`` bytes, faulted in at once where Linux allows."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fileno, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotsHandle:
    """What a reader process needs to map a :class:`BatchSlots` (small and picklable)."""

    ring_id: str
    """Unique id of the slots' file (a reader maps each file once)."""
    path: str
    """``/proc/<main pid>/fd/<fd>`` of the file in the main process."""
    device: int
    """``st_dev`` of the file: a reader checks that the path still names it."""
    inode: int
    """``st_ino`` of the file."""
    per_reader: int
    """Slots each reader owns."""
    n_slots: int
    """Slots in all (``per_reader`` times the readers)."""
    slot_bytes: int
    """Bytes between the starts of two slots (page aligned)."""
    batch_shape: tuple[int, int, int, int]
    """``(batch_size, H, W, 3)`` of a full batch, uint8 channels last."""

    @property
    def header_bytes(self) -> int:
        """Bytes before the first slot (the status bytes, page aligned)."""
        return _paged(self.n_slots)

    @property
    def file_bytes(self) -> int:
        """Size of the file in bytes."""
        return self.header_bytes + self.n_slots * self.slot_bytes


@dataclass(frozen=True, slots=True)
class SlotFilled:
    """Batch ``batch`` was read into slot ``slot`` of ring ``ring_id`` (``count`` tiles)."""

    ring_id: str
    batch: int
    slot: int
    count: int


class BatchSlots:
    """The main process's side of the slots: the file, its mapping, and the leases.

    Use :meth:`create`; :meth:`close` (idempotent) closes the file when the pass ends. A batch
    leased by :meth:`lease` stays valid after :meth:`close`: the mapping lives as long as its
    last view.
    """

    def __init__(self, file: IO[bytes], handle: SlotsHandle, mapping: mmap.mmap) -> None:
        self._file: IO[bytes] | None = file
        self.handle = handle
        self._map = mapping
        self._status: npt.NDArray[np.uint8] = np.frombuffer(mapping, np.uint8, handle.n_slots, 0)

    @classmethod
    def create(
        cls, *, readers: int, per_reader: int, batch_shape: tuple[int, int, int, int]
    ) -> BatchSlots | None:
        """Slots for ``readers`` readers of ``per_reader`` batches of ``batch_shape`` each.

        Returns ``None`` where no such file can be shared (not Linux, no room on ``/dev/shm``);
        the loader then allocates each batch.
        """
        if readers < 1 or per_reader < 1 or not Path(f"/proc/{os.getpid()}/fd").is_dir():
            return None
        if not _SHM_DIR.is_dir():
            return None
        n_slots = readers * per_reader
        slot_bytes = _paged(int(np.prod(batch_shape)))
        size = _paged(n_slots) + n_slots * slot_bytes
        file = tempfile.TemporaryFile(dir=_SHM_DIR)  # noqa: SIM115 (closed by close())
        try:
            os.posix_fallocate(file.fileno(), 0, size)
            mapping = _map(file.fileno(), size)
        except OSError as exc:
            file.close()
            logger.debug("no shared batch slots (%d bytes on %s): %s", size, _SHM_DIR, exc)
            return None
        stat = os.fstat(file.fileno())
        handle = SlotsHandle(
            ring_id=uuid.uuid4().hex,
            path=f"/proc/{os.getpid()}/fd/{file.fileno()}",
            device=stat.st_dev,
            inode=stat.st_ino,
            per_reader=per_reader,
            n_slots=n_slots,
            slot_bytes=slot_bytes,
            batch_shape=batch_shape,
        )
        return cls(file, handle, mapping)

    def lease(self, filled: SlotFilled) -> npt.NDArray[np.uint8]:
        """The pixels of ``filled`` as uint8 ``(count, H, W, 3)``, a view of the slot (no copy).

        The slot is released when this array and every view of it are garbage collected.
        """
        handle = self.handle
        if filled.ring_id != handle.ring_id or not 0 <= filled.slot < handle.n_slots:
            raise RuntimeError(f"tile loader: batch {filled.batch} names an unknown slot")
        _, h, w, c = handle.batch_shape
        offset = handle.header_bytes + filled.slot * handle.slot_bytes
        pixels: npt.NDArray[np.uint8] = np.ndarray(
            (filled.count, h, w, c), np.uint8, buffer=self._map, offset=offset
        )
        # Views of `pixels` (and tensors made from them) keep `pixels` itself as their base.
        weakref.finalize(pixels, _release, self._status, filled.slot)
        return pixels

    def close(self) -> None:
        """Close the file (idempotent); leased batches stay readable until they are dropped."""
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def __enter__(self) -> BatchSlots:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release(status: npt.NDArray[np.uint8], slot: int) -> None:
    status[slot] = _FREE


# ------------------------------------------------------------------------- reader processes
_READER_MAPS: dict[str, tuple[int, mmap.mmap | None]] = {}
"""This process's mapping of each ring it has used (``None``: the ring cannot be opened)."""


def _reader_map(handle: SlotsHandle) -> mmap.mmap | None:
    pid = os.getpid()
    known = _READER_MAPS.get(handle.ring_id)
    if known is not None and known[0] == pid:
        return known[1]
    for owner, old in _READER_MAPS.values():  # an earlier pass's ring (or the parent's, forked)
        if old is not None and owner == pid:
            with contextlib.suppress(BufferError):  # a view is alive; the mapping goes with it
                old.close()
    _READER_MAPS.clear()
    mapping: mmap.mmap | None = None
    try:
        fd = os.open(handle.path, os.O_RDWR)
    except OSError as exc:
        logger.debug("batch slots %s cannot be opened: %s", handle.path, exc)
    else:
        try:
            stat = os.fstat(fd)
            if (stat.st_dev, stat.st_ino) == (handle.device, handle.inode):
                mapping = _map(fd, handle.file_bytes)
        except OSError as exc:
            logger.debug("batch slots %s cannot be mapped: %s", handle.path, exc)
        finally:
            os.close(fd)
    _READER_MAPS[handle.ring_id] = (pid, mapping)
    return mapping


def take_slot(
    handle: SlotsHandle, reader: int, count: int
) -> tuple[int, npt.NDArray[np.uint8]] | None:
    """In reader process ``reader``: a free slot of its own, marked taken, as ``(count, H, W, 3)``.

    Returns ``(slot, pixels)``, or ``None`` when every slot of the reader is in use (or the ring
    cannot be mapped here); the caller then allocates the batch itself. Call :func:`give_back`
    if the slot is not sent to the main process after all (a read error).
    """
    mapping = _reader_map(handle)
    if mapping is None or not 0 <= reader < handle.n_slots // handle.per_reader:
        return None
    status = np.frombuffer(mapping, np.uint8, handle.n_slots, 0)
    first = reader * handle.per_reader
    for slot in range(first, first + handle.per_reader):
        if status[slot] == _FREE:
            status[slot] = _TAKEN
            _, h, w, c = handle.batch_shape
            offset = handle.header_bytes + slot * handle.slot_bytes
            pixels = np.ndarray((count, h, w, c), np.uint8, buffer=mapping, offset=offset)
            return slot, pixels
    return None


def give_back(handle: SlotsHandle, slot: int) -> None:
    """In a reader process: free ``slot`` again (taken by :func:`take_slot`, never sent)."""
    mapping = _reader_map(handle)
    if mapping is not None:
        np.frombuffer(mapping, np.uint8, handle.n_slots, 0)[slot] = _FREE
