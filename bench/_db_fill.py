"""Synthetic cohorts for ``bench/db_query.py``: bulk fills of a slidestream database.

A cohort of ``n`` slides looks like an archive that was analysed once and partly re-analysed:

* every slide has metadata ``patient_id`` (two slides per patient), ``diagnosis`` (6 values),
  ``site`` (5), ``stage`` (4) and ``sex`` (2), and a random TCGA-like name (so name order is not
  insertion order);
* pass 1 gives every slide a succeeded run (2 % get a failed run first); pass 2, later, re-runs
  10 % of the slides with other parameters (new run ids at the end of the table: the first run
  is *superseded*) and records a failed attempt for another 1 %;
* every succeeded run has slide statistics and 8 tissue classes, and the statistics of the 4
  nucleus types of the shipped model over the whole tissue and in the tumour and stroma classes
  (12 rows; ``record_run`` writes all 8 classes, 36 rows: cut to keep a 1,000,000-slide fill
  within minutes); 1 % of slides have no nuclei (``NULL`` densities and areas), 1 % are
  QC-flagged.

The rows are written in chunks with the fastest bulk path of each backend (PostgreSQL ``COPY``,
SQLite ``executemany`` on the raw connection), never through ``record_run``; the pointer
``slides.latest_run_id`` is set as ``record_run`` would. Afterwards the tables are analysed
(PostgreSQL ``VACUUM ANALYZE``, SQLite ``ANALYZE``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import Engine, text

from slidestream.db._cohort_values import rebuild_cohort_values

CLASSES = ("tumour", "stroma", "necrosis", "lymphocytes", "mucosa", "muscle", "fat", "background")
DIAGNOSES = ("LUAD", "LUSC", "SCLC", "mesothelioma", "metastasis", "normal")
SITES = ("Leeds", "Nijmegen", "Boston", "Heidelberg", "Tokyo")
STAGES = ("I", "II", "III", "IV")
CHUNK_SLIDES = 20_000

_T0 = datetime(2026, 1, 1, tzinfo=UTC)
_PARAMS = json.dumps({"tile_size_px": 512, "overlap_px": 64, "tile_mpp": 0.5})
_MODELS = json.dumps({"nuclei": {"name": "nuclei-v1", "sha256": "a" * 64, "mpp": 0.5}})
_TIMINGS = json.dumps({"total": 90.0})
_OUTPUTS = json.dumps({"summary_json": "summary.json"})

SLIDE_COLS = [
    "id",
    "fingerprint",
    "path",
    "name",
    "vendor",
    "width",
    "height",
    "mpp_x",
    "mpp_y",
    "objective_power",
    "first_seen",
    "last_seen",
    "latest_run_id",
]
RUN_COLS = [
    "id",
    "slide_id",
    "slide_path",
    "slide_name",
    "status",
    "error",
    "parameters",
    "parameters_hash",
    "models",
    "success_key",
    "software_version",
    "started_at",
    "finished_at",
    "recorded_at",
    "timings",
    "outputs",
]
_NUM = [
    "nucleus_count",
    "nuclei_per_mm2",
    "nucleus_area_mean_um2",
    "nucleus_area_median_um2",
    "nucleus_area_q1_um2",
    "nucleus_area_q3_um2",
    "mean_hematoxylin_od",
]
SSTAT_COLS = ["run_id", "slide_id", "latest", "tissue_area_mm2", *_NUM]
CSTAT_COLS = ["run_id", "tissue_class", "slide_id", "latest", "area_mm2", "fraction", *_NUM]
TYPES = ("epithelial", "inflammatory", "spindle", "other")
TYPE_REGIONS = ("", "tumour", "stroma")
"""The whole tissue (``""``) and the classes with type statistics in the fill."""
TSTAT_COLS = [
    "run_id",
    "tissue_class",
    "nucleus_type",
    "slide_id",
    "latest",
    "nucleus_count",
    "fraction",
    "nuclei_per_mm2",
    "nucleus_area_mean_um2",
    "nucleus_area_median_um2",
    "eccentricity_mean",
    "eccentricity_median",
    "mean_hematoxylin_od",
]
META_COLS = ["slide_id", "key", "value"]
FLAG_COLS = ["slide_id", "flag", "reason", "created_at"]


@dataclass(frozen=True, slots=True)
class Chunk:
    """Rows of one chunk of slides, per table (tuples in the column order above)."""

    slides: list[tuple[Any, ...]]
    runs: list[tuple[Any, ...]]
    sstats: list[tuple[Any, ...]]
    cstats: list[tuple[Any, ...]]
    tstats: list[tuple[Any, ...]]
    meta: list[tuple[Any, ...]]
    flags: list[tuple[Any, ...]]


def _hex(rng: np.random.Generator, n: int, n_bytes: int) -> list[str]:
    raw = rng.bytes(n * n_bytes).hex()
    width = 2 * n_bytes
    return [raw[i * width : (i + 1) * width] for i in range(n)]


def _opt(value: float, missing: bool) -> float | None:
    return None if missing else value


def _type_rows(
    rng: np.random.Generator, run_id: int, slide_id: int, *, latest: bool, empty: bool
) -> list[tuple[Any, ...]]:
    """The 4 types' statistics in each region of :data:`TYPE_REGIONS` (counts per 10 mm²)."""
    shares = rng.dirichlet((4.0, 3.0, 2.5, 0.5), size=len(TYPE_REGIONS))
    density = rng.lognormal(7.5, 0.4, size=len(TYPE_REGIONS))
    rows = []
    for r, region in enumerate(TYPE_REGIONS):
        for t, name in enumerate(TYPES):
            dens = float(density[r] * shares[r, t])
            rows.append(
                (
                    run_id,
                    region,
                    name,
                    slide_id,
                    latest,
                    0 if empty else int(dens * 10),
                    _opt(float(shares[r, t]), empty),
                    _opt(round(dens, 1), empty),
                    _opt(40.0 + t, empty),
                    _opt(38.0 + t, empty),
                    _opt(0.7, empty),
                    _opt(0.72, empty),
                    _opt(0.5, empty),
                )
            )
    return rows


