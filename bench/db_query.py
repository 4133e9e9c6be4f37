"""Benchmark: cohort query over 10,000 slides x 8 tissue classes, SQLite and PostgreSQL.

Fills a temporary SQLite file and a temporary PostgreSQL database (created and dropped here)
with realistic synthetic rows: slides, one succeeded run each (plus a superseded older run for
10 % of them and a failed run for 2 %), slide statistics, 8 tissue classes per run, metadata
(patient_id, diagnosis, site, stage) and QC flags on 1 % of slides. Then times the cohort query
``by diagnosis, class tumour, metric nuclei_per_mm2`` (target: under 200 ms) and the slide list.

Usage::

    .venv/bin/python bench/db_query.py [--slides 10000] [--pg-admin-url URL] [--no-postgres]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from slidestream.db import (
    AnalysisRun,
    Base,
    ClassStatistics,
    QCFlag,
    Slide,
    SlideMetadata,
    SlideStatistics,
    list_slides,
    mask_url,
    open_database,
    query_cohort,
)

CLASSES = ("tumour", "stroma", "necrosis", "lymphocytes", "mucosa", "muscle", "fat", "background")
DIAGNOSES = ("LUAD", "LUSC", "SCLC", "mesothelioma", "metastasis", "normal")
SITES = ("Leeds", "Nijmegen", "Boston", "Heidelberg", "Tokyo")
CHUNK = 5_000


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), CHUNK):
        yield rows[start : start + CHUNK]


def fill(engine: Engine, n_slides: int, seed: int = 0) -> None:
    """Insert the synthetic cohort (bulk Core inserts, one transaction per table chunk)."""
    rng = np.random.default_rng(seed)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    slides, runs, sstats, cstats, meta, flags = [], [], [], [], [], []
    run_id = 0
    for i in range(1, n_slides + 1):
        slides.append(
            {
                "id": i,
                "fingerprint": secrets.token_hex(16),
                "path": f"/archive/{i // 1000:03d}/slide_{i:06d}.svs",
                "name": f"slide_{i:06d}",
                "vendor": "aperio" if i % 3 else "hamamatsu",
                "width": int(rng.integers(40_000, 120_000)),
                "height": int(rng.integers(30_000, 90_000)),
                "mpp_x": 0.2527,
                "mpp_y": 0.2527,
                "objective_power": 40.0,
                "first_seen": now,
                "last_seen": now,
            }
        )
        diagnosis = DIAGNOSES[int(rng.integers(len(DIAGNOSES)))]
        meta += [
            {"slide_id": i, "key": "patient_id", "value": f"P{i // 2:05d}"},
            {"slide_id": i, "key": "diagnosis", "value": diagnosis},
            {"slide_id": i, "key": "site", "value": SITES[int(rng.integers(len(SITES)))]},
            {"slide_id": i, "key": "stage", "value": ("I", "II", "III", "IV")[i % 4]},
        ]
        if i % 100 == 0:
            flags.append({"slide_id": i, "flag": "qc", "reason": "out of focus", "created_at": now})
        n_runs = 2 if i % 10 == 0 else 1
        if i % 50 == 0:
            run_id += 1
            runs.append(_run(run_id, i, "failed", now, None))
        for _ in range(n_runs):
            run_id += 1
            runs.append(_run(run_id, i, "succeeded", now, secrets.token_hex(32)))
            slides[-1]["latest_run_id"] = run_id
            tissue = float(rng.uniform(20, 400))
            fractions = rng.dirichlet(np.ones(len(CLASSES)))
            density = float(rng.lognormal(7.5, 0.4))
            sstats.append(
                {
                    "run_id": run_id,
                    "slide_id": i,
                    "tissue_area_mm2": tissue,
                    "nucleus_count": int(density * tissue),
                    "nuclei_per_mm2": density,
                    "nucleus_area_mean_um2": float(rng.normal(42, 5)),
                    "nucleus_area_median_um2": float(rng.normal(38, 4)),
                    "nucleus_area_q1_um2": 28.0,
                    "nucleus_area_q3_um2": 52.0,
                    "mean_hematoxylin_od": float(rng.uniform(0.2, 0.8)),
                }
            )
            for cls, frac in zip(CLASSES, fractions, strict=True):
                cdens = float(rng.lognormal(8.0 if cls == "tumour" else 7.0, 0.5))
                cstats.append(
                    {
                        "run_id": run_id,
                        "tissue_class": cls,
                        "slide_id": i,
                        "area_mm2": tissue * float(frac),
                        "fraction": float(frac),
                        "nucleus_count": int(cdens * tissue * float(frac)),
                        "nuclei_per_mm2": cdens,
                        "nucleus_area_mean_um2": float(rng.normal(45, 6)),
                        "nucleus_area_median_um2": 40.0,
                        "nucleus_area_q1_um2": 30.0,
                        "nucleus_area_q3_um2": 55.0,
                        "mean_hematoxylin_od": float(rng.uniform(0.2, 0.8)),
                    }
                )
    for model, rows in (
        (Slide, slides),
        (AnalysisRun, runs),
        (SlideStatistics, sstats),
        (ClassStatistics, cstats),
        (SlideMetadata, meta),
        (QCFlag, flags),
    ):
        table = model.__table__
        for chunk in _chunks(rows):
            with engine.begin() as conn:
                conn.execute(table.insert(), chunk)  # type: ignore[attr-defined]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            for table_name in ("slides", "analysis_runs"):
                conn.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table_name}', 'id'), "
                        f"(SELECT max(id) FROM {table_name}))"
                    )
                )
        conn.execute(text("ANALYZE"))


def _run(run_id: int, slide_id: int, status: str, now: datetime, key: str | None) -> dict[str, Any]:
    return {
        "id": run_id,
        "slide_id": slide_id,
        "slide_path": f"/archive/slide_{slide_id:06d}.svs",
        "slide_name": f"slide_{slide_id:06d}",
        "status": status,
        "error": "SlideReadError: corrupt tile" if status == "failed" else None,
        "parameters": {"tile_size_px": 512, "overlap_px": 64, "tile_mpp": 0.5},
        "parameters_hash": secrets.token_hex(32),
        "models": {"nuclei": {"name": "nuclei-v1", "sha256": "a" * 64}},
        "success_key": key,
        "software_version": "0.1.0",
        "started_at": now,
        "finished_at": now + timedelta(seconds=90),
        "recorded_at": now + timedelta(seconds=91),
        "timings": {"total": 90.0},
        "outputs": {"summary_json": "summary.json"},
    }


def _time(func: Callable[[], object], repeat: int) -> tuple[float, float, float, object]:
    """Median and max wall time, median client CPU time (ms), and the last result.

    The CPU time is this process's only (all of SQLite's work, none of PostgreSQL's server);
    it is what the wall time would be on an idle machine, for SQLite.
    """
    func()  # warm-up (connection pool, caches)
    times, cpu = [], []
    result: object = None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = func()
        times.append((time.perf_counter() - start) * 1000.0)
        cpu.append((time.process_time() - start_cpu) * 1000.0)
    return statistics.median(times), max(times), statistics.median(cpu), result


def bench(label: str, url: str, n_slides: int, repeat: int) -> list[str]:
    """Create the schema, fill, time the queries; returns report lines."""
    engine = open_database(url, create=True)
    try:
        start = time.perf_counter()
        fill(engine, n_slides)
        fill_s = time.perf_counter() - start
        cohort_ms, cohort_max, cohort_cpu, rows = _time(
            lambda: query_cohort(
                engine, by=["diagnosis"], tissue_class="tumour", metrics=["nuclei_per_mm2"]
            ),
            repeat,
        )
        two_ms, two_max, two_cpu, _ = _time(
            lambda: query_cohort(
                engine,
                by=["diagnosis", "site"],
                where={"stage": ["III", "IV"]},
                metrics=["nuclei_per_mm2", "tissue_area_mm2"],
            ),
            repeat,
        )
        list_ms, list_max, list_cpu, _ = _time(lambda: list_slides(engine), max(3, repeat // 2))
    finally:
        engine.dispose()
    n = sum(int(r["n"]) for r in rows)  # type: ignore[attr-defined]
    verdict = "OK" if cohort_ms < 200 else "SLOW"
    return [
        f"{label}: {n_slides} slides x {len(CLASSES)} classes filled in {fill_s:.1f} s",
        f"  cohort query (by diagnosis, class tumour, nuclei_per_mm2; {n} slides): "
        f"median {cohort_ms:.1f} ms (client CPU {cohort_cpu:.1f} ms), max {cohort_max:.1f} ms "
        f"[{verdict} < 200 ms]",
        f"  cohort query (by diagnosis+site, where stage in III/IV, 2 metrics): "
        f"median {two_ms:.1f} ms (client CPU {two_cpu:.1f} ms), max {two_max:.1f} ms",
        f"  list_slides (all slides, latest statistics, flags, metadata): "
        f"median {list_ms:.1f} ms (client CPU {list_cpu:.1f} ms), max {list_max:.1f} ms",
    ]


@contextmanager
def temporary_pg_database(admin_url: str) -> Iterator[str]:
    """Create a database ``slidestream_bench_<random>``, yield its URL, drop it."""
    name = f"slidestream_bench_{secrets.token_hex(5)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument(
        "--pg-admin-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="A database to connect to for CREATE/DROP DATABASE.",
    )
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    _ = Base  # the schema comes from the migrations; Base only documents the tables
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="slidestream-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        lines += bench("SQLite", url, args.slides, args.repeat)
        print("\n".join(lines), flush=True)
    if not args.no_postgres:
        try:
            with temporary_pg_database(args.pg_admin_url) as url:
                pg_lines = bench(
                    f"PostgreSQL ({mask_url(args.pg_admin_url)})", url, args.slides, args.repeat
                )
        except Exception as err:  # a benchmark: report and go on
            pg_lines = [f"PostgreSQL skipped: {type(err).__name__}: {err}".splitlines()[0]]
        print("\n".join(pg_lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
