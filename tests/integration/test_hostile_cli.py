"""Issue 21: the fault-injection suite. Real ``slidestream run`` processes under hostile use.

Each case states what it expects and checks it: the exit code, the console output (the summary
or one error line, never a traceback), no staging folder (``.NAME.partial``) or lock file left,
no process of the run left alive, and database rows equal to the results on disk. Slides are
small generated ones analysed with the classical nucleus model. Every process a test starts is
in its own process group, killed at the end of the test whatever happened.

The table of cases is in ``docs/hostile-use.md``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from slidestream.demo_slide import DemoSlideSpec, write_demo_slide

pytestmark = pytest.mark.slow

SMALL = DemoSlideSpec(width_px=1024, height_px=768, mpp=0.5, seed=8)
OTHER = DemoSlideSpec(width_px=1024, height_px=768, mpp=0.5, seed=9)
#: Large enough that a run is still busy with it tens of seconds after its start.
BIG = DemoSlideSpec(width_px=4096, height_px=3072, mpp=0.5, seed=3)
CLASSICAL = ["--nuclei-model", "classical", "--no-progress"]
PG = ("127.0.0.1", 5432)


# --------------------------------------------------------------------------- helpers


def _group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


class Runs:
    """Starts CLI processes (each its own process group) and kills what is left at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "SLIDESTREAM_DB"}
        log = (self.tmp / f"run{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "slidestream", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=self.tmp,
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log_path).read_text(encoding="utf-8")  # type: ignore[attr-defined]

    def run(self, *args: str, timeout: float = 300) -> tuple[int, str]:
        proc = self.start(*args)
        proc.wait(timeout=timeout)
        self.assert_no_orphans(proc)
        return proc.returncode, self.output(proc)

    def assert_no_orphans(self, proc: subprocess.Popen[bytes], within_s: float = 5.0) -> None:
        deadline = time.monotonic() + within_s
        while _group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _group_members(proc.pid)
        assert not left, f"processes of the run still alive {within_s:g} s after it: {left}"

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    r = Runs(tmp_path)
    try:
        yield r
    finally:
        r.close()


def _no_traceback(output: str) -> None:
    assert "Traceback" not in output, output


def _no_leftovers(out: Path) -> None:
    left = [p.name for p in out.rglob(".*") if p.name.endswith((".partial", ".lock", ".tmp"))]
    assert not left, f"left in {out}: {left}"


def _summaries(out: Path) -> set[str]:
    return {p.parent.name for p in out.glob("*/summary.json")}