def _stats_rows(
    rng: np.random.Generator, run_id: int, slide_id: int, *, latest: bool, empty: bool
) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    tissue = float(rng.uniform(20, 400))
    density = float(rng.lognormal(7.5, 0.4))
    a = rng.normal((42.0, 38.0, 28.0, 52.0), (5.0, 4.0, 3.0, 6.0))
    sstat = (
        run_id,
        slide_id,
        latest,
        tissue,
        0 if empty else int(density * tissue),
        _opt(density, empty),
        *(_opt(float(v), empty) for v in a),
        _opt(float(rng.uniform(0.2, 0.8)), empty),
    )
    fractions = rng.dirichlet(np.ones(len(CLASSES)))
    cdens = rng.lognormal(np.where(np.arange(len(CLASSES)) == 0, 8.0, 7.0), 0.5)
    carea = rng.normal(45.0, 6.0, size=len(CLASSES))
    cod = rng.uniform(0.2, 0.8, size=len(CLASSES))
    cstats = []
    for k, cls in enumerate(CLASSES):
        frac = float(fractions[k])
        # Densities are rounded to 0.1 nuclei/mm², so cohort medians meet ties.
        dens = round(float(cdens[k]), 1)
        cstats.append(
            (
                run_id,
                cls,
                slide_id,
                latest,
                tissue * frac,
                frac,
                0 if empty else int(dens * tissue * frac),
                _opt(dens, empty),
                _opt(float(carea[k]), empty),
                _opt(40.0, empty),
                _opt(30.0, empty),
                _opt(55.0, empty),
                _opt(float(cod[k]), empty),
            )
        )
    return sstat, cstats


