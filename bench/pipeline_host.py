"""Host-side ceiling of a GPU run: the whole-slide pipeline with instant model forwards.

A GPU makes the networks nearly free; what is left is the host's work: reading and resampling
tiles (reader processes), nucleus post-processing (worker processes) and, in the main process,
batching, inter-process transfers, tissue-class lookup, statistics, GeoJSON + parquet writing
and the overlay. This benchmark measures that work on any machine, without an accelerator:

* the nucleus and tissue models return cached real outputs (computed once per batch shape by
  the real models in a warm-up run), so post-processing still finds realistic nuclei;
* ``analyse_slide`` then runs end to end, exactly as ``slidestream run`` does.

Prints CPU seconds per mm² of tissue for the main thread, the main process and every other
process (from ``/proc/stat``: run it on an otherwise idle machine), and the projected ceiling
``min(1 / main process, (cores - 1) / others)`` mm²/s for hosts with ``--project-cores`` cores
(16 on the H100/H200 device machines). #5's GPU target is >= 4 mm²/s end to end.

Usage: ``python bench/pipeline_host.py [--width 16384 --height 12288] [--postprocess-workers 1]
[--profile host.prof]`` (``--profile``: cProfile of the main thread; it slows that thread, so
its CPU figures are then not comparable).
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import pstats
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def _busy_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (``/proc/stat``, all but idle/iowait)."""
    with Path("/proc/stat").open(encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / 100.0


class _CachedOutputs:
    """Replace ``obj.<name>(batch)`` with the real output for the first batch of each shape."""

    def __init__(self, obj: Any, name: str) -> None:
        self._real = getattr(obj, name)
        self._cache: dict[tuple[int, ...], npt.NDArray[Any]] = {}
        setattr(obj, name, self)

    def __call__(self, batch: Any) -> npt.NDArray[Any]:
        key = tuple(batch.shape)
        if key not in self._cache:
            self._cache[key] = self._real(batch)
        return np.array(self._cache[key], copy=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16384, help="slide width, px")
    parser.add_argument("--height", type=int, default=12288, help="slide height, px")
    parser.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px")
    parser.add_argument("--slide", type=Path, default=None, help="reuse/keep the slide here")
    parser.add_argument("--workers", type=int, default=1, help="tile-reading processes")
    parser.add_argument("--postprocess-workers", type=int, default=1)
    parser.add_argument("--project-cores", type=int, default=16)
    parser.add_argument(
        "--profile", type=Path, default=None, help="write a cProfile of the measured main thread"
    )
    args = parser.parse_args()

    from slidestream.config import RunConfig
    from slidestream.demo_slide import DemoSlideSpec, write_demo_slide
    from slidestream.pipeline import analyse_slide, load_models, postprocess_pool

    with tempfile.TemporaryDirectory(prefix="slidestream-host-") as tmp_s:
        tmp = Path(tmp_s)
        slide = args.slide or tmp / "host-bench.svs"
        if not slide.is_file():
            spec = DemoSlideSpec(width_px=args.width, height_px=args.height, mpp=args.mpp)
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as gen:
                gen.submit(write_demo_slide, slide, spec).result()
        config = RunConfig(
            out_dir=tmp / "out",
            device="cpu",
            workers=args.workers,
            postprocess_workers=args.postprocess_workers,
            show_progress=False,
            db_url=None,
            force=True,
        )
        models = load_models(config)
        _CachedOutputs(models.nuclei, "predict")
        _CachedOutputs(models.tissue, "predict_proba")
        pool = postprocess_pool(args.postprocess_workers)
        try:
            analyse_slide(slide, config, models, pool=pool)  # fills the caches, warms up
            busy0, cpu0, thread0 = _busy_cpu_s(), time.process_time(), time.thread_time()
            profiler = cProfile.Profile() if args.profile else None
            t0 = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            outcome = analyse_slide(slide, config, models, pool=pool)
            if profiler is not None:
                profiler.disable()
            wall = time.perf_counter() - t0
            thread_s = time.thread_time() - thread0
            main_s = time.process_time() - cpu0
            others_s = max(0.0, _busy_cpu_s() - busy0 - main_s)
        finally:
            if pool is not None:
                pool.shutdown()
    if profiler is not None:
        profiler.dump_stats(args.profile)
        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(25)
    assert outcome.summary is not None
    summary = outcome.summary.to_json()
    stats = summary["statistics"]
    mm2 = float(stats["tissue_area_mm2"])
    timings = summary["provenance"]["timings_s"]
    print(
        f"slide {args.width}x{args.height} px at {args.mpp} µm/px: {mm2:.2f} mm² of tissue, "
        f"{stats['nucleus_count']} nuclei; {args.workers} reader(s), "
        f"{args.postprocess_workers} post-processing worker(s)"
    )
    print(
        f"wall {wall:.1f} s = {mm2 / wall:.2f} mm²/s on this machine; stages "
        + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    )
    print(
        f"CPU s per mm²: main thread {thread_s / mm2:.3f}, main process {main_s / mm2:.3f}, "
        f"other processes {others_s / mm2:.3f}"
    )
    ceiling = min(mm2 / main_s, (args.project_cores - 1) * mm2 / max(others_s, 1e-9))
    print(
        f"projected host ceiling with {args.project_cores} cores and instant models: "
        f"{ceiling:.1f} mm²/s (GPU target >= 4)"
    )


if __name__ == "__main__":
    main()