def _succeeded_runs(url: str) -> set[str]:
    """Slide names with a succeeded run in the database (each at most once)."""
    from sqlalchemy import select

    from slidestream.db import AnalysisRun, open_database

    engine = open_database(url)
    try:
        with engine.connect() as conn:
            names = conn.execute(
                select(AnalysisRun.slide_name).where(AnalysisRun.status == "succeeded")
            ).scalars()
            listed = list(names)
    finally:
        engine.dispose()
    assert len(listed) == len(set(listed)), f"a result recorded twice: {listed}"
    return set(listed)


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- slides


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good, bad and odd inputs."""
    import tifffile

    from slidestream.wsi.synthetic import write_pyramidal_tiff

    root = tmp_path_factory.mktemp("hostile-slides")
    good = write_demo_slide(root / "good.svs", SMALL)
    other = write_demo_slide(root / "other.svs", OTHER)
    big = write_demo_slide(root / "big" / "big.svs", BIG)
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.svs").write_bytes(b"")
    data = good.read_bytes()
    (bad / "truncated.svs").write_bytes(data[: len(data) // 3])
    (bad / "renamed.svs").write_text("patient list, not a slide\n" * 100)
    corrupt = bytearray(data)
    corrupt[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)
    (bad / "corrupt-tile.svs").write_bytes(bytes(corrupt))
    rgb = np.full((512, 768, 3), 230, np.uint8)
    with tifffile.TiffWriter(bad / "no-mpp.tif") as tif:
        tif.write(rgb, tile=(256, 256), photometric="rgb")
    glass = np.clip(np.random.default_rng(0).normal(242, 2, (768, 1024, 3)), 0, 255)
    write_pyramidal_tiff(bad / "white.svs", glass.astype(np.uint8), mpp=0.5, vendor_style="aperio")
    huge = bad / "huge.tif"
    tifffile.imwrite(huge, rgb[:256, :256], tile=(256, 256), photometric="rgb")
    with tifffile.TiffFile(huge, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(2**31 - 1)
        tif.pages[0].tags["ImageLength"].overwrite(2**31 - 1)
    odd = bad / "unicode é and spaces"
    odd.mkdir()
    shutil.copy(other, odd / "slide ü 1.svs")
    return {"good": good, "other": other, "big": big, "bad": bad}


# --------------------------------------------------------------------------- cases that hold


def test_bad_inputs_fail_one_line_each_and_the_batch_goes_on(
    runs: Runs, slides: dict[str, Path], tmp_path: Path
) -> None:
    """Zero-byte, truncated, renamed, corrupt tile, no µm/px, white, huge header, unicode and
    spaces: each gets one line, the good slides are analysed, rows equal results."""
    out = tmp_path / "out"
    code, output = runs.run("run", str(slides["bad"]), str(slides["good"]), "--out", str(out),
                            *CLASSICAL)  # fmt: skip
    _no_traceback(output)
    assert code == 1, output
    failed = {line.split(":")[0].removeprefix("FAILED ") for line in output.splitlines()
              if line.startswith("FAILED ")}  # fmt: skip
    names = {Path(f).name for f in failed}
    assert {"zero.svs", "truncated.svs", "renamed.svs", "no-mpp.tif", "huge.tif"} <= names
    assert any(line.startswith("SKIPPED") and "white.svs" in line for line in output.splitlines())
    assert {"good", "slide ü 1"} <= _summaries(out)
    assert "no-mpp.tif" in output and "--mpp" in output
    _no_leftovers(out)
    rows = (out / "failures.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + len(failed)
    assert _succeeded_runs(f"sqlite:///{out / 'slidestream.db'}") == _summaries(out)


def test_rerun_is_up_to_date_and_force_recomputes_without_a_second_row(
    runs: Runs, slides: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert runs.run("run", str(slides["good"]), "--out", str(out), *CLASSICAL)[0] == 0
    code, output = runs.run("run", str(slides["good"]), "--out", str(out), *CLASSICAL)
    assert code == 0 and "1 up to date" in output, output
    code, output = runs.run("run", str(slides["good"]), "--out", str(out), "--force", *CLASSICAL)
    assert code == 0 and "1 slide(s) analysed" in output, output
    assert _succeeded_runs(f"sqlite:///{out / 'slidestream.db'}") == {"good"}
    _no_leftovers(out)


# --------------------------------------------------------------------------- interruption


def _start_big(runs: Runs, slides: dict[str, Path], out: Path) -> subprocess.Popen[bytes]:
    proc = runs.start("run", str(slides["big"]), "--out", str(out), *CLASSICAL)
    # Mid-slide: its staging folder exists and its workers run.
    _wait_for(lambda: (out / ".big.partial").is_dir(), 240, "the slide's staging folder")
    time.sleep(2.0)
    assert proc.poll() is None, runs.output(proc)
    return proc


@pytest.mark.parametrize(("signum", "target"), [(signal.SIGINT, "group"), (signal.SIGTERM, "main")])
def test_interrupt_stops_workers_removes_staging_one_line(
    runs: Runs, slides: dict[str, Path], tmp_path: Path, signum: int, target: str
) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) and SIGTERM to the main process only."""
    out = tmp_path / "out"
    proc = _start_big(runs, slides, out)
    assert len(_group_members(proc.pid)) >= 2  # the main process and its workers
    t0 = time.monotonic()
    if target == "group":
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    proc.wait(timeout=30)
    assert time.monotonic() - t0 < 10
    runs.assert_no_orphans(proc, within_s=5.0)
    output = runs.output(proc)
    _no_traceback(output)
    assert proc.returncode == 128 + signum, output
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "interrupted" in lines[0], output
    _no_leftovers(out)
    assert not (out / "big").exists()


