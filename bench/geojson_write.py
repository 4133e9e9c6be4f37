"""Benchmark the nucleus writers: GeoJSON (.geojson.gz, polygons and points) and parquet.

Synthesises ``--nuclei`` (default 1,000,000) realistic nucleus polygons (ellipses of 4-9 µm
diameter at 0.25 µm/px, ~20 vertices each, with the 13 ``measure_nuclei`` measurements), streamed
as ``NucleusTable`` chunks of ``--chunk`` nuclei so memory stays bounded, and prints nuclei/s of
each writer and the peak resident memory of the process.

``--baseline REF`` also runs the GeoJSON writer of git revision ``REF`` (its ``overlays/`` package,
extracted to a temporary folder), alternating with the current one, for a before/after comparison
on the same machine load. Wall-clock rates depend on free cores (the gzip deflate runs on worker
threads); ``nuclei/CPU-s`` is the steadier figure on a busy machine.

``--typed`` also times the pipeline's one-pass writer (GeoJSON polygons + ``nuclei.parquet``)
without and with nucleus types (a ``type`` column, four ``p_<type>`` measurements, detections
classified by type with the tissue class as metadata), alternating: the cost of the type columns.

Usage: ``python bench/geojson_write.py [--nuclei 1000000] [--chunk 20000] [--out DIR]``
``[--baseline REF] [--typed]``
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from slidestream.overlays import NucleusTable, write_nuclei_geojson, write_nuclei_parquet
from slidestream.overlays._table import invalid_outlines

MEASUREMENTS = (
    "area_um2", "perimeter_um", "equivalent_diameter_um", "major_axis_um", "minor_axis_um",
    "eccentricity", "solidity", "circularity", "mean_r", "mean_g", "mean_b",
    "hematoxylin_od", "eosin_od",
)  # fmt: skip
CLASSES = np.array(["Tumor", "Stroma", "Necrosis", "Unclassified"])
COLORS = {"Tumor": (200, 0, 0), "Stroma": (150, 200, 150), "Necrosis": (50, 50, 50)}


def synth_table(n: int, seed: int, *, vertices: int = 20, mpp: float = 0.25) -> NucleusTable:
    """``n`` ellipse nuclei scattered over a 100,000 px square slide, level-0 px."""
    rng = np.random.default_rng(seed)
    cx = rng.uniform(1_000, 99_000, n)
    cy = rng.uniform(1_000, 99_000, n)
    a = rng.uniform(2.0, 4.5, n) / mpp  # semi-axes, px
    b = a * rng.uniform(0.5, 1.0, n)
    theta = rng.uniform(0, np.pi, n)
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    ex = a[:, None] * np.cos(t)
    ey = b[:, None] * np.sin(t)
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    xs = cx[:, None] + ex * c - ey * s
    ys = cy[:, None] + ex * s + ey * c
    ring = np.stack([xs, ys], axis=2)
    ring = np.concatenate([ring, ring[:, :1]], axis=1)  # close
    coords = ring.reshape(-1, 2)
    offsets = np.arange(n + 1, dtype=np.int64) * (vertices + 1)
    area_um2 = np.pi * a * b * mpp * mpp
    meas = {k: rng.uniform(0.1, 1.0, n) for k in MEASUREMENTS}
    meas["area_um2"] = area_um2
    meas["major_axis_um"] = 2 * a * mpp
    meas["minor_axis_um"] = 2 * b * mpp
    half = np.maximum(a, b)
    # Checked once here, as the stitcher checks every tile in the post-processing workers; the
    # writer then does only its cheap checks (as in the pipeline).
    valid = not invalid_outlines(coords, offsets).any()
    return NucleusTable(
        centroid_x=cx,
        centroid_y=cy,
        bbox_x0=cx - half,
        bbox_y0=cy - half,
        bbox_x1=cx + half,
        bbox_y1=cy + half,
        coords=coords,
        offsets=offsets,
        measurements=meas,
        classes=CLASSES[rng.integers(0, len(CLASSES), n)],
        outlines_valid=valid,
    )


TYPES = np.array(["other", "inflammatory", "epithelial", "spindle"])


def typed(table: NucleusTable, seed: int) -> NucleusTable:
    """``table`` with a type per nucleus and its four type probabilities."""
    from dataclasses import replace

    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(TYPES)), len(table))
    meas = {**table.measurements, **{f"p_{t}": probs[:, i] for i, t in enumerate(TYPES)}}
    return replace(table, measurements=meas).with_types(TYPES[probs.argmax(axis=1)])


def tables(total: int, chunk: int, templates: list[NucleusTable]) -> Iterator[NucleusTable]:
    """Yield ``total`` nuclei as chunks cycling pre-built templates (generation is not timed)."""
    done = 0
    i = 0
    while done < total:
        t = templates[i % len(templates)]
        n = min(chunk, total - done)
        yield t if n == len(t) else t.slice(0, n)
        done += n
        i += 1


def baseline_writer(ref: str, folder: Path) -> Callable[..., int]:
    """``write_nuclei_geojson`` of git revision ``ref``, imported from an extracted copy."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", ref, "overlays"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "overlays").rename(folder / "baseline_overlays")
    sys.path.insert(0, str(folder))
    module: Any = importlib.import_module("baseline_overlays")
    writer: Callable[..., int] = module.write_nuclei_geojson
    return writer


