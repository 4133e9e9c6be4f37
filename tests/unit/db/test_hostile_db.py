"""Issue 21, database side (both backends): bad URLs and files in one line, masked secrets,
reconciling results on disk with rows, unknown query columns, conflicting cohort rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select

from slidestream.cli import cli
from slidestream.db import AnalysisRun, mask_url, open_database, record_if_missing, record_run
from slidestream.db._engine import scrub_credentials
from slidestream.errors import ConfigError, DatabaseError

SECRET = "s3cr3t-Pw"


def _one_line_error(output: str) -> None:
    assert "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1, output
    assert output.startswith("Error: "), output


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            f"postgresql+psycopg://ann@db.example:5432/cohort?password={SECRET}&sslmode=require",
            "postgresql+psycopg://ann@db.example:5432/cohort?password=***&sslmode=require",
        ),
        (
            f"postgresql+psycopg://ann:{SECRET}@db.example/cohort?PASSWORD={SECRET}",
            "postgresql+psycopg://ann:***@db.example/cohort?PASSWORD=***",
        ),
        ("sqlite:///out/slidestream.db", "sqlite:///out/slidestream.db"),
    ],
)
def test_password_in_the_query_string_is_masked(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    if SECRET in url:
        assert SECRET not in scrub_credentials(f"failed for {SECRET}\n\tretry", url)
    assert "\n" not in scrub_credentials("line one\n\tline two", url)


def test_unreachable_server_with_query_password_is_one_masked_line(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://u@127.0.0.1:1/test?password={SECRET}&connect_timeout=2"
    with pytest.raises(DatabaseError) as info:
        open_database(url, create=True)
    assert SECRET not in str(info.value) and "\n" not in str(info.value)
    assert "password=***" in str(info.value)
    result = CliRunner().invoke(cli, ["query", "--db", url])
    assert result.exit_code == 1 and SECRET not in result.output
    _one_line_error(result.output)


def test_sqlite_file_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("these are my notes, not a database\n" * 50)
    for args in (["query"], ["db", "current"], ["db", "upgrade"], ["query", "--slides"]):
        result = CliRunner().invoke(cli, [*args, "--db", f"sqlite:///{bogus}"])
        assert result.exit_code == 1, (args, result.output)
        _one_line_error(result.output)
        assert "not a database" in result.output and str(bogus) in result.output


def test_sqlite_folder_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    url = f"sqlite:///{blocker / 'sub' / 'x.db'}"
    with pytest.raises(DatabaseError, match="a file is in the way"):
        open_database(url, create=True)
    result = CliRunner().invoke(cli, ["db", "upgrade", "--db", url])
    assert result.exit_code == 1
    _one_line_error(result.output)
    missing = CliRunner().invoke(cli, ["query", "--db", f"sqlite:///{tmp_path / 'no' / 'x.db'}"])
    assert missing.exit_code == 1 and "no such database file" in missing.output
    _one_line_error(missing.output)


def _runs(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(AnalysisRun)).scalar_one())


def test_record_if_missing_is_idempotent(engine: Engine, make_summary) -> None:
    summary = make_summary("a")
    assert record_if_missing(engine, summary) is not None
    assert record_if_missing(engine, summary) is None
    assert record_if_missing(engine, summary) is None
    record_run(engine, summary)
    assert _runs(engine) == 1


def test_query_unknown_column_names_it_and_the_known_ones(
    engine: Engine, db_url: str, make_summary, tmp_path: Path
) -> None:
    record_run(engine, make_summary("a"))
    runner = CliRunner()
    before = runner.invoke(cli, ["query", "--db", db_url, "--by", "vendor"])
    assert before.exit_code == 0, before.output
    meta = tmp_path / "m.csv"
    meta.write_text("name,diagnosis\na,LUAD\n", encoding="utf-8")
    assert runner.invoke(cli, ["cohort", "import", str(meta), "--db", db_url]).exit_code == 0
    for args, option in (
        (["--where", "diagnosys=LUAD"], "--where diagnosys"),
        (["--by", "diagnosys"], "--by diagnosys"),
        (["--slides", "--where", "diagnosys=LUAD"], "--where diagnosys"),
        (["--slides", "--limit", "5", "--where", "diagnosys=LUAD"], "--where diagnosys"),
    ):
        result = runner.invoke(cli, ["query", "--db", db_url, *args])
        assert result.exit_code == 1, (args, result.output)
        _one_line_error(result.output)
        assert option in result.output and "no such column" in result.output
        assert "diagnosis" in result.output and "vendor" in result.output
    ok = runner.invoke(cli, ["query", "--db", db_url, "--where", "diagnosis=LUAD"])
    assert ok.exit_code == 0 and "nuclei_per_mm2  1" in ok.output


def test_cohort_import_refuses_conflicting_rows(
    engine: Engine, db_url: str, make_summary, tmp_path: Path
) -> None:
    from slidestream.db import import_metadata_csv

    record_run(engine, make_summary("a"))
    record_run(engine, make_summary("b"))
    meta = tmp_path / "m.csv"
    meta.write_text(
        "name,diagnosis,site\na,LUAD,lung\nb,LUSC,lung\na,LUSC,lung\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError) as info:
        import_metadata_csv(engine, meta)
    message = str(info.value)
    assert "'a'" in message and "'LUAD' (line 2)" in message and "'LUSC' (line 4)" in message
    result = CliRunner().invoke(cli, ["cohort", "import", str(meta), "--db", db_url])
    assert result.exit_code == 1
    _one_line_error(result.output)
    # Nothing was imported: no column "diagnosis" exists now.
    query = CliRunner().invoke(cli, ["query", "--db", db_url, "--by", "diagnosis"])
    assert query.exit_code == 1 and "no such column" in query.output
    # The same value twice is not a conflict; the same slide by path and by name is.
    meta.write_text("name,diagnosis\na,LUAD\na,LUAD\n", encoding="utf-8")
    assert import_metadata_csv(engine, meta).matched_rows == 2
    meta.write_text("slide,diagnosis\n/data/a.svs,LUAD\na,LUSC\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'/data/a.svs' \(= 'a'\)"):
        import_metadata_csv(engine, meta)
    patients = tmp_path / "p.csv"
    patients.write_text("patient_id,sex\np1,F\np1,M\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="patient 'p1' has two values for 'sex'"):
        import_metadata_csv(engine, patients, key="patient")


def test_cohort_import_of_a_cp1252_csv_names_the_line(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    meta = tmp_path / "excel.csv"
    meta.write_bytes("name,site\r\na,Malmö\r\n".encode("cp1252"))
    result = CliRunner().invoke(cli, ["cohort", "import", str(meta), "--db", db_url])
    assert result.exit_code == 1
    _one_line_error(result.output)
    assert "line 2" in result.output and "UTF-8" in result.output
