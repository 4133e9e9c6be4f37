"""Whole-slide pipeline benchmark: efficiency and end-to-end throughput, in ONE run.

Prints, for a generated H&E-like demo slide (default 8192 x 6144 px at 0.25 µm/px):

(a) nucleus model + post-processing alone on pre-loaded tiles (same batches, same worker pool
    as the pipeline): tiles/s, megapixels/s at the model's µm/px, mm²/s; best of two runs;
(b) the end-to-end nucleus pass of ``slidestream run`` (reading, inference, post-processing,
    stitching, GeoJSON + parquet writing): tiles/s; best of ``--e2e-runs`` (default 2) runs;
(c) pipeline efficiency = (b) / (a)   (target >= 0.9);
(d) end-to-end mm² of tissue per second with both analyses, in the run of (b)
    (target >= 0.15 on 2 CPU cores);
(e) peak resident memory of the main process.

Usage: ``python bench/pipeline.py [--width 8192 --height 6144 --mpp 0.25] [--device cpu]``

``--compare-loader`` also runs (b)-(d) with the tile loader's shared batch slots off
(``make_loader(shared_slots_per_reader=0)``: a new shared-memory batch per batch, the path
before issue 19's fix), alternating with the default runs, so both come from one run.

``--mosaic N`` writes an N x N mosaic of the rendered demo image instead (``N*width`` x
``N*height`` px, streamed tile by tile): a large 40x slide for GPU runs without rendering (and
holding) a gigapixel image. The tissue pattern repeats, which changes nothing for throughput.
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--height", type=int, default=6144)
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument(
        "--mosaic", type=int, default=1, help="repeat the demo image N x N times (default 1)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--e2e-runs", type=int, default=2, help="end-to-end runs; (b) is the best (default 2)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--nuclei-model", default="default")
    parser.add_argument("--tissue-model", default="default")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tile-reading processes (default: the pipeline's choice)",
    )
    parser.add_argument(
        "--slide",
        type=Path,
        default=None,
        help="reuse this generated slide if it exists, else generate it there and keep it",
    )
    parser.add_argument(
        "--postprocess-workers",
        type=int,
        default=None,
        help="post-processing processes (default: the pipeline's choice; 0: in the main process)",
    )
    parser.add_argument(
        "--compare-loader",
        action="store_true",
        help="also run (b)-(d) without the loader's shared batch slots (alternating runs)",
    )
    args = parser.parse_args()

    import functools
    import multiprocessing as mp

    import numpy as np
    import torch

    from slidestream import tiling as tiling_package
    from slidestream.config import RunConfig
    from slidestream.demo_slide import DemoSlideSpec, write_demo_slide
    from slidestream.pipeline import (
        analyse_slide,
        load_models,
        nucleus_tile_result,
        postprocess_pool,
        submit_nucleus_tile,
        worker_counts,
    )
    from slidestream.tile_ring import TileRing
    from slidestream.tiling import TilingConfig, detect_tissue, plan_tiles
    from slidestream.wsi import open_slide

    with tempfile.TemporaryDirectory(prefix="slidestream-bench-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        # Generated in a child process, so (e) measures the analysis, not the slide synthesis.
        slide_path = args.slide or tmp / "bench-slide.svs"
        demo = DemoSlideSpec(width_px=args.width, height_px=args.height, mpp=args.mpp)
        n = max(1, args.mosaic)
        if not slide_path.is_file():
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as gen:
                if n > 1:
                    gen.submit(write_mosaic_slide, slide_path, demo, n).result()
                else:
                    gen.submit(write_demo_slide, slide_path, demo).result()
        print(
            f"slide: {n * args.width}x{n * args.height} px at {args.mpp} µm/px"
            + (f" ({n}x{n} mosaic)" if n > 1 else "")
            + f", ready in {time.perf_counter() - t0:.1f} s"
        )
        config = RunConfig(
            out_dir=tmp / "out",
            device=args.device,
            batch_size=args.batch_size,
            nuclei_model=args.nuclei_model,
            tissue_model=args.tissue_model,
            postprocess_workers=args.postprocess_workers,
            workers=args.workers,
            show_progress=False,
            db_url=None,
            force=True,  # every end-to-end run redoes the slide
        )
        models = load_models(config)
        readers, post = worker_counts(config, models)
        print(
            f"device {models.device}, torch threads {torch.get_num_threads()}, "
            f"{readers} reader(s), {post} post-processing worker(s)"
        )
        nmodel = models.nuclei
        pool = postprocess_pool(post)
        if pool is not None:  # warm the pool
            list(pool.map(abs, range(post)))
        with open_slide(slide_path) as slide:
            mask = detect_tissue(slide, mask_mpp=config.tissue_mask_mpp)
            halo = math.ceil(config.nucleus_halo_um / nmodel.mpp)
            tiling = TilingConfig(
                tile_mpp=nmodel.mpp,
                tile_size_px=config.nuclei_tile_size_px,
                overlap_px=2 * halo,
                min_tissue_fraction=config.min_tissue_fraction,
            )
            grid = plan_tiles(slide, tiling, mask)
            size = tiling.tile_size_px
            tiles = [
                slide.read_at_mpp((t.l0_x, t.l0_y), (size, size), nmodel.mpp) for t in grid.tiles
            ]
            l0_per_px = nmodel.mpp / slide.mpp
            postprocess = nmodel.postprocess_for(float(slide.mpp))  # as the pipeline
            tissue_mm2 = mask.tissue_area_mm2
            l0_bounds = (float(slide.dimensions[0]), float(slide.dimensions[1]))
        n = len(tiles)
        core_mp = n * tiling.stride_px**2 / 1e6
        core_mm2 = core_mp * nmodel.mpp**2
        batches = [
            torch.from_numpy(np.stack(tiles[i : i + args.batch_size])).permute(0, 3, 1, 2)
            for i in range(0, n, args.batch_size)
        ]
        nmodel.predict(batches[0][:1])  # warm-up

        # (a) model + post-processing alone, pre-loaded tiles, same pool (or inline); best of two
        # runs (the first also warms the pool's workers and the CPU kernels)
        def model_alone() -> tuple[float, int]:
            t0 = time.perf_counter()
            pending: list[Any] = []
            count = 0
            # In the pool through shared memory, or inline when there is none (as the pipeline).
            ring = TileRing(4 * post + args.batch_size + 1) if pool is not None else None
            for b, batch in enumerate(batches):
                maps = nmodel.predict(batch)
                rgb = batch.permute(0, 2, 3, 1).numpy()
                for i in range(len(batch)):
                    t = grid.tiles[b * args.batch_size + i]
                    job = (postprocess, maps[i], rgb[i], t.core, (t.l0_x, t.l0_y), l0_per_px)
                    pending.append(
                        submit_nucleus_tile(pool, *job, nmodel.mpp, ring=ring, l0_bounds=l0_bounds)
                    )
                while len(pending) > 4 * post:
                    count += len(nucleus_tile_result(pending.pop(0)))
            for item in pending:
                count += len(nucleus_tile_result(item))
            if ring is not None:
                ring.close()
            return time.perf_counter() - t0, count

        alone_s, count = min(model_alone() for _ in range(2))
        alone_tps = n / alone_s
        print(
            f"(a) model + post-processing alone: {n} tiles ({size}px, core {tiling.stride_px}px) "
            f"in {alone_s:.1f} s = {alone_tps:.2f} tiles/s, "
            f"{core_mp / alone_s:.2f} MP/s (core), {core_mm2 / alone_s:.3f} mm²/s, "
            f"{count} nuclei"
        )

        # (b) end to end, best of --e2e-runs (as (a) is best of two: a shared machine's noise
        # then biases neither side of the ratio); with --compare-loader alternating with runs
        # whose loader has no shared batch slots (the pipeline finds make_loader at call time)
        default_make_loader = tiling_package.make_loader
        variants: dict[str, Any] = {"": default_make_loader}
        if args.compare_loader:
            variants = {
                " [no slots (old)]": functools.partial(
                    default_make_loader, shared_slots_per_reader=0
                ),
                " [slots]": default_make_loader,
            }
        # (nucleus pass s, total s, summary) per variant
        runs: dict[str, list[tuple[float, float, dict[str, Any]]]] = {v: [] for v in variants}
        for _ in range(max(1, args.e2e_runs)):
            for name, make_loader in variants.items():
                tiling_package.make_loader = make_loader  # type: ignore[attr-defined]
                try:
                    t0 = time.perf_counter()
                    outcome = analyse_slide(slide_path, config, models, pool=pool)
                    assert outcome.summary is not None
                    summary_json = outcome.summary.to_json()
                finally:
                    tiling_package.make_loader = default_make_loader  # type: ignore[attr-defined]
                nuclei_s = float(summary_json["provenance"]["timings_s"]["nuclei"])
                runs[name].append((nuclei_s, time.perf_counter() - t0, summary_json))
        if pool is not None:
            pool.shutdown()
        for name, variant_runs in runs.items():
            _, total_s, summary = min(variant_runs, key=lambda r: r[0])
            timings = summary["provenance"]["timings_s"]
            e2e_tps = n / timings["nuclei"]
            print(
                f"(b){name} end-to-end nucleus pass: {timings['nuclei']:.1f} s = "
                f"{e2e_tps:.2f} tiles/s ({summary['statistics']['nucleus_count']} nuclei); "
                "best of " + ", ".join(f"{r[0]:.1f}" for r in variant_runs) + " s"
            )
            print(
                f"(c){name} pipeline efficiency (b)/(a): {e2e_tps / alone_tps:.3f}  (target >= 0.9)"
            )
            print(
                f"(d){name} end to end, both analyses: tissue {tissue_mm2:.2f} mm² in "
                f"{total_s:.1f} s = {tissue_mm2 / total_s:.3f} mm²/s  (target >= 0.15 on 2 CPU "
                "cores); timings " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
            )
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"(e) peak RSS of the main process: {rss_mb:.0f} MB")


def write_mosaic_slide(path: Path, spec: Any, n: int) -> None:
    """Write an ``n`` x ``n`` mosaic of the demo image of ``spec`` as a pyramidal JPEG SVS.

    Level-0 tiles (256 px) are cut from the one rendered image, so the slide is
    ``(n * width, n * height)`` px without a gigapixel array in memory.
    """
    from slidestream.demo_slide import render_demo_image
    from slidestream.wsi.synthetic import write_pyramidal_tiff

    rgb, _ = render_demo_image(spec)
    height, width = rgb.shape[:2]
    if width % 256 or height % 256:
        raise SystemExit(f"--mosaic needs --width/--height multiples of 256, got {width}x{height}")

    def tile(x: int, y: int, w: int, h: int) -> Any:
        bx, by = x % width, y % height
        return rgb[by : by + h, bx : bx + w]

    write_pyramidal_tiff(
        path,
        tile,
        mpp=spec.mpp,
        tile_size=256,
        compression="jpeg",
        vendor_style="aperio",
        size=(n * width, n * height),
    )


if __name__ == "__main__":
    main()