def peak_rss_mib() -> float:
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nuclei", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--baseline", metavar="REF", default=None, help="also run git REF's writer")
    ap.add_argument("--typed", action="store_true", help="time the type columns' cost")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each job (alternating)")
    args = ap.parse_args(argv)
    templates = [synth_table(args.chunk, seed) for seed in range(4)]
    out = args.out or Path(tempfile.mkdtemp(prefix="slidestream-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.nuclei:,} nuclei in chunks of {args.chunk:,}; output in {out}")
    print(f"peak RSS after synthesis: {peak_rss_mib():.0f} MiB; load average {os.getloadavg()}")
    writers: dict[str, Callable[..., int]] = {"": write_nuclei_geojson}
    if args.baseline:
        writers = {f"{args.baseline} ": baseline_writer(args.baseline, out / "baseline"), **writers}
    jobs: dict[str, Callable[[], int]] = {}
    for points in (False, True):
        kind, name = ("points", "points") if points else ("polygons", "nuclei")
        for label, writer in writers.items():
            prefix = label.strip().replace("/", "_") + "-" if label else ""
            jobs[f"{label}geojson.gz {kind}"] = lambda w=writer, f=f"{prefix}{name}", p=points: w(
                out / f"{f}.geojson.gz", tables(args.nuclei, args.chunk, templates),
                id_namespace="bench", class_colors=COLORS, as_points=p,
            )  # fmt: skip
    jobs |= {
        "parquet": lambda: write_nuclei_parquet(
            out / "nuclei.parquet", tables(args.nuclei, args.chunk, templates),
            id_namespace="bench",
        ),
    }  # fmt: skip
    if args.typed:
        typed_templates = [typed(t, i) for i, t in enumerate(templates)]
        jobs = {
            "one pass untyped": lambda: write_nuclei_geojson(
                out / "untyped.geojson.gz", tables(args.nuclei, args.chunk, templates),
                id_namespace="bench", class_colors=COLORS, parquet_path=out / "untyped.parquet",
            ),
            "one pass typed": lambda: write_nuclei_geojson(
                out / "typed.geojson.gz", tables(args.nuclei, args.chunk, typed_templates),
                id_namespace="bench", class_colors=COLORS, parquet_path=out / "typed.parquet",
                classify_by="type",
            ),
        }  # fmt: skip
    width = max(map(len, jobs))
    for name, job in [item for _ in range(args.repeat) for item in jobs.items()]:
        t0, c0 = time.perf_counter(), time.process_time()
        count = job()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"{name:{width}s} {count:>10,} nuclei  "
            f"wall {dt:6.2f} s = {count / dt:>9,.0f} nuclei/s  "
            f"CPU {cpu:6.2f} s = {count / cpu:>9,.0f} nuclei/CPU-s  "
            f"peak RSS {peak_rss_mib():.0f} MiB"
        )
    for f in sorted(out.iterdir()):
        if f.is_file():
            print(f"  {f.name}: {f.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
