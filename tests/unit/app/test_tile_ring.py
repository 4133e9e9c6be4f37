"""Nucleus tiles handed to post-processing processes through the shared TileRing."""

from __future__ import annotations

import functools
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from slidestream.models.nuclei import PostprocessConfig, make_targets, postprocess_maps
from slidestream.pipeline import nucleus_tile_result, submit_nucleus_tile
from slidestream.tile_ring import TileRing

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the ring needs /proc/<pid>/fd")


def _tile(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Model-like maps of random discs and their RGB pixels (96 x 96 px)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :96]
    labels = np.zeros((96, 96), np.int32)
    for i in range(1, 8):
        cy, cx = rng.uniform(12, 84, 2)
        labels[(np.hypot(yy - cy, xx - cx) <= rng.uniform(4, 8)) & (labels == 0)] = i
    rgb = np.full((96, 96, 3), 210, np.uint8)
    rgb[labels > 0] = rng.integers(40, 160, 3)
    return make_targets(labels), rgb


def test_ring_slots_round_trip_and_run_out() -> None:
    maps, rgb = _tile(0)
    with TileRing(2) as ring:
        a = ring.put(maps, rgb[:, ::-1])  # a strided view is copied in
        b = ring.put(maps * 0.5, rgb)
        assert a is not None and b is not None and a.offset != b.offset
        assert not a.rgb_planar and not b.rgb_planar
        assert ring.put(maps, rgb) is None  # both slots in flight: the caller pickles
        got_maps, got_rgb = a.load()
        np.testing.assert_array_equal(got_maps, maps)
        np.testing.assert_array_equal(got_rgb, rgb[:, ::-1])
        ring.release(a)
        assert ring.put(maps[:, :48], rgb) is None  # other shape: pickled
        c = ring.put(maps, rgb)
        assert c is not None and c.offset == a.offset
        np.testing.assert_array_equal(b.load()[0], maps * 0.5)
    assert TileRing(1).put(maps.astype(np.float64), rgb) is None
    # A channels-last view of channels-first pixels (a permuted batch) is stored planar.
    planar = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    with TileRing(1) as ring:
        ref = ring.put(maps, planar.transpose(1, 2, 0))
        assert ref is not None and ref.rgb_planar
        got_maps, got_rgb = ref.load()
        assert got_rgb.flags.c_contiguous and got_rgb.shape == rgb.shape
        np.testing.assert_array_equal(got_rgb, rgb)


def test_pool_results_through_the_ring_equal_inline_results() -> None:
    post = functools.partial(postprocess_maps, config=PostprocessConfig())
    tiles = [_tile(seed) for seed in range(6)]
    # Half the tiles as channels-last views of planar memory, as the pipeline passes them.
    tiles = [
        (m, np.ascontiguousarray(r.transpose(2, 0, 1)).transpose(1, 2, 0) if i % 2 else r)
        for i, (m, r) in enumerate(tiles)
    ]
    args = ((8, 8, 88, 88), (1000.0, 2000.0), 2.0, 0.5)
    inline = [submit_nucleus_tile(None, post, m, r, *args) for m, r in tiles]
    ring = TileRing(3)  # fewer slots than tiles: some tiles are pickled, slots are reused
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        futures = [submit_nucleus_tile(pool, post, m, r, *args, ring=ring) for m, r in tiles]
        pooled = [nucleus_tile_result(f) for f in futures]
    ring.close()
    assert sum(len(t) for t in inline) >= 30
    for a, b in zip(inline, pooled, strict=True):
        np.testing.assert_array_equal(a.coords, b.coords)
        for key, values in a.measurements.items():
            np.testing.assert_array_equal(values, b.measurements[key])


def test_ring_without_space_falls_back_to_pickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("slidestream.tile_ring.os.posix_fallocate", full)
    maps, rgb = _tile(1)
    ring = TileRing(4)
    assert ring.put(maps, rgb) is None
    assert ring.put(maps, rgb) is None  # stays off, without retrying
    ring.close()
