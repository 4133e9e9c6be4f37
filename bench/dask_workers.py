"""``run --dask``: a batch of small slides on 1 vs N Dask worker processes (one thread each).

For each worker count, alternated ``--repeats`` times: a ``LocalCluster(processes=True)`` of that
many nanny (daemonic) workers is started, the pre-flight check loads the models on every worker
(timed apart: a long-lived cluster pays it once), then the batch runs (``--force``, so every
slide is analysed). Prints the batch wall time (pre-flight excluded and included), the speed-up
over one worker, each slide's own time and the workers' CPU seconds per slide: when the CPU per
slide stays the same while each slide takes longer, the workers are waiting for cores (shared
with the client, the scheduler and, on a busy machine, other jobs): that is where it stops.

Usage: ``python bench/dask_workers.py [--slides 4] [--workers 1,2] [--repeats 2]
[--nuclei-model default] [--width 1792 --height 1408]``
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path


def _cpu_s() -> float:
    """User + system CPU seconds of this (worker) process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nuclei-model", default="default")
    parser.add_argument("--width", type=int, default=1792)
    parser.add_argument("--height", type=int, default=1408)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from slidestream.config import RunConfig
    from slidestream.demo_slide import DemoSlideSpec, write_demo_slide
    from slidestream.distributed import check_cluster, run_batch_dask

    counts = [int(c) for c in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        root = Path(tmp)
        slides = [
            write_demo_slide(
                root / f"slide{i}.svs",
                DemoSlideSpec(width_px=args.width, height_px=args.height, mpp=0.5, seed=20 + i),
            )
            for i in range(args.slides)
        ]
        print(
            f"{len(slides)} slides of {args.width} x {args.height} px at 0.5 µm/px, nuclei model "
            f"{args.nuclei_model}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}"
        )
        results: dict[int, list[tuple[float, float, list[float], float]]] = {n: [] for n in counts}
        for repeat in range(args.repeats):
            for n in counts:
                out = root / f"out-{n}-{repeat}"
                config = RunConfig(
                    out_dir=out,
                    nuclei_model=args.nuclei_model,
                    show_progress=False,
                    db_url=None,
                    force=True,
                )
                out.mkdir()
                with (
                    LocalCluster(
                        n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
                    ) as cluster,
                    Client(cluster) as client,
                ):
                    t0 = time.perf_counter()
                    check_cluster(client, config, slides, batch=f"warm{n}{repeat}")
                    cpu0 = sum(client.run(_cpu_s).values())
                    t1 = time.perf_counter()
                    outcomes = run_batch_dask(slides, config, scheduler=client)
                    t2 = time.perf_counter()
                    cpu = sum(client.run(_cpu_s).values()) - cpu0
                assert all(o.status == "done" for o in outcomes), [o.reason for o in outcomes]
                per_slide = [o.seconds for o in outcomes]
                results[n].append((t2 - t1, t1 - t0, per_slide, cpu / len(slides)))
                print(
                    f"  repeat {repeat + 1}, {n} worker(s): batch {t2 - t1:.1f} s (models "
                    f"{t1 - t0:.1f} s), per slide {' '.join(f'{s:.1f}' for s in per_slide)} s, "
                    f"workers' CPU {cpu / len(slides):.1f} s/slide, load {os.getloadavg()[0]:.1f}"
                )
        base = statistics.median(r[0] for r in results[counts[0]])
        print(
            "workers | batch s (median) | with models s | per slide s (median) | "
            "worker CPU s/slide | speed-up"
        )
        for n in counts:
            batch = statistics.median(r[0] for r in results[n])
            warm = statistics.median(r[0] + r[1] for r in results[n])
            slide = statistics.median(s for r in results[n] for s in r[2])
            cpu = statistics.median(r[3] for r in results[n])
            print(
                f"{n:7d} | {batch:16.1f} | {warm:13.1f} | {slide:20.1f} | {cpu:18.1f} | "
                f"{base / batch:.2f}x"
            )


if __name__ == "__main__":
    main()
