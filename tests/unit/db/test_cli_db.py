"""The db/cohort/query CLI (CliRunner, both backends)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine

from slidestream.cli import cli
from slidestream.db import record_run

INJECTION = "x'); DROP TABLE slides;--"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def filled(engine: Engine, make_summary, tmp_path: Path) -> Path:
    for name, density in (("a", 100.0), ("b", 300.0), ("c", 700.0)):
        record_run(engine, make_summary(name, nuclei_per_mm2=density))
    meta = tmp_path / "meta.csv"
    meta.write_text(
        f"name,diagnosis\na,LUAD\nb,LUAD\nc,{INJECTION}\nmissing,LUSC\n", encoding="utf-8"
    )
    return meta


def test_db_upgrade_and_current(runner: CliRunner, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'x.db'}"
    result = runner.invoke(cli, ["db", "current", "--db", url])
    assert result.exit_code == 0 and "revision <none>" in result.output
    result = runner.invoke(cli, ["db", "upgrade", "--db", url])
    assert result.exit_code == 0, result.output
    assert "at revision 0005" in result.output
    result = runner.invoke(cli, ["db", "downgrade", "0001", "--yes"], env={"SLIDESTREAM_DB": url})
    assert result.exit_code == 0 and "at revision 0001" in result.output
    result = runner.invoke(cli, ["query", "--db", url])
    assert result.exit_code == 1
    assert f"run `slidestream db upgrade --db {url}`" in result.output


def test_query_needs_a_database(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["query"], env={"SLIDESTREAM_DB": None})
    assert result.exit_code == 2 and "pass --db URL" in result.output


def test_cohort_import_query_flag(runner: CliRunner, db_url: str, filled: Path) -> None:
    result = runner.invoke(cli, ["cohort", "import", str(filled), "--db", db_url])
    assert result.exit_code == 0, result.output
    assert "4 rows, 3 matched" in result.output and "'missing'" in result.output

    result = runner.invoke(cli, ["query", "--db", db_url, "--by", "diagnosis", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {r["diagnosis"]: r for r in json.loads(result.output)}
    assert rows["LUAD"]["n"] == 2 and rows["LUAD"]["mean"] == 200.0
    assert rows[INJECTION]["median"] == 700.0

    args = ["query", "--db", db_url, "--where", f"diagnosis={INJECTION}", "--format", "csv"]
    result = runner.invoke(
        cli, [*args, "--metric", "nuclei_per_mm2", "--metric", "tissue_area_mm2"]
    )
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.output)))
    assert [(r["metric"], r["n"]) for r in table] == [
        ("nuclei_per_mm2", "1"),
        ("tissue_area_mm2", "1"),
    ]

    result = runner.invoke(cli, ["cohort", "flag", "b", "--reason", "folded", "--db", db_url])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["query", "--db", db_url, "--by", "diagnosis", "--class", "tumour"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "diagnosis",
        "tissue_class",
        "metric",
        "n",
        "mean",
        "median",
        "std",
        "q1",
        "q3",
    ]
    assert lines[2].split()[:4] == ["LUAD", "tumour", "nuclei_per_mm2", "1"]

    result = runner.invoke(cli, ["query", "--db", db_url, "--slides", "--format", "json"])
    slides = json.loads(result.output)
    assert [s["name"] for s in slides] == ["a", "c"]
    result = runner.invoke(cli, ["query", "--db", db_url, "--slides", "--include-flagged"])
    assert "folded" not in result.output and "qc" in result.output

    result = runner.invoke(cli, ["cohort", "unflag", "b", "--db", db_url])
    assert result.exit_code == 0 and "1 flag(s) removed" in result.output


def test_query_usage_errors(runner: CliRunner, db_url: str, filled: Path) -> None:
    result = runner.invoke(cli, ["query", "--db", db_url, "--where", "diagnosis"])
    assert result.exit_code == 2 and "COLUMN=VALUE" in result.output
    result = runner.invoke(cli, ["query", "--db", db_url, "--metric", "bogus"])
    assert result.exit_code == 1 and "metric 'bogus' does not exist" in result.output


def test_query_slides_pages_and_streams(runner: CliRunner, db_url: str, filled: Path) -> None:
    base = ["query", "--db", db_url, "--slides", "--include-flagged"]
    result = runner.invoke(cli, [*base, "--limit", "2", "--sort", "nuclei_per_mm2", "--desc"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["c", "b"]
    (hint,) = [line for line in result.stderr.splitlines() if line.startswith("next page:")]
    cursor = hint.split("--after ")[1]
    args = [*base, "--limit", "2", "--sort", "nuclei_per_mm2", "--desc", "--after", cursor]
    result = runner.invoke(cli, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [s["name"] for s in json.loads(result.stdout)] == ["a"]
    assert "next page" not in result.stderr
    result = runner.invoke(cli, [*base, "--limit", "1", "--offset", "1", "--format", "csv"])
    assert [r["name"] for r in csv.DictReader(io.StringIO(result.stdout))] == ["b"]
    # the whole list, streamed
    result = runner.invoke(cli, [*base, "--format", "json", "--sort", "nuclei_per_mm2"])
    assert [s["nuclei_per_mm2"] for s in json.loads(result.stdout)] == [100.0, 300.0, 700.0]
    result = runner.invoke(cli, [*base, "--format", "csv", "--where", "name=b"])
    assert [r["name"] for r in csv.DictReader(io.StringIO(result.stdout))] == ["b"]
    result = runner.invoke(cli, [*base, "--format", "json", "--where", "name=none"])
    assert json.loads(result.stdout) == []


def test_query_slides_csv_export_is_the_pages_csv(
    runner: CliRunner, db_url: str, filled: Path
) -> None:
    # The streamed export (rows built and, on PostgreSQL, written as CSV by the database) and a
    # page (SlideRow cells) agree: the same columns, flags and metadata cells, floats with every
    # digit. On SQLite to the byte; PostgreSQL writes a whole float without ".0".
    result = runner.invoke(cli, ["cohort", "import", str(filled), "--db", db_url])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["cohort", "flag", "b", "--reason", "folded", "--db", db_url])
    assert result.exit_code == 0, result.output
    for extra in ([], ["--sort", "nuclei_per_mm2", "--desc"], ["--where", "diagnosis=LUAD"]):
        base = ["query", "--db", db_url, "--slides", "--format", "csv", "--include-flagged"]
        streamed = runner.invoke(cli, [*base, *extra])
        paged = runner.invoke(cli, [*base, *extra, "--limit", "1000"])
        assert streamed.exit_code == 0 and paged.exit_code == 0, streamed.output + paged.output
        rows = list(csv.DictReader(io.StringIO(streamed.stdout)))
        assert rows and any(r["metadata"] for r in rows)
        if db_url.startswith("sqlite"):
            assert streamed.stdout.rstrip("\n") == paged.stdout.rstrip("\n"), extra
        else:
            page_rows = list(csv.DictReader(io.StringIO(paged.stdout)))
            assert [_values(r) for r in rows] == [_values(r) for r in page_rows], extra
            assert streamed.stdout.splitlines()[0] == paged.stdout.splitlines()[0]
    densities = {float(r["nuclei_per_mm2"]) for r in rows}
    assert densities and all(_shortest(d) in streamed.stdout for d in densities)


def _values(row: dict[str, str]) -> dict[str, str | float]:
    """A CSV row's cells, numbers as floats (``400`` and ``400.0`` are one value)."""
    out: dict[str, str | float] = {}
    for key, cell in row.items():
        try:
            out[key] = float(cell)
        except ValueError:
            out[key] = cell
    return out


def _shortest(value: float) -> str:
    """The shortest text of ``value`` as either backend writes it (``400.0`` or ``400``)."""
    text = repr(value)
    return text.removesuffix(".0")


def test_query_slides_usage_errors(runner: CliRunner, db_url: str, filled: Path) -> None:
    result = runner.invoke(cli, ["query", "--db", db_url, "--limit", "5"])
    assert result.exit_code == 2 and "--limit: only with --slides" in result.output
    result = runner.invoke(cli, ["query", "--db", db_url, "--slides", "--after", "x"])
    assert result.exit_code == 2 and "pass --limit too" in result.output
    result = runner.invoke(cli, ["query", "--db", db_url, "--slides", "--sort", "bogus"])
    assert result.exit_code == 2 and "use one of name, id" in result.output
    args = ["query", "--db", db_url, "--slides", "--limit", "1", "--after", "bad"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 1 and "not a cursor" in result.output
