"""Benchmark: cohort queries, slide-list pages, exports and writes at 100,000-1,000,000 slides.

Fills an SQLite file and a PostgreSQL database with a synthetic cohort (``bench/_db_fill.py``:
8 tissue classes per run, 5 metadata keys, superseded and failed runs, NULL statistics and QC
flags; bulk ``COPY``/``executemany``, not ``record_run``), then times on each backend:

* the cohort query ``by diagnosis, class tumour, metric nuclei_per_mm2`` (targets: < 100 ms at
  100,000 slides on both backends, < 500 ms at 1,000,000 on PostgreSQL);
* a two-metric grouped query with a filter (``by diagnosis, site; where stage in III, IV;
  nuclei_per_mm2 and tissue_area_mm2``);
* the first page (100 slides) of the slide list by name and by ``nuclei_per_mm2`` descending,
  a deep page (keyset ``after`` vs ``offset``), and ``count_slides`` (target: < 100 ms at
  1,000,000);
* a full CSV export through ``slidestream query --slides --format csv`` in a subprocess
  (target: >= 50,000 slides/s with flat memory: its peak RSS against a one-page query's);
* ``record_run`` per slide on the filled database (target: <= 20 ms), and 4 concurrent writer
  processes (checked: nothing lost, one latest run per slide); the written slides are deleted
  afterwards, so kept databases stay reusable.

With ``--baseline REV`` the ``query_cohort`` of ``db/_query.py`` (with the column check of
``db/_columns.py``) at git revision REV runs on the same database, side by side, and its
results are compared with the current ones. On PostgreSQL the
plans are printed with ``EXPLAIN (ANALYZE, BUFFERS)``.

Kept databases (``--sqlite FILE``, ``--pg-database NAME``) are filled once and reused when they
already hold the cohort::

    .venv/bin/python bench/db_query.py --slides 100000 --baseline 041ab92
    .venv/bin/python bench/db_query.py --slides 1000000 --sqlite /tmp/bench1m.db \\
        --pg-database bench1m
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db_fill import fill

from slidestream.db import (
    Slide,
    count_slides,
    current_revision,
    head_revision,
    iter_slide_csv,
    iter_slide_table,
    iter_slides,
    mask_url,
    open_database,
    query_cohort,
    record_run,
    recorded_type_names,
    slide_page,
    slide_table_columns,
)
from slidestream.db._cohort_scan import postgres_statement
from slidestream.db._cohort_values import COHORT as COHORT_VALUES
from slidestream.db._query import packed_query
from slidestream.db._slide_table import _statements as _table_statements
from slidestream.db._slides import _filters, _valued_select

REPO = Path(__file__).resolve().parent.parent
COHORT = {"by": ["diagnosis"], "tissue_class": "tumour", "metrics": ["nuclei_per_mm2"]}
TWO_METRICS = {
    "by": ["diagnosis", "site"],
    "where": {"stage": ["III", "IV"]},
    "metrics": ["nuclei_per_mm2", "tissue_area_mm2"],
}


def _time(func: Callable[[], object], repeat: int) -> tuple[float, float, float, Any]:
    """Median and max wall time and median client CPU time (ms), and the last result.

    The CPU time is this process's only: all of SQLite's work, none of PostgreSQL's server.
    """
    func()  # warm-up (connection pool, caches)
    times, cpu = [], []
    result: Any = None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = func()
        times.append((time.perf_counter() - start) * 1000.0)
        cpu.append((time.process_time() - start_cpu) * 1000.0)
    return statistics.median(times), max(times), statistics.median(cpu), result


def _same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    """Same groups, counts and None; numbers equal to 1e-12 (summation order)."""
    if len(got) != len(want):
        return False
    for g, w in zip(got, want, strict=True):
        if list(g) != list(w):
            return False
        for key, value in w.items():
            if isinstance(value, float):
                if not math.isclose(g[key], value, rel_tol=1e-12, abs_tol=1e-9):
                    return False
            elif g[key] != value:
                return False
    return True


def _line(label: str, timing: tuple[float, float, float, Any], target_ms: float | None) -> str:
    median, worst, cpu, _ = timing
    verdict = ""
    if target_ms is not None:
        verdict = f" [{'OK' if median < target_ms else 'MISSED'} < {target_ms:g} ms]"
    return (
        f"  {label}: median {median:.1f} ms (client CPU {cpu:.1f} ms), max {worst:.1f} ms{verdict}"
    )


def _load_old(revision: str, path: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = f"baseline_{Path(path).stem}_{revision}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def _baseline_module(revision: str) -> ModuleType:
    """``db/_query.py`` as of ``revision`` (loaded from git), as a module, with the column
    check (``db/_columns.py``) of the same revision."""
    module = _load_old(revision, "db/_query.py")
    module.check_columns = _load_old(revision, "db/_columns.py").check_columns
    return module


def _slide_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Slide)).scalar_one())


def _prepare(url: str, n_slides: int) -> tuple[Engine, str]:
    engine = open_database(url, create=True)
    existing = _slide_count(engine)
    if existing == n_slides:
        return engine, f"reused ({n_slides} slides)"
    if existing:
        engine.dispose()
        raise SystemExit(
            f"{mask_url(url)} holds {existing} slides, not {n_slides}: pass another database"
        )
    start = time.perf_counter()
    fill(engine, n_slides)
    return engine, f"filled in {time.perf_counter() - start:.0f} s"


def _summary(n_slides: int, index: int, parameters_hash: str) -> dict[str, Any]:
    """A summary.json of the write benchmark (fingerprints ``bench-write-*``)."""
    classes = ("tumour", "stroma", "necrosis", "lymphocytes", "mucosa", "muscle", "fat", "other")
    area = {"mean": 41.0, "median": 38.0, "q1": 29.0, "q3": 52.0}
    stats: dict[str, Any] = {"nucleus_count": 4000, "nuclei_per_mm2": 2000.0 + index}
    stats |= {"nucleus_area_um2": area, "mean_hematoxylin_od": 0.4}
    # The 4 nucleus types of the shipped model, over the tissue and in each class (36 rows).
    shares = {"epithelial": 0.45, "inflammatory": 0.3, "spindle": 0.2, "other": 0.05}
    types = {
        t: {
            "nucleus_count": int(4000 * f),
            "fraction": f,
            "nuclei_per_mm2": 2000.0 * f,
            "nucleus_area_um2": area,
            "eccentricity": {"mean": 0.7, "median": 0.72, "q1": 0.6, "q3": 0.8},
            "mean_hematoxylin_od": 0.4,
        }
        for t, f in shares.items()
    }
    stats |= {"types": types, "inflammatory_epithelial_ratio": 0.3 / 0.45}
    return {
        "schema": "slidestream.summary/1",
        "slide": {
            "name": f"bench-write-{index}",
            "path": f"/bench/bench-write-{index}.svs",
            "fingerprint": f"bench-write-{n_slides}-{index}",
            "vendor": "aperio",
            "width": 90000,
            "height": 60000,
            "mpp_x": 0.2527,
            "mpp_y": 0.2527,
            "objective_power": 40.0,
        },
        "statistics": {
            "tissue_area_mm2": 150.0,
            **stats,
            "classes": {c: {"area_mm2": 10.0, "fraction": 0.125, **stats} for c in classes},
        },
        "provenance": {
            "software_version": "0.1.0",
            "models": {"nuclei": {"name": "nuclei-v1", "sha256": "a" * 64, "mpp": 0.5}},
            "parameters": {"tile_size_px": 512},
            "parameters_hash": parameters_hash,
            "timings_s": {"total": 90.0},
            "started_at": "2026-06-01T12:00:00+00:00",
            "finished_at": "2026-06-01T12:01:30+00:00",
        },
        "outputs": {"summary_json": "summary.json"},
    }


def _writer(url: str, n_slides: int, worker: int, per_worker: int, queue: Any) -> None:
    engine = open_database(url)
    try:
        for k in range(per_worker):
            index = 1_000_000 + worker * per_worker + k
            record_run(engine, _summary(n_slides, index, "c" * 64))
            record_run(engine, _summary(n_slides, index, "c" * 64))  # the same run: a no-op
    finally:
        engine.dispose()
    queue.put(worker)


def _delete_written(engine: Engine, n_slides: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("DELETE FROM slides WHERE fingerprint LIKE :pattern"),
            {"pattern": f"bench-write-{n_slides}-%"},
        )
        conn.execute(text("DELETE FROM analysis_runs WHERE slide_id IS NULL"))


def _writes(engine: Engine, url: str, n_slides: int, n_writes: int) -> list[str]:
    _delete_written(engine, n_slides)
    times = []
    for index in range(n_writes):
        # Half of the slides are recorded twice with other parameters: the second run
        # supersedes the first (pointer and latest flags move).
        summary = _summary(n_slides, index % (n_writes // 2 or 1), f"{index:064x}")
        start = time.perf_counter()
        record_run(engine, summary)
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    median, p95 = statistics.median(times), times[int(0.95 * (len(times) - 1))]
    lines = [
        f"  record_run (8 classes, 4 types) x {n_writes} on the filled database: "
        f"median {median:.1f} ms,"
        f" p95 {p95:.1f} ms per slide [{'OK' if median <= 20 else 'MISSED'} <= 20 ms]"
    ]
    _delete_written(engine, n_slides)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers, per_worker = 4, 25
    engine.dispose()
    start = time.perf_counter()
    procs = [
        ctx.Process(target=_writer, args=(url, n_slides, w, per_worker, queue))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    done = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    elapsed = time.perf_counter() - start
    pattern = {"pattern": f"bench-write-{n_slides}-1%"}
    with engine.connect() as conn:
        slides = conn.execute(
            text("SELECT count(*) FROM slides WHERE fingerprint LIKE :pattern"), pattern
        ).scalar_one()
        runs = conn.execute(
            text(
                "SELECT count(*) FROM analysis_runs r JOIN slides s ON s.id = r.slide_id "
                "WHERE s.fingerprint LIKE :pattern"
            ),
            pattern,
        ).scalar_one()
        latest = conn.execute(
            text(
                "SELECT count(*) FROM class_statistics c JOIN slides s ON s.id = c.slide_id "
                "WHERE s.fingerprint LIKE :pattern AND c.latest AND c.run_id = s.latest_run_id"
            ),
            pattern,
        ).scalar_one()
        packed = conn.execute(
            text(
                "SELECT count(*) FROM cohort_values c JOIN slides s ON s.id = c.slide_id "
                "WHERE s.fingerprint LIKE :pattern AND c.run_id = s.latest_run_id"
            ),
            pattern,
        ).scalar_one()
    expected = workers * per_worker
    ok = done == list(range(workers)) and slides == runs == expected and latest == 8 * expected
    ok = ok and packed == 9 * expected
    lines.append(
        f"  {workers} concurrent writers x {per_worker} slides (each recorded twice): "
        f"{elapsed:.1f} s, {slides} slides, {runs} runs, {latest} latest class rows, "
        f"{packed} cohort_values rows of the latest runs "
        f"[{'OK: nothing lost' if ok else 'LOST OR DUPLICATED ROWS'}]"
    )
    _delete_written(engine, n_slides)
    return lines


def _export(url: str, n_slides: int) -> list[str]:
    """Run the CLI export (by name, by id) and a one-page query in subprocesses."""
    import resource

    cli = [str(Path(sys.executable).parent / "slidestream"), "query", "--db", url, "--slides"]
    cli += ["--format", "csv", "--include-flagged"]
    runs = {}
    for label, extra in (
        ("page", ["--limit", "100"]),
        ("name", []),
        ("id", ["--sort", "id"]),
    ):
        start = time.perf_counter()
        with Path(os.devnull).open("w") as sink:
            proc = subprocess.run(
                [*cli, *extra], stdout=sink, stderr=subprocess.PIPE, text=True, check=False
            )
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            return [f"  export failed: {proc.stderr.strip().splitlines()[-1:]}"]
        # The largest peak RSS of the children waited for so far (a running maximum).
        runs[label] = (elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0)
    page_s, page_mib = runs["page"]
    lines = []
    for label in ("name", "id"):
        export_s, peak_mib = runs[label]
        # The one-page command is the start-up (imports, schema check); the rest is the export.
        rate = n_slides / max(export_s - page_s, 1e-3)
        lines.append(
            f"  CSV export of all {n_slides} slides by {label} (query --slides --format csv"
            f"{' --sort id' if label == 'id' else ''} > /dev/null): {export_s:.1f} s, of which "
            f"{page_s:.1f} s start-up: {rate:,.0f} slides/s "
            f"[{'OK' if rate >= 50_000 else 'MISSED'} >= 50,000/s]; peak RSS so far "
            f"{peak_mib:.0f} MiB (one-page query: {page_mib:.0f} MiB)"
        )
    return lines


def _export_in_process(engine: Engine, n_slides: int, baseline: str | None) -> list[str]:
    """The CSV export in this process, before and after (side by side, one database).

    Before: what ``query --slides --format csv`` did until the export had its own query: one
    :class:`~slidestream.db.SlideRow` per slide (:func:`iter_slides`) and one cell at a time,
    floats as ``%.6g``; with ``baseline``, also :func:`iter_slide_table` of that revision
    (``db/_slide_table.py`` loaded from git, when that revision has it). After:
    :func:`iter_slide_table` batches into ``csv.writer``, and :func:`iter_slide_csv` (the
    CLI's path: on PostgreSQL ``COPY`` writes the CSV). By name, and (the table exports) by id.
    """
    import csv

    types = recorded_type_names(engine)
    columns = slide_table_columns(types)

    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)

    def before() -> int:
        writer, n = csv.writer(sink, lineterminator="\n"), 0
        for slide in iter_slides(engine):
            row = []
            for column in columns:
                if column == "flags":
                    row.append(",".join(slide.flags))
                elif column == "metadata":
                    row.append(";".join(f"{k}={v}" for k, v in slide.metadata.items()))
                elif column in slide.statistics or column.endswith("_per_mm2"):
                    row.append(cell(slide.statistics.get(column)))
                else:
                    row.append(cell(getattr(slide, column)))
            writer.writerow(row)
            n += 1
        return n

    def table(export: Callable[..., Any], sort: str) -> Callable[[], int]:
        def run() -> int:
            writer, n = csv.writer(sink, lineterminator="\n"), 0
            for batch in export(engine, type_names=types, sort=sort):
                writer.writerows(batch)
                n += len(batch)
            return n

        return run

    def text(sort: str) -> Callable[[], int]:
        def run() -> int:
            lines = 0
            with Path(os.devnull).open("wb") as out:
                for chunk in iter_slide_csv(engine, type_names=types, sort=sort):
                    out.write(chunk)
                    lines += chunk.count(b"\n")
            return lines - 1  # the header (no cell has a line break here)

        return run

    runs: list[tuple[str, Callable[[], int]]] = [("by name, before (SlideRow cells)", before)]
    old = None
    if baseline:
        try:
            old = _load_old(baseline, "db/_slide_table.py").iter_slide_table
        except subprocess.CalledProcessError:  # a revision before the table export
            old = None
    for sort in ("name", "id"):
        if old is not None:
            runs.append((f"by {sort}, before ({baseline} iter_slide_table)", table(old, sort)))
        runs.append((f"by {sort}, after (iter_slide_table rows)", table(iter_slide_table, sort)))
        runs.append((f"by {sort}, after (iter_slide_csv, what the CLI writes)", text(sort)))
    lines = []
    for label, run in runs:
        start, start_cpu = time.perf_counter(), time.process_time()
        with Path(os.devnull).open("w") as sink:
            n = run()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        assert n == n_slides, (label, n)
        lines.append(
            f"  CSV export in-process {label}: {wall:.2f} s (client CPU {cpu:.2f} s), "
            f"{n / wall:,.0f} slides/s"
        )
    return lines


def _explain(engine: Engine, baseline: ModuleType | None) -> list[str]:
    lines = []
    statements = []
    with engine.connect() as conn:
        for query in (COHORT, TWO_METRICS):
            packed = packed_query(
                conn,
                by=query["by"],
                tissue_class=query.get("tissue_class"),
                where=query.get("where", {}),
                include_flagged=False,
            )
            assert packed.codes is not None
            stmt = postgres_statement(
                packed.codes,
                [COHORT_VALUES.c[m] for m in query["metrics"]],
                packed.source,
                packed.conditions,
                grouped=True,
            )
            statements.append((f"cohort {query}", stmt))
            if baseline is not None:
                stats, source, group_cols, conditions = baseline._cohort_parts(
                    by=query["by"],
                    tissue_class=query.get("tissue_class"),
                    where=query.get("where", {}),
                    include_flagged=False,
                )
                old = baseline._summary_select(
                    stats, source, group_cols, conditions, query["metrics"]
                )
                statements.append((f"before: cohort {query}", old))
    conditions = _filters({}, True)
    for sort, descending in (("name", False), ("nuclei_per_mm2", True)):
        stmt = _valued_select(sort, descending, None, conditions).limit(101)
        statements.append((f"first page, sort {sort}{' desc' if descending else ''}", stmt))
    with engine.connect() as conn:
        (export,) = _table_statements(
            conn,
            type_names=recorded_type_names(engine),
            sort="name",
            descending=False,
            where={},
            include_flagged=True,
        )
    statements.append(("CSV export by name (query --slides --format csv)", export))
    with engine.connect() as conn:
        for label, stmt in statements:
            sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
            lines.append(f"EXPLAIN (ANALYZE, BUFFERS) -- {label}")
            lines += [str(r[0]) for r in conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")]
            lines.append("")
    return lines


def bench(label: str, url: str, args: argparse.Namespace) -> list[str]:
    """Fill (or reuse), then time everything; returns report lines."""
    engine, how = _prepare(url, args.slides)
    lines = [f"{label}: {args.slides} slides x 8 classes, {how}"]
    try:
        if current_revision(engine) != head_revision():  # pragma: no cover - open_database checks
            raise SystemExit("database not at head")
        big = args.slides >= 500_000
        cohort_target = 500.0 if big else 100.0
        timing = _time(lambda: query_cohort(engine, **COHORT), args.repeat)
        n = sum(int(r["n"]) for r in timing[3])
        lines.append(
            _line(f"cohort query (by diagnosis, class tumour; {n} slides)", timing, cohort_target)
        )
        lines.append(
            _line(
                "two-metric query (by diagnosis+site, where stage III/IV)",
                _time(lambda: query_cohort(engine, **TWO_METRICS), args.repeat),
                None,
            )
        )
        if args.baseline:
            old = _baseline_module(args.baseline)
            for query in (COHORT, TWO_METRICS):
                same = _same(query_cohort(engine, **query), old.query_cohort(engine, **query))
                lines.append(
                    f"  results of {query['by']} equal those of {args.baseline}: "
                    f"{'yes' if same else 'NO'}"
                )
            lines.append(
                _line(
                    f"  before ({args.baseline}): cohort query",
                    _time(lambda: old.query_cohort(engine, **COHORT), max(3, args.repeat // 2)),
                    None,
                )
            )
            lines.append(
                _line(
                    f"  before ({args.baseline}): two-metric query",
                    _time(lambda: old.query_cohort(engine, **TWO_METRICS), 3),
                    None,
                )
            )
        page_target = 100.0
        first = _time(lambda: slide_page(engine, limit=100), args.repeat)
        lines.append(_line("first page (100 slides, by name)", first, page_target))
        by_metric = _time(
            lambda: slide_page(engine, limit=100, sort="nuclei_per_mm2", descending=True),
            args.repeat,
        )
        lines.append(_line("first page (100, by nuclei_per_mm2 desc)", by_metric, page_target))
        depth = args.slides // 2
        middle = slide_page(engine, limit=1, offset=depth - 1, sort="nuclei_per_mm2")
        lines.append(
            _line(
                f"page at slide {depth:,} by nuclei_per_mm2 (keyset --after)",
                _time(
                    lambda: slide_page(
                        engine, limit=100, sort="nuclei_per_mm2", after=middle.next_after
                    ),
                    args.repeat,
                ),
                page_target,
            )
        )
        lines.append(
            _line(
                f"page at slide {depth:,} by nuclei_per_mm2 (--offset)",
                _time(
                    lambda: slide_page(engine, limit=100, sort="nuclei_per_mm2", offset=depth), 3
                ),
                None,
            )
        )
        lines.append(_line("count_slides", _time(lambda: count_slides(engine), 3), None))
        if not args.no_export:
            lines += _export_in_process(engine, args.slides, args.baseline)
            lines += _export(url, args.slides)
        if args.writes:
            lines += _writes(engine, url, args.slides, args.writes)
        if engine.dialect.name == "postgresql" and not args.no_explain:
            baseline = _baseline_module(args.baseline) if args.baseline else None
            lines += ["", *_explain(engine, baseline)]
    finally:
        engine.dispose()
    return lines


@contextmanager
def pg_database(admin_url: str, name: str | None) -> Iterator[str]:
    """The URL of database ``name`` (created when missing, kept), or of a temporary one."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    temporary = name is None
    name = name or f"slidestream_bench_{secrets.token_hex(5)}"
    with admin.connect() as conn:
        exists = conn.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
        ).scalar()
        if not exists:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        if temporary:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--sqlite", type=Path, help="Keep the SQLite database in this file.")
    parser.add_argument("--pg-database", help="Keep the PostgreSQL database under this name.")
    parser.add_argument(
        "--pg-admin-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="A database to connect to for CREATE/DROP DATABASE.",
    )
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--no-explain", action="store_true")
    parser.add_argument("--writes", type=int, default=200, help="record_run calls to time.")
    parser.add_argument("--baseline", metavar="REV", help="Also time db/_query.py of REV.")
    args = parser.parse_args(argv)
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory(prefix="slidestream-bench-") as tmp:
            path = args.sqlite or Path(tmp) / "bench.db"
            print("\n".join(bench("SQLite", f"sqlite:///{path}", args)), flush=True)
    if not args.no_postgres:
        with pg_database(args.pg_admin_url, args.pg_database) as url:
            label = f"PostgreSQL ({mask_url(url)})"
            print("\n".join(bench(label, url, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