def test_kill_9_then_rerun_recovers(runs: Runs, slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _start_big(runs, slides, out)
    assert (out / ".big.lock").is_file()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what kill -9 leaves behind is not tested here
    code, output = runs.run("run", str(slides["big"]), "--out", str(out), *CLASSICAL)
    _no_traceback(output)
    assert code == 0 and "1 slide(s) analysed" in output, output
    _no_leftovers(out)
    assert _succeeded_runs(f"sqlite:///{out / 'slidestream.db'}") == {"big"}


# --------------------------------------------------------------------------- concurrent runs


def test_same_slide_started_twice_is_analysed_once(
    runs: Runs, slides: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = _start_big(runs, slides, out)
    code, output = runs.run("run", str(slides["big"]), "--out", str(out), *CLASSICAL)
    _no_traceback(output)
    assert code == 0, output
    if "1 up to date" not in output:  # a fast machine may finish the first run meanwhile
        assert "1 being analysed by another run" in output, output
        assert f"pid {first.pid}" in output and ".big.lock" in output
    first.wait(timeout=300)
    runs.assert_no_orphans(first)
    assert first.returncode == 0, runs.output(first)
    _no_leftovers(out)
    assert _summaries(out) == {"big"}
    assert _succeeded_runs(f"sqlite:///{out / 'slidestream.db'}") == {"big"}


def test_second_run_keeps_the_first_runs_failures(
    runs: Runs, slides: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    bad = slides["bad"] / "zero.svs"
    assert runs.run("run", str(bad), "--out", str(out), *CLASSICAL)[0] == 1
    code, output = runs.run("run", str(slides["good"]), "--out", str(out), *CLASSICAL)
    assert code == 0, output
    rows = (out / "failures.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 2 and "zero.svs" in rows[1]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_writers_lose_no_row(
    runs: Runs, slides: dict[str, Path], tmp_path: Path, backend: str
) -> None:
    url = f"sqlite:///{tmp_path / 'cohort.db'}" if backend == "sqlite" else _pg_database()
    try:
        procs = []
        for name in ("good", "other"):
            out = str(tmp_path / name)
            procs.append(
                runs.start("run", str(slides[name]), "--out", out, "--db", url, *CLASSICAL)
            )
        for proc in procs:
            proc.wait(timeout=300)
            assert proc.returncode == 0, runs.output(proc)
        assert _succeeded_runs(url) == {"good", "other"}
    finally:
        if backend == "postgresql":
            _drop_pg_database(url)


# --------------------------------------------------------------------------- database outages


def _pg_admin_url(database: str = "test") -> str:
    return f"postgresql+psycopg://postgres@{PG[0]}:{PG[1]}/{database}"


def _pg_database() -> str:
    """A fresh PostgreSQL database (skips when no server answers)."""
    from sqlalchemy import create_engine, text

    try:
        socket.create_connection(PG, timeout=1.0).close()
    except OSError:
        pytest.skip(f"PostgreSQL not reachable on {PG[0]}:{PG[1]}")
    name = f"slidestream_hostile_{secrets.token_hex(4)}"
    admin = create_engine(_pg_admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return _pg_admin_url(name)


def _drop_pg_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    name = url.rsplit("/", 1)[1]
    admin = create_engine(_pg_admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


class _Proxy:
    """A TCP proxy to PostgreSQL that can be "switched off" (the server going down)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(PG)
            except OSError:
                return
            with self.lock:
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def test_unreachable_or_unparsable_database_fails_before_any_work(
    runs: Runs, slides: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    for url in (
        "postgresql+psycopg://lab:pw1@127.0.0.1:1/cohort?password=pw2&connect_timeout=3",
        "postgres ql://nonsense",
    ):
        code, output = runs.run("run", str(slides["good"]), str(slides["other"]), "--out",
                                str(out), "--db", url, *CLASSICAL)  # fmt: skip
        _no_traceback(output)
        assert code == 1, output
        assert len(output.strip().splitlines()) == 1 and output.startswith("Error: "), output
        assert "pw1" not in output and "pw2" not in output
        assert not _summaries(out)


def test_database_down_mid_batch_every_slide_analysed_then_reconciled(
    runs: Runs, slides: dict[str, Path], tmp_path: Path
) -> None:
    url = _pg_database()
    proxy = _Proxy()
    try:
        out = tmp_path / "out"
        through_proxy = url.replace(f":{PG[1]}/", f":{proxy.port}/")
        proc = runs.start("run", str(slides["good"]), str(slides["other"]), "--out", str(out),
                          "--db", through_proxy, *CLASSICAL)  # fmt: skip
        _wait_for(lambda: (out / "good" / "summary.json").is_file(), 240, "the first slide")
        proxy.stop()  # the server goes down after slide 1
        proc.wait(timeout=300)
        output = runs.output(proc)
        _no_traceback(output)
        assert proc.returncode == 1, output
        assert _summaries(out) == {"good", "other"}  # never stops half-way
        assert output.count("DATABASE ERROR") == 1 and "db sync" in output, output
        assert "good" not in _succeeded_runs(url) or "other" not in _succeeded_runs(url)
        # The server is back: a rerun records what is on disk and missing in the database.
        code, output = runs.run("run", str(slides["good"]), str(slides["other"]), "--out",
                                str(out), "--db", url, *CLASSICAL)  # fmt: skip
        assert code == 0 and "2 up to date" in output and "recorded now" in output, output
        assert _succeeded_runs(url) == _summaries(out)
        code, output = runs.run("db", "sync", str(out), "--db", url)
        assert code == 0 and "2 result(s), 0 recorded now" in output, output
        # db sync of a folder into another (empty) database records everything once.
        other_db = f"sqlite:///{tmp_path / 'copy.db'}"
        assert "2 recorded now" in runs.run("db", "sync", str(out), "--db", other_db)[1]
        assert "0 recorded now" in runs.run("db", "sync", str(out), "--db", other_db)[1]
        assert _succeeded_runs(other_db) == _summaries(out)
    finally:
        proxy.stop()
        _drop_pg_database(url)
