"""Streaming: every planned tile exactly once with the right pixels, under fork and spawn."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from slidestream.errors import ConfigError, SlideReadError
from slidestream.tiling import (
    SlideLike,
    TileBatch,
    TileDataset,
    TilingConfig,
    make_loader,
    plan_tiles,
)

from .conftest import FakeSlide

CFG = TilingConfig(tile_mpp=0.5, tile_size_px=96, overlap_px=16, min_tissue_fraction=0.0)


def _expected_tile(
    image: npt.NDArray[np.uint8], l0_x: float, l0_y: float, size: int
) -> npt.NDArray[np.uint8]:
    """Native-resolution tile cut from the source array, padded with white."""
    pad = size
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    x, y = round(l0_x) + pad, round(l0_y) + pad
    return padded[y : y + size, x : x + size]


def _in_shared_file(address: int) -> bool:
    """Whether ``address`` lies in this process's mapping of a ``/dev/shm`` file (Linux)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        low, high = (int(v, 16) for v in span.split("-"))
        if low <= address < high:
            return len(rest) == 5 and rest[4].startswith("/dev/shm/")
    return False


def _collect(batches: list[TileBatch]) -> tuple[list[int], dict[int, npt.NDArray[np.uint8]]]:
    order: list[int] = []
    pixels: dict[int, npt.NDArray[np.uint8]] = {}
    for batch in batches:
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 96, 96)
        assert batch.indices.dtype == torch.int64 and batch.l0_xy.shape == (len(batch.indices), 2)
        for image, index in zip(batch.images, batch.indices.tolist(), strict=True):
            order.append(index)
            pixels[index] = image.permute(1, 2, 0).numpy()
    return order, pixels


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fork_loader_yields_every_tile_once_with_correct_pixels(
    generated_slide: Path, he_image: npt.NDArray[np.uint8], num_workers: int
) -> None:
    from slidestream.wsi import open_slide

    with open_slide(generated_slide) as slide:
        grid = plan_tiles(slide, CFG)
    assert len(grid) == grid.n_cols * grid.n_rows > 10
    dataset = TileDataset(generated_slide, grid.tiles, tile_mpp=CFG.tile_mpp, tile_size_px=96)
    loader = make_loader(
        dataset, batch_size=5, num_workers=num_workers, device="cpu", multiprocessing_context="fork"
    )
    order, pixels = _collect(list(loader))
    assert order == list(range(len(grid)))  # each exactly once, in tile order
    for tile in grid:
        expected = _expected_tile(he_image, tile.l0_x, tile.l0_y, 96)
        np.testing.assert_array_equal(pixels[tile.index], expected)


def _fork_loader(slide_path: Path, num_workers: int) -> tuple[Any, Any]:
    """The whole-slide grid of CFG and a forked CPU loader over it (batches of 4)."""
    from slidestream.wsi import open_slide

    with open_slide(slide_path) as slide:
        grid = plan_tiles(slide, CFG)
    dataset = TileDataset(slide_path, grid.tiles, tile_mpp=CFG.tile_mpp, tile_size_px=96)
    loader = make_loader(
        dataset, batch_size=4, num_workers=num_workers, device="cpu", multiprocessing_context="fork"
    )
    return grid, loader


@pytest.mark.parametrize("num_workers", [0, 1])
def test_started_loader_yields_the_same_batches_once(
    generated_slide: Path, num_workers: int
) -> None:
    grid, loader = _fork_loader(generated_slide, num_workers)
    plain_order, plain = _collect(list(loader))
    assert loader.start() is loader
    loader.start()  # idempotent until consumed
    order, pixels = _collect(list(loader))
    assert order == plain_order == list(range(len(grid)))
    for index, image in plain.items():
        np.testing.assert_array_equal(pixels[index], image)
    assert _collect(list(loader))[0] == plain_order  # consumed: the next pass starts afresh


def test_spawn_loader_and_pickling(generated_slide: Path) -> None:
    from slidestream.wsi import open_slide

    cfg = TilingConfig(tile_mpp=1.0, tile_size_px=96, overlap_px=16, min_tissue_fraction=0.0)
    with open_slide(generated_slide) as slide:
        grid = plan_tiles(slide, cfg)
        expected = {t.index: slide.read_at_mpp((t.l0_x, t.l0_y), (96, 96), 1.0) for t in grid}
    dataset = TileDataset(generated_slide, grid.tiles, tile_mpp=1.0, tile_size_px=96)
    image, index = dataset[3]  # opens the slide in this process
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected[index])
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._slide is None and len(clone) == len(dataset)
    np.testing.assert_array_equal(clone[3][0].numpy(), image.numpy())
    loader = make_loader(
        clone, batch_size=4, num_workers=2, device="cpu", multiprocessing_context="spawn"
    )
    order: list[int] = []
    for batch in loader:
        for img, idx in zip(batch.images, batch.indices.tolist(), strict=True):
            order.append(idx)
            np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), expected[idx])
    assert order == list(range(len(grid)))
    dataset.close()
    dataset.close()  # idempotent


class _CorruptSlide(FakeSlide):
    def read_region(
        self, location: tuple[int, int], size: tuple[int, int], *, level: int = 0
    ) -> npt.NDArray[np.uint8]:
        if location[0] > 100:
            raise SlideReadError(f"{self.path}: corrupt tile data at {location}")
        return super().read_region(location, size, level=level)