def _run(run_id: int, slide_id: int, name: str, status: str, when: datetime) -> tuple[Any, ...]:
    failed = status == "failed"
    return (
        run_id,
        slide_id,
        f"/archive/{name}.svs",
        name,
        status,
        "SlideReadError: corrupt tile at level 0 (31744, 20480)" if failed else None,
        _PARAMS,
        f"{run_id:064x}",
        _MODELS,
        None if failed else f"{run_id:064x}",
        "0.1.0",
        when,
        when + timedelta(seconds=90),
        when + timedelta(seconds=91),
        None if failed else _TIMINGS,
        None if failed else _OUTPUTS,
    )


def chunks(n_slides: int, updates: list[tuple[int, int]], *, seed: int = 0) -> Iterator[Chunk]:
    """The cohort's rows, ``CHUNK_SLIDES`` slides at a time (pass 1, then the re-runs of pass 2).

    Slide ids are 1..n; run ids follow insertion order (pass 2's runs come after all of pass 1).
    ``updates`` receives the ``(run_id, slide_id)`` pointer moves of pass 2 (for
    ``slides.latest_run_id``), complete once the generator is exhausted.
    """
    rng = np.random.default_rng(seed)
    run_id = 0
    latest: dict[int, int] = {}
    rerun = set(range(10, n_slides + 1, 10))
    names: dict[int, str] = {}
    for start in range(1, n_slides + 1, CHUNK_SLIDES):
        ids = range(start, min(start + CHUNK_SLIDES, n_slides + 1))
        fps = _hex(rng, len(ids), 32)
        tags = _hex(rng, len(ids), 3)
        diag = rng.integers(len(DIAGNOSES), size=len(ids))
        site = rng.integers(len(SITES), size=len(ids))
        out = Chunk([], [], [], [], [], [], [])
        for j, i in enumerate(ids):
            name = f"TCGA-{tags[j][:2].upper()}-{tags[j][2:].upper()}-{i:07d}"
            names[i] = name
            when = _T0 + timedelta(minutes=2 * i)
            if i % 50 == 0:
                run_id += 1
                out.runs.append(_run(run_id, i, name, "failed", when))
            run_id += 1
            out.runs.append(_run(run_id, i, name, "succeeded", when))
            first_latest, empty = i not in rerun, i % 100 == 37
            sstat, cstats = _stats_rows(rng, run_id, i, latest=first_latest, empty=empty)
            out.sstats.append(sstat)
            out.cstats.extend(cstats)
            out.tstats.extend(_type_rows(rng, run_id, i, latest=first_latest, empty=empty))
            latest[i] = run_id
            patient = f"P{(i + 1) // 2:07d}"
            out.meta.extend(
                (
                    (i, "patient_id", patient),
                    (i, "diagnosis", DIAGNOSES[int(diag[j])]),
                    (i, "site", SITES[int(site[j])]),
                    (i, "stage", STAGES[(i // 2) % 4]),
                    (i, "sex", "F" if (i // 2) % 2 else "M"),
                )
            )
            if i % 100 == 1:
                out.flags.append((i, "qc", "out of focus", when))
        # Slides of pass 1 that are not re-run point at their only run already.
        for j, i in enumerate(ids):
            out.slides.append(
                (
                    i,
                    fps[j],
                    f"/archive/{names[i]}.svs",
                    names[i],
                    "aperio" if i % 3 else "hamamatsu",
                    int(rng.integers(40_000, 120_000)),
                    int(rng.integers(30_000, 90_000)),
                    0.2527 if i % 3 else 0.2264,
                    0.2527 if i % 3 else 0.2264,
                    40.0 if i % 7 else 20.0,
                    _T0,
                    _T0,
                    latest.get(i),
                )
            )
        yield out
    # Pass 2: re-runs (new parameters) and a few more failures, recorded later.
    later = _T0 + timedelta(days=365)
    pending = Chunk([], [], [], [], [], [], [])
    for i in range(1, n_slides + 1):
        if i % 100 == 3:
            run_id += 1
            pending.runs.append(_run(run_id, i, names[i], "failed", later))
        if i in rerun:
            run_id += 1
            pending.runs.append(_run(run_id, i, names[i], "succeeded", later))
            sstat, cstats = _stats_rows(rng, run_id, i, latest=True, empty=False)
            pending.sstats.append(sstat)
            pending.cstats.extend(cstats)
            pending.tstats.extend(_type_rows(rng, run_id, i, latest=True, empty=False))
            updates.append((run_id, i))
        if len(pending.runs) >= CHUNK_SLIDES // 4 or i == n_slides:
            yield pending
            pending = Chunk([], [], [], [], [], [], [])


def _tables(chunk: Chunk) -> Sequence[tuple[str, list[str], list[tuple[Any, ...]]]]:
    return (
        ("slides", SLIDE_COLS, chunk.slides),
        ("analysis_runs", RUN_COLS, chunk.runs),
        ("slide_statistics", SSTAT_COLS, chunk.sstats),
        ("class_statistics", CSTAT_COLS, chunk.cstats),
        ("type_statistics", TSTAT_COLS, chunk.tstats),
        ("slide_metadata", META_COLS, chunk.meta),
        ("qc_flags", FLAG_COLS, chunk.flags),
    )


def fill(engine: Engine, n_slides: int, *, seed: int = 0) -> None:
    """Bulk-insert the synthetic cohort into an empty database at the head revision.

    The packed cohort table and the metadata dictionaries, which ``record_run`` and the
    metadata import keep, are rebuilt from the filled tables at the end
    (:func:`~slidestream.db._cohort_values.rebuild_cohort_values`).
    """
    if engine.dialect.name == "postgresql":
        _fill_postgres(engine, n_slides, seed)
    else:
        _fill_sqlite(engine, n_slides, seed)


def _fill_postgres(engine: Engine, n_slides: int, seed: int) -> None:
    with engine.connect() as conn:
        raw: Any = conn.connection.driver_connection
        updates: list[tuple[int, int]] = []
        for chunk in chunks(n_slides, updates, seed=seed):
            with raw.cursor() as cur:
                for table, cols, rows in _tables(chunk):
                    if not rows:
                        continue
                    with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
            raw.commit()
        with raw.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE latest_fix (run_id integer, slide_id integer) ON COMMIT DROP"
            )
            with cur.copy("COPY latest_fix FROM STDIN") as copy:
                for row in updates:
                    copy.write_row(row)
            cur.execute(
                "UPDATE slides SET latest_run_id = f.run_id FROM latest_fix f "
                "WHERE slides.id = f.slide_id"
            )
            for table in ("slides", "analysis_runs", "qc_flags"):
                cur.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
        raw.commit()
    with engine.begin() as conn:
        rebuild_cohort_values(conn)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))


def _fill_sqlite(engine: Engine, n_slides: int, seed: int) -> None:
    with engine.connect() as conn:
        raw: Any = conn.connection.driver_connection
        updates: list[tuple[int, int]] = []
        for chunk in chunks(n_slides, updates, seed=seed):
            raw.execute("BEGIN")
            for table, cols, rows in _tables(chunk):
                if rows:
                    marks = ", ".join("?" * len(cols))
                    raw.executemany(
                        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})",
                        [tuple(_sqlite_value(v) for v in row) for row in rows]
                        if table in ("slides", "analysis_runs", "qc_flags")
                        else rows,
                    )
            raw.execute("COMMIT")
        raw.execute("BEGIN")
        raw.executemany("UPDATE slides SET latest_run_id = ? WHERE id = ?", updates)
        raw.execute("COMMIT")
    with engine.begin() as conn:
        rebuild_cohort_values(conn)
        conn.exec_driver_sql("ANALYZE")


def _sqlite_value(value: Any) -> Any:
    # SQLAlchemy stores DateTime on SQLite as 'YYYY-MM-DD HH:MM:SS.ffffff' text.
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    return value
