"""Reusable shared batch slots: reuse, held batches never overwritten, nothing leaked."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from slidestream.errors import SlideReadError
from slidestream.tiling import TileDataset, TilingConfig, make_loader, plan_tiles
from slidestream.tiling._batch_slots import BatchSlots, SlotFilled, give_back, take_slot

from .test_dataset import _open_corrupt

CFG = TilingConfig(tile_mpp=0.5, tile_size_px=96, overlap_px=16, min_tissue_fraction=0.0)

pytestmark = pytest.mark.skipif(
    not Path(f"/proc/{os.getpid()}/fd").is_dir() or not Path("/dev/shm").is_dir(),
    reason="shared batch slots need Linux /proc and /dev/shm",
)


def _dataset(slide_path: Path) -> TileDataset:
    from slidestream.wsi import open_slide

    with open_slide(slide_path) as slide:
        grid = plan_tiles(slide, CFG)
    return TileDataset(slide_path, grid.tiles, tile_mpp=CFG.tile_mpp, tile_size_px=96)


def _ours(name: str) -> bool:
    """Whether the /dev/shm name may be ours: not another live process's torch segment.

    ``/dev/shm`` is the machine's: PostgreSQL and other test runs create segments there too.
    torch names a segment ``torch_<creator pid>_...``: one whose creator is this process or
    a process that has exited (our readers) counts.
    """
    if name.startswith(("PostgreSQL.", "sem.")):  # not pixels (sem.*: any process's locks)
        return False
    parts = name.split("_")
    if parts[0] == "torch" and len(parts) > 1 and parts[1].isdigit():
        pid = int(parts[1])
        return pid == os.getpid() or not Path(f"/proc/{pid}").exists()
    return True


def _is_segment(target: str) -> bool:
    """A /dev/shm file holding pixels (not a multiprocessing semaphore, ``sem.*``)."""
    return target.startswith("/dev/shm/") and not target.startswith("/dev/shm/sem.")


def _shared_state() -> tuple[frozenset[str], int, int]:
    """Names in /dev/shm, this process's open fds and mappings of /dev/shm segments.

    Only segments count: a DataLoader's queues (pipes, semaphores) may go a moment later.
    """
    names = frozenset(p.name for p in Path("/dev/shm").iterdir() if _ours(p.name))
    fds = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the fd of the listing itself is gone
            fds += _is_segment(str(fd.readlink()))
    maps = Path("/proc/self/maps").read_text().splitlines()
    return names, fds, sum(_is_segment(line.split(maxsplit=5)[-1]) for line in maps)


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """The test leaves no shared memory: no /dev/shm name, fd, mapping or reader behind."""
    from multiprocessing import resource_tracker

    from slidestream.pipeline.stream import preload_forkserver

    # Started once by the first spawn / forkserver reader (the fork server as the pipeline
    # starts it, with its preload); their pipes stay open.
    resource_tracker.ensure_running()
    preload_forkserver()
    gc.collect()
    before = _shared_state()
    yield
    gc.collect()
    assert mp.active_children() == []
    # The DataLoader's queue threads may hold a fallback batch a moment after the pass.
    deadline = time.monotonic() + 5.0
    while (after := _shared_state())[1:] != before[1:] and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    assert after[0] - before[0] == frozenset()  # no new /dev/shm name (others may go)
    assert after[1:] == before[1:]


def test_slots_lease_release_and_give_back() -> None:
    slots = BatchSlots.create(readers=2, per_reader=2, batch_shape=(3, 4, 5, 3))
    assert slots is not None
    with slots:
        handle = slots.handle
        # reader 1 owns slots 2 and 3; both taken, it gets none (and allocates instead)
        first = take_slot(handle, 1, 3)
        second = take_slot(handle, 1, 2)
        assert first is not None and second is not None
        assert {first[0], second[0]} == {2, 3} and second[1].shape == (2, 4, 5, 3)
        assert take_slot(handle, 1, 3) is None
        first[1][...] = 7
        pixels = slots.lease(SlotFilled(handle.ring_id, 0, first[0], 3))
        assert pixels.shape == (3, 4, 5, 3) and (pixels == 7).all()
        tile = torch.from_numpy(pixels).permute(0, 3, 1, 2)[1]  # views keep the lease
        del pixels
        gc.collect()
        assert take_slot(handle, 1, 3) is None
        del tile
        gc.collect()
        again = take_slot(handle, 1, 3)
        assert again is not None and again[0] == first[0]
        give_back(handle, second[0])  # never sent (a read error): free at once
        assert take_slot(handle, 1, 1) is not None
        with pytest.raises(RuntimeError, match="unknown slot"):
            slots.lease(SlotFilled("another-ring", 0, 0, 1))


def test_a_closed_ring_is_not_mapped_by_a_later_reader() -> None:
    slots = BatchSlots.create(readers=1, per_reader=1, batch_shape=(1, 2, 2, 3))
    assert slots is not None
    handle = slots.handle
    slots.close()
    slots.close()  # idempotent
    held = Path(os.devnull).open("rb")  # noqa: SIM115 (may take the closed fd's number)
    try:
        assert take_slot(handle, 0, 1) is None  # gone, or another file: the inode differs
    finally:
        held.close()


@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_streaming_reuses_slots_with_the_right_pixels(
    generated_slide: Path, context: str, no_leaks: None
) -> None:
    dataset = _dataset(generated_slide)
    loader = make_loader(
        dataset, batch_size=2, num_workers=2, multiprocessing_context=context, prefetch_factor=1
    )
    assert len(loader) >= 8
    seen: list[int] = []
    pointers: set[int] = set()
    for batch in loader:
        # from a slot (a new torch shared storage would say is_shared), and slots come back
        assert not batch.images.is_shared()
        pointers.add(batch.images.data_ptr())
        for image, index in zip(batch.images, batch.indices.tolist(), strict=True):
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), dataset.read_tile(index))
            seen.append(index)
    assert seen == list(range(len(dataset)))
    # 2 readers x (prefetch 1 + 2) slots, reused for every batch of the pass
    assert len(pointers) <= 6
    dataset.close()


def test_batches_held_by_the_caller_are_never_overwritten(
    generated_slide: Path, no_leaks: None
) -> None:
    dataset = _dataset(generated_slide)
    loader = make_loader(
        dataset,
        batch_size=2,
        num_workers=2,
        multiprocessing_context="fork",
        shared_slots_per_reader=1,
    )
    batches = list(loader)  # every slot stays held: the readers allocate the other batches
    assert len(batches) >= 8
    for batch in batches:
        for image, index in zip(batch.images, batch.indices.tolist(), strict=True):
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), dataset.read_tile(index))
    del batches
    dataset.close()


@pytest.mark.parametrize("slots", [None, 0])
def test_nothing_leaks_when_a_pass_is_abandoned(
    generated_slide: Path, slots: int | None, no_leaks: None
) -> None:
    dataset = _dataset(generated_slide)
    loader = make_loader(
        dataset,
        batch_size=2,
        num_workers=2,
        multiprocessing_context="fork",
        shared_slots_per_reader=slots,
    )
    with pytest.raises(KeyError):
        for n, _batch in enumerate(loader.start()):
            if n == 2:
                raise KeyError("the caller fails mid-pass")
    it = iter(loader)
    kept = next(it)
    it.close()  # the caller stops early (a break), still holding a batch
    assert kept.images.shape[0] == 2
    del kept, it, _batch


def test_nothing_leaks_after_a_worker_read_error(no_leaks: None) -> None:
    slide = _open_corrupt(Path("bad.svs"), None)
    grid = plan_tiles(slide, CFG)
    dataset = TileDataset(
        "bad.svs", grid.tiles, tile_mpp=0.5, tile_size_px=96, opener=_open_corrupt
    )
    loader = make_loader(dataset, batch_size=2, num_workers=2, multiprocessing_context="fork")
    with pytest.raises(SlideReadError, match="cannot read tile"):
        list(loader)