def _open_corrupt(path: Path, mpp: float | None) -> SlideLike:
    return _CorruptSlide(np.full((200, 300, 3), 200, np.uint8), mpp=0.5, path=str(path))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_worker_read_error_reaches_the_caller(num_workers: int) -> None:
    slide = _open_corrupt(Path("bad.svs"), None)
    grid = plan_tiles(slide, CFG)
    dataset = TileDataset(
        "bad.svs", grid.tiles, tile_mpp=0.5, tile_size_px=96, opener=_open_corrupt
    )
    loader = make_loader(
        dataset, batch_size=2, num_workers=num_workers, device="cpu", multiprocessing_context="fork"
    )
    with pytest.raises(SlideReadError) as info:
        list(loader)
    message = str(info.value)
    assert "bad.svs" in message and "cannot read tile" in message and "level-0 x=" in message
    assert "\n" not in message


@pytest.mark.realdata
def test_unreadable_svs_raises_slide_read_error(shared_data: Path) -> None:
    from slidestream.wsi import open_slide

    path = shared_data / "slides" / "synthetic" / "unreadable.svs"
    with open_slide(path) as slide:
        grid = plan_tiles(
            slide, TilingConfig(tile_mpp=slide.mpp, tile_size_px=16, min_tissue_fraction=0)
        )
    dataset = TileDataset(path, grid.tiles, tile_mpp=slide.mpp, tile_size_px=16)
    with pytest.raises(SlideReadError, match=r"unreadable\.svs"):
        list(
            make_loader(
                dataset, batch_size=1, num_workers=1, device="cpu", multiprocessing_context="fork"
            )
        )


@pytest.mark.gpu
def test_cuda_loader_pins_and_transfers(generated_slide: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from slidestream.wsi import open_slide

    with open_slide(generated_slide) as slide:
        grid = plan_tiles(slide, CFG)
    dataset = TileDataset(generated_slide, grid.tiles, tile_mpp=CFG.tile_mpp, tile_size_px=96)
    loader = make_loader(dataset, batch_size=4, num_workers=2, device="cuda")
    assert loader._loader.pin_memory
    seen: list[int] = []
    for batch in loader:
        assert batch.images.is_cuda and batch.images.dtype == torch.uint8
        assert not batch.indices.is_cuda
        seen.extend(batch.indices.tolist())
    assert seen == list(range(len(grid)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_are_channels_last_views_read_in_one_piece(
    generated_slide: Path, num_workers: int
) -> None:
    grid, loader = _fork_loader(generated_slide, num_workers)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(grid) // 4)
    for batch in batches:
        images = batch.images
        assert images.shape[1] == 3
        # (N, 3, H, W) is a zero-copy view of one contiguous (N, H, W, 3) array
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert images.permute(0, 2, 3, 1).is_contiguous()
        # a worker's batch arrives in shared memory (a slot number or a handle crossed, not the
        # pixels): a reused batch slot, or a new shared storage once every slot is held
        assert _in_shared_file(images.data_ptr()) == (num_workers > 0)
        expected_xy = torch.from_numpy(loader.dataset.l0_xy[batch.indices.numpy()])
        torch.testing.assert_close(batch.l0_xy, expected_xy)


def test_read_tiles_into_fills_a_preallocated_array(generated_slide: Path) -> None:
    from slidestream.errors import ConfigError
    from slidestream.wsi import open_slide

    with open_slide(generated_slide) as slide:
        grid = plan_tiles(slide, CFG)
    dataset = TileDataset(generated_slide, grid.tiles, tile_mpp=CFG.tile_mpp, tile_size_px=96)
    out = np.zeros((3, 96, 96, 3), np.uint8)
    dataset.read_tiles_into(2, out)
    for k in range(3):
        np.testing.assert_array_equal(out[k], dataset.read_tile(2 + k))
    with pytest.raises(ConfigError, match="expected uint8"):
        dataset.read_tiles_into(0, np.zeros((3, 96, 96), np.uint8))
    with pytest.raises(ConfigError, match="outside"):
        dataset.read_tiles_into(len(dataset) - 1, out)
    dataset.close()


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_readers_yield_the_same_batches_in_order(
    generated_slide: Path, threads: int
) -> None:
    """Threads (for a daemonic process, e.g. a Dask worker under a nanny) read the same pixels
    in the same order as worker processes, and stop when the pass ends."""
    import threading

    grid, loader = _fork_loader(generated_slide, 0)
    _, expected = _collect(list(loader))
    dataset = TileDataset(generated_slide, grid.tiles, tile_mpp=CFG.tile_mpp, tile_size_px=96)
    threaded = make_loader(
        dataset, batch_size=4, num_workers=threads, device="cpu", workers_as="threads"
    )
    assert len(threaded) == len(loader)
    threaded.start()
    order, pixels = _collect(list(threaded))
    assert order == list(range(len(grid)))
    for index, image in expected.items():
        np.testing.assert_array_equal(pixels[index], image)
    # an abandoned pass stops its threads too
    it = iter(threaded)
    next(it)
    del it
    import gc

    gc.collect()
    for thread in threading.enumerate():
        if thread.name.startswith("tile-reader-"):
            thread.join(timeout=5)
    assert not [t for t in threading.enumerate() if t.name.startswith("tile-reader-")]


def test_thread_reader_error_reaches_the_caller() -> None:
    slide = _open_corrupt(Path("bad.svs"), None)
    grid = plan_tiles(slide, CFG)
    dataset = TileDataset(
        "bad.svs", grid.tiles, tile_mpp=0.5, tile_size_px=96, opener=_open_corrupt
    )
    loader = make_loader(dataset, batch_size=2, num_workers=2, workers_as="threads")
    with pytest.raises(SlideReadError, match=r"bad\.svs: cannot read tile"):
        list(loader)
    with pytest.raises(ConfigError, match="workers_as"):
        make_loader(dataset, batch_size=2, num_workers=2, workers_as="fibres")  # type: ignore[arg-type]
