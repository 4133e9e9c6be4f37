"""Hand nucleus tiles to post-processing processes through shared memory instead of pipes.

Every nucleus tile sends its model maps (float32, ``(3, H, W)``: 3 MB for a 512 px tile) and its
RGB pixels to a worker process. Pickled through a ``ProcessPoolExecutor`` pipe, that costs the
main process about 9 ms of CPU per tile on a 2-core EPYC (``bench/pipeline_host.py``), half of its
work per mm² and the cap on a GPU run, where the main process feeds 10+ workers. A
:class:`TileRing` holds a fixed number of slots in one anonymous shared file (on ``/dev/shm``); the
main process copies a tile into a free slot and sends only a :class:`SlotRef`, and the worker
copies the tile out of its own mapping of the same file.

The file is unlinked from the start: workers open it as ``/proc/<main pid>/fd/<fd>``, so nothing
is left behind even if the main process is killed. Its space is reserved when it is created (in
the temporary folder when ``/dev/shm`` is too small). Where ``/proc/<pid>/fd`` does not exist (not
Linux) or no space can be reserved, :meth:`TileRing.put` returns ``None`` and the caller pickles
the tile as before.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

__all__ = ["SlotRef", "TileRing"]

_SHM_DIR = Path("/dev/shm")
_ALIGN = 64


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True, slots=True)
class SlotRef:
    """Where one tile lies in a :class:`TileRing` (small and picklable).

    Attributes
    ----------
    ring_id : str
        Unique id of the ring (a worker maps each ring once).
    path : str
        ``/proc/<pid>/fd/<fd>`` of the ring's file in the main process.
    offset : int
        Byte offset of the slot in the file.
    maps_shape, rgb_shape : tuple of int
        Shapes of the float32 maps and the uint8 RGB pixels ``(H, W, 3)``.
    rgb_planar : bool
        The pixels are stored channels-first ``(3, H, W)`` (see :meth:`TileRing.put`).
    """

    ring_id: str
    path: str
    offset: int
    maps_shape: tuple[int, ...]
    rgb_shape: tuple[int, ...]
    rgb_planar: bool = False

    def load(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
        """Copies of the slot's maps and ``(H, W, 3)`` RGB pixels (in a worker process)."""
        view = _mapping(self.ring_id, self.path)
        n_maps = int(np.prod(self.maps_shape)) * 4
        maps = np.frombuffer(view, np.float32, n_maps // 4, self.offset)
        rgb_at = self.offset + _aligned(n_maps)
        rgb = np.frombuffer(view, np.uint8, int(np.prod(self.rgb_shape)), rgb_at)
        pixels: npt.NDArray[np.uint8]
        if self.rgb_planar:
            h, w, c = self.rgb_shape
            pixels = rgb.reshape(c, h, w).transpose(1, 2, 0).copy()
        else:
            pixels = rgb.reshape(self.rgb_shape).copy()
        return maps.reshape(self.maps_shape).copy(), pixels


_MAPPED: dict[str, mmap.mmap] = {}


def _mapping(ring_id: str, path: str) -> mmap.mmap:
    """This process's mapping of ring ``ring_id`` (earlier rings' mappings are closed)."""
    mapped = _MAPPED.get(ring_id)
    if mapped is None:
        for old in _MAPPED.values():
            old.close()
        _MAPPED.clear()
        with Path(path).open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        _MAPPED[ring_id] = mapped
    return mapped


class TileRing:
    """``slots`` shared slots for (maps, RGB) tile pairs, allocated at the first :meth:`put`.

    Thread-safe: :meth:`release` may run in a Future's done-callback.

    Parameters
    ----------
    slots : int
        Tiles that may be in flight at once; :meth:`put` returns ``None`` when all are taken.
    """

    def __init__(self, slots: int) -> None:
        self._slots = max(1, int(slots))
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._file: IO[bytes] | None = None
        self._map: mmap.mmap | None = None
        self._path = ""
        self._id = uuid.uuid4().hex
        self._shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._slot_bytes = 0
        self._disabled = not Path(f"/proc/{os.getpid()}/fd").is_dir()

    def _allocate(self, maps_shape: tuple[int, ...], rgb_shape: tuple[int, ...]) -> bool:
        """Create the shared file; ``False`` (the ring stays off) where no space can be reserved.

        The space is reserved up front (``posix_fallocate``): a full tmpfs (Docker's default
        ``/dev/shm`` holds 64 MB) then fails here instead of raising SIGBUS on a later write.
        """
        n_maps = int(np.prod(maps_shape)) * 4
        slot_bytes = _aligned(n_maps) + _aligned(int(np.prod(rgb_shape)))
        size = slot_bytes * self._slots
        for folder in (_SHM_DIR if _SHM_DIR.is_dir() else None, None):
            # Unlinked at once; kept open until close() (workers open it through /proc).
            file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115
            try:
                os.posix_fallocate(file.fileno(), 0, size)
            except OSError:
                file.close()
                continue
            self._file, self._slot_bytes = file, slot_bytes
            self._map = mmap.mmap(file.fileno(), size)
            self._path = f"/proc/{os.getpid()}/fd/{file.fileno()}"
            self._shapes = (maps_shape, rgb_shape)
            self._free = list(range(self._slots))
            return True
        self._disabled = True
        return False

    def put(self, maps: npt.NDArray[Any], rgb: npt.NDArray[np.uint8]) -> SlotRef | None:
        """Copy a tile into a free slot; ``None`` (pickle it instead) if none fits or is free.

        Parameters
        ----------
        maps : ndarray, float32
            Model maps of the tile (any shape; the first tile fixes the slot layout).
        rgb : ndarray, uint8
            The tile's pixels ``(H, W, 3)``. A channels-last view of channels-first memory (what
            ``batch.permute(0, 2, 3, 1)`` gives) is stored channels-first, one plain copy, and
            the worker transposes it: the strided copy cost the main process 1.5 ms per 512 px
            tile, three quarters of its transfer work.
        """
        if self._disabled or maps.dtype != np.float32 or rgb.dtype != np.uint8:
            return None
        if self._shapes is None and not self._allocate(maps.shape, rgb.shape):
            return None
        if self._shapes != (maps.shape, rgb.shape):
            return None
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
        assert self._map is not None
        offset = slot * self._slot_bytes
        n_maps = maps.nbytes
        np.frombuffer(self._map, np.float32, maps.size, offset).reshape(maps.shape)[...] = maps
        rgb_at = offset + _aligned(n_maps)
        planar = rgb.ndim == 3 and rgb.transpose(2, 0, 1).flags.c_contiguous
        source = rgb.transpose(2, 0, 1) if planar else rgb
        np.frombuffer(self._map, np.uint8, rgb.size, rgb_at).reshape(source.shape)[...] = source
        return SlotRef(self._id, self._path, offset, maps.shape, rgb.shape, planar)

    def release(self, ref: SlotRef) -> None:
        """Free the slot of ``ref`` (its worker has finished with it)."""
        if ref.ring_id != self._id or not self._slot_bytes:
            return
        with self._lock:
            self._free.append(ref.offset // self._slot_bytes)

    def close(self) -> None:
        """Drop this process's mapping and file (workers keep theirs until the next ring)."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._disabled = True

    def __enter__(self) -> TileRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
