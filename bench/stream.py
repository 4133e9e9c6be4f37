"""Streaming benchmark: raw JPEG decode limit vs OpenSlide vs the slidestream fast path.

Generates (in a temporary folder, deleted afterwards) a 40,000 x 30,000 px pyramidal TIFF with
256 px JPEG tiles (q90), ~50 % white background and an H&E-like nucleus texture, then prints:

(a) imagecodecs JPEG decode of the tissue tiles' bytes (in memory), 1 and 2 processes
(b) OpenSlide ``read_region`` of the same tiles, 2 processes
(c) slidestream ``TileDataset`` + ``make_loader`` (2 workers) at native and half resolution
(d) ratios c/a and c/b at native resolution
(e) peak RSS, tissue-detection time

The loader is timed ``--repeats`` times (median reported); ``--compare`` also times the loader
without its reusable shared batch slots (``shared_slots_per_reader=0``: a new shared-memory
batch per batch, the path before issue 19's fix), interleaved with the default one, so both
figures come from one run on the same machine state.

Run: ``.venv/bin/python bench/stream.py [--tiles 2000] [--width 40000 --height 30000]
[--repeats 3] [--compare] [--slide kept.tif]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

TILE = 256
MPP = 0.25


def _textures(count: int, seed: int = 0) -> list[npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(count):
        base = np.empty((TILE, TILE, 3), np.float32)
        base[...] = (232, 182, 208)  # eosin pink
        base += rng.normal(0, 9, size=(TILE, TILE, 1)) + rng.normal(0, 4, size=(TILE, TILE, 3))
        fibres = cv2.GaussianBlur(
            rng.normal(0, 25, size=(TILE, TILE)).astype(np.float32), (0, 0), 3
        )
        base[..., 1] -= np.abs(fibres)
        img = np.clip(base, 0, 255).astype(np.uint8)
        for _ in range(int(rng.integers(25, 45))):  # haematoxylin nuclei
            centre = (int(rng.integers(0, TILE)), int(rng.integers(0, TILE)))
            axes = (int(rng.integers(4, 10)), int(rng.integers(3, 7)))
            colour = tuple(int(v) for v in rng.integers((60, 30, 100), (110, 70, 160)))
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        img = cv2.GaussianBlur(img, (0, 0), 0.8)
        noise = rng.normal(0, 3, size=img.shape)
        tiles.append(np.clip(img + noise, 0, 255).astype(np.uint8))
    return tiles


class _Source:
    """Tile callable: textured tiles inside a central ellipse (~50 % of the area), white outside."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.textures = _textures(8)
        self.white = np.full((TILE, TILE, 3), 255, np.uint8)

    def is_tissue(self, x: int, y: int) -> bool:
        cx, cy = (x + TILE / 2) / self.width - 0.5, (y + TILE / 2) / self.height - 0.5
        return (cx / 0.4) ** 2 + (cy / 0.4) ** 2 <= 1.0

    def __call__(self, x: int, y: int, w: int, h: int) -> npt.NDArray[np.uint8]:
        if not self.is_tissue(x, y):
            return self.white[:h, :w]
        key = ((x // TILE) * 7919 + (y // TILE) * 104729) % len(self.textures)
        return self.textures[key][:h, :w]


# ------------------------------------------------------------------ worker functions (fork)
_STATE: dict[str, object] = {}


def _decode_chunk(chunk: list[bytes]) -> int:
    import imagecodecs

    out = np.empty((TILE, TILE, 3), np.uint8)
    for data in chunk:
        imagecodecs.jpeg8_decode(data, out=out)
    return len(chunk)


def _openslide_chunk(args: tuple[str, list[tuple[int, int]]]) -> int:
    import openslide

    path, locations = args
    slide = openslide.OpenSlide(path)
    for x, y in locations:
        np.asarray(slide.read_region((x, y), 0, (TILE, TILE)))
    slide.close()
    return len(locations)


def _slidestream_chunk(args: tuple[str, list[tuple[int, int]]]) -> int:
    from slidestream.wsi import open_slide

    path, locations = args
    with open_slide(path) as slide:
        for x, y in locations:
            slide.read_region((x, y), (TILE, TILE))
    return len(locations)


def _openslide_half_chunk(args: tuple[str, list[tuple[int, int]]]) -> int:
    import openslide

    path, locations = args
    slide = openslide.OpenSlide(path)
    for x, y in locations:  # level 1 is the 2x downsample: the half-resolution tiles as they are
        np.asarray(slide.read_region((x, y), 1, (TILE, TILE)))
    slide.close()
    return len(locations)


def _slidestream_half_chunk(args: tuple[str, list[tuple[int, int]]]) -> int:
    from slidestream.wsi import open_slide

    path, locations = args
    with open_slide(path) as slide:
        for x, y in locations:
            slide.read_at_mpp((x, y), (TILE, TILE), 2 * MPP)
    return len(locations)


def _noop(_: int) -> int:
    return 0


def _pool_rate(func: object, chunks: list[object], processes: int, pixels: int) -> float:
    ctx = mp.get_context("fork")
    with ctx.Pool(processes) as pool:
        pool.map(_noop, range(processes))  # workers started before timing
        t0 = time.perf_counter()
        pool.map(func, chunks, chunksize=1)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - t0
    return pixels / elapsed / 1e6


def _split(items: list[object], parts: int) -> list[list[object]]:
    return [items[i::parts] for i in range(parts)]


def _loader_rate(
    path: Path, tiles: list[object], tile_mpp: float, workers: int, slots: int | None = None
) -> float:
    from slidestream.tiling import TileDataset, make_loader

    dataset = TileDataset(path, tiles, tile_mpp=tile_mpp, tile_size_px=TILE)  # type: ignore[arg-type]
    loader = make_loader(
        dataset,
        batch_size=32,
        num_workers=workers,
        multiprocessing_context="fork",
        shared_slots_per_reader=slots,
    )
    count = 0
    t0 = time.perf_counter()
    for batch in loader:
        count += int(batch.images.shape[0])
    elapsed = time.perf_counter() - t0
    return count * TILE * TILE / elapsed / 1e6


def _rss_mb() -> tuple[float, float]:
    scale = 1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale
    return own, children


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=40_000)
    parser.add_argument("--height", type=int, default=30_000)
    parser.add_argument("--tiles", type=int, default=2000, help="tissue tiles streamed per test")
    parser.add_argument("--keep", type=Path, default=None, help="copy the slide here")
    parser.add_argument(
        "--slide",
        type=Path,
        default=None,
        help="use this slide (from --keep) instead of making one",
    )
    parser.add_argument("--repeats", type=int, default=3, help="loader timings (median)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also time the loader without shared batch slots (one new shm batch per batch)",
    )
    args = parser.parse_args()

    import tifffile

    from slidestream.tiling import TilingConfig, detect_tissue, plan_tiles
    from slidestream.wsi import open_slide
    from slidestream.wsi.synthetic import write_pyramidal_tiff

    tmp = Path(tempfile.mkdtemp(prefix="slidestream-bench-"))
    try:
        path = tmp / "bench.tif"
        source = _Source(args.width, args.height)
        t0 = time.perf_counter()
        if args.slide is not None:
            path = args.slide
        else:
            write_pyramidal_tiff(
                path, source, size=(args.width, args.height), mpp=MPP, tile_size=TILE, quality=90
            )
        gen_s = time.perf_counter() - t0
        print(
            f"slide: {args.width} x {args.height} px, {path.stat().st_size / 1e6:.0f} MB, "
            f"generated in {gen_s:.1f} s"
        )
        if args.keep is not None and args.slide is None:
            shutil.copy(path, args.keep)

        with open_slide(path) as slide:
            print(f"reader {slide.reader}, vendor {slide.vendor}, levels {slide.level_dimensions}")
            t0 = time.perf_counter()
            mask = detect_tissue(slide)
            tissue_s = time.perf_counter() - t0
            native = plan_tiles(slide, TilingConfig(tile_mpp=MPP, tile_size_px=TILE), mask)
            half = plan_tiles(slide, TilingConfig(tile_mpp=2 * MPP, tile_size_px=TILE), mask)
        print(
            f"tissue detection: {tissue_s:.2f} s; "
            f"tissue tiles native {len(native)}, half {len(half)}"
        )
        rng = np.random.default_rng(1)
        pick = np.sort(rng.choice(len(native), size=min(args.tiles, len(native)), replace=False))
        tiles = [native[int(i)] for i in pick]
        half_pick = np.sort(rng.choice(len(half), size=min(args.tiles, len(half)), replace=False))
        half_tiles = [half[int(i)] for i in half_pick]
        locations = [(round(t.l0_x), round(t.l0_y)) for t in tiles]
        half_locations = [(round(t.l0_x), round(t.l0_y)) for t in half_tiles]
        half_pixels = len(half_tiles) * TILE * TILE
        pixels = len(tiles) * TILE * TILE

        with tifffile.TiffFile(path) as tif, path.open("rb") as fh:
            page = tif.pages[0]
            across = -(-page.imagewidth // TILE)
            blobs = []
            for x, y in locations:
                idx = (y // TILE) * across + x // TILE
                fh.seek(page.dataoffsets[idx])
                blobs.append(fh.read(page.databytecounts[idx]))

        a1 = _pool_rate(_decode_chunk, [blobs], 1, pixels)
        a2 = _pool_rate(_decode_chunk, _split(blobs, 2), 2, pixels)  # type: ignore[arg-type]
        print(f"(a) raw JPEG decode (imagecodecs):  1 proc {a1:7.1f} MP/s | 2 procs {a2:7.1f} MP/s")
        b2 = _pool_rate(
            _openslide_chunk,
            [(str(path), part) for part in _split(locations, 2)],  # type: ignore[arg-type]
            2,
            pixels,
        )
        print(f"(b) OpenSlide read_region:          2 procs {b2:7.1f} MP/s")
        c_pool = _pool_rate(
            _slidestream_chunk,
            [(str(path), part) for part in _split(locations, 2)],  # type: ignore[arg-type]
            2,
            pixels,
        )
        print(f"(c0) slidestream Slide.read_region: 2 procs {c_pool:7.1f} MP/s (no DataLoader)")
        b2_half = _pool_rate(
            _openslide_half_chunk,
            [(str(path), part) for part in _split(half_locations, 2)],  # type: ignore[arg-type]
            2,
            half_pixels,
        )
        c_pool_half = _pool_rate(
            _slidestream_half_chunk,
            [(str(path), part) for part in _split(half_locations, 2)],  # type: ignore[arg-type]
            2,
            half_pixels,
        )
        print(
            f"(b/c0 half-res) OpenSlide read_region level 1: 2 procs {b2_half:7.1f} MP/s | "
            f"slidestream Slide.read_at_mpp: 2 procs {c_pool_half:7.1f} MP/s (output px)"
        )
        variants: dict[str, int | None] = {"slots": None}
        if args.compare:
            variants = {"no slots (old)": 0, **variants}
        rates: dict[str, dict[str, list[float]]] = {
            name: {"native": [], "half": []} for name in variants
        }
        for _ in range(max(1, args.repeats)):
            for name, slots in variants.items():  # interleaved: the same machine state
                rates[name]["native"].append(_loader_rate(path, tiles, MPP, 2, slots))
                rates[name]["half"].append(_loader_rate(path, half_tiles, 2 * MPP, 2, slots))
        for name, rate in rates.items():
            c_native = float(np.median(rate["native"]))
            c_half = float(np.median(rate["half"]))
            runs = " ".join(f"{v:.0f}" for v in rate["native"])
            print(
                f"(c) slidestream make_loader, 2 workers, {name}: native {c_native:7.1f} MP/s | "
                f"half-res {c_half:7.1f} MP/s (output px; median of {len(rate['native'])}, "
                f"native runs {runs})"
            )
            print(
                f"(d) {name}: c/a = {c_native / a2:.2f} (target >= 0.7)   c/b = "
                f"{c_native / b2:.2f} (target >= 3)   c/c0 = {c_native / c_pool:.2f}   "
                f"[without DataLoader: c0/a = {c_pool / a2:.2f}, c0/b = {c_pool / b2:.2f}]; "
                f"half-res c/b = {c_half / b2_half:.2f}, c/c0 = {c_half / c_pool_half:.2f}"
            )
        own, children = _rss_mb()
        print(
            f"(e) peak RSS: main {own:.0f} MB, largest worker {children:.0f} MB (target < 1500); "
            f"tissue detection {tissue_s:.2f} s"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
