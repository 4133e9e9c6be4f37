"""Issue 21, application side (fast): slide locks, failures.csv merging, recording through a
database outage, checks before any work, manifest encodings, interrupt signals, file modes."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from slidestream._atomic import file_mode, write_text_atomic
from slidestream.cli import cli
from slidestream.config import RunConfig
from slidestream.errors import ConfigError, DatabaseError, Interrupted
from slidestream.inputs import discover_slides
from slidestream.pipeline import (
    FAILURES_NAME,
    LockOwner,
    Recorder,
    SlideClaim,
    SlideOutcome,
    claim_folder,
    lock_path,
    merge_failures,
    run_batch,
)

# --------------------------------------------------------------------------- slide locks


def test_claim_is_exclusive_and_released(tmp_path: Path) -> None:
    folder = tmp_path / "slide"
    claim = claim_folder(folder)
    assert isinstance(claim, SlideClaim) and lock_path(folder).name == ".slide.lock"
    content = json.loads(lock_path(folder).read_text())
    assert content["pid"] == os.getpid() and content["host"] == socket.gethostname()
    second = claim_folder(folder)
    assert isinstance(second, LockOwner) and second.pid == os.getpid()
    claim.release()
    claim.release()  # idempotent
    assert not lock_path(folder).exists()
    with claim_folder(folder) as again:
        assert isinstance(again, SlideClaim)
    assert not lock_path(folder).exists()
    assert not list(tmp_path.iterdir())  # no temporary file left


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "slide"
    lock_path(folder).write_text(
        json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "claimed_at": "x"})
    )
    claim = claim_folder(folder)
    assert isinstance(claim, SlideClaim)
    claim.release()


def test_lock_of_a_reused_pid_is_stale(tmp_path: Path) -> None:
    """Our own pid with another process start time: the pid was reused after a crash."""
    folder = tmp_path / "slide"
    lock_path(folder).write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "process_start": "1",
                "claimed_at": "",
            }
        )
    )
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("no /proc: process start times unknown")
    assert isinstance(claim_folder(folder), SlideClaim)


def test_lock_of_another_host_or_fresh_unreadable_lock_is_respected(tmp_path: Path) -> None:
    folder = tmp_path / "slide"
    lock_path(folder).write_text(json.dumps({"pid": 1, "host": "other-host", "claimed_at": "t"}))
    owner = claim_folder(folder)
    assert isinstance(owner, LockOwner) and owner.host == "other-host"
    lock_path(folder).write_text("")  # a lock being written by a file system without links
    assert isinstance(claim_folder(folder), LockOwner)
    old = 10_000_000
    os.utime(lock_path(folder), (old, old))
    assert isinstance(claim_folder(folder), SlideClaim)


def test_concurrent_claims_give_one_owner(tmp_path: Path) -> None:
    folder = tmp_path / "slide"
    lock_path(folder).write_text(
        json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "claimed_at": "x"})
    )
    script = (
        "import sys, time; from pathlib import Path; "
        "from slidestream.pipeline import claim_folder, SlideClaim; "
        "c = claim_folder(Path(sys.argv[1])); print(isinstance(c, SlideClaim)); time.sleep(1.5)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    results = [p.communicate(timeout=60)[0].decode().strip() for p in procs]
    assert sorted(results) == ["False", "False", "False", "True"], results


# --------------------------------------------------------------------------- failures.csv


def _failed(path: str, fingerprint: str | None = None) -> SlideOutcome:
    return SlideOutcome(
        path=Path(path),
        slide_name=Path(path).stem,
        status="failed",
        fingerprint=fingerprint,
        parameters_hash="p" * 64,
        reason=f"{path}: broken",
        error_class="SlideOpenError",
    )


def _skipped(path: str, reason: str = "no_tissue", fingerprint: str | None = None) -> Any:
    return SlideOutcome(
        path=Path(path),
        slide_name=Path(path).stem,
        status="skipped",
        skip_reason=reason,  # type: ignore[arg-type]
        fingerprint=fingerprint,
        parameters_hash="p" * 64,
        reason="no tissue",
    )


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / FAILURES_NAME).open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_failures_of_two_runs_are_merged(tmp_path: Path) -> None:
    merge_failures(tmp_path, [_failed("/s/a.svs", "fa"), _failed("/s/b.svs")])
    # A second run into the same folder with other slides keeps the first run's rows.
    merge_failures(tmp_path, [_failed("/s/c.svs"), _skipped("/s/d.svs")])
    assert [Path(r["path"]).name for r in _rows(tmp_path)] == ["a.svs", "b.svs", "c.svs"]
    # A slide that now succeeds (or is skipped on purpose) leaves the list; by fingerprint too.
    merge_failures(tmp_path, [_skipped("/elsewhere/a-copy.svs", fingerprint="fa")])
    merge_failures(tmp_path, [_skipped("/s/b.svs", reason="up_to_date")])
    assert [Path(r["path"]).name for r in _rows(tmp_path)] == ["c.svs"]
    # A slide another run holds the lock of is not "handled": its row stays.
    merge_failures(tmp_path, [_skipped("/s/c.svs", reason="locked")])
    assert len(_rows(tmp_path)) == 1
    # Failing again replaces the row (one row per slide).
    merge_failures(tmp_path, [_failed("/s/c.svs")])
    assert len(_rows(tmp_path)) == 1
    assert merge_failures(tmp_path, [_skipped("/s/c.svs")]) is None
    assert not (tmp_path / FAILURES_NAME).exists()


def test_concurrent_merges_lose_no_row(tmp_path: Path) -> None:
    def worker(k: int) -> None:
        outcomes: list[SlideOutcome] = []
        for i in range(10):
            outcomes.append(_failed(f"/s/w{k}-{i}.svs"))
            merge_failures(tmp_path, outcomes)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_rows(tmp_path)) == 40


# --------------------------------------------------------------------------- recording


def test_database_outage_mid_batch_is_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slidestream.db as db

    calls: list[str] = []

    def flaky(engine: Any, **kwargs: Any) -> int:
        calls.append(kwargs["slide_path"])
        if len(calls) > 1:
            raise DatabaseError("sqlite:///x.db: write failed: server gone; retry")
        return 1

    monkeypatch.setattr(db, "record_failure", flaky)
    config = RunConfig(out_dir=tmp_path, db_url=f"sqlite:///{tmp_path / 'x.db'}")
    with Recorder(config) as rec:
        for name in "abcd":
            rec.record(_failed(f"/s/{name}.svs"))
    assert calls == ["/s/a.svs", "/s/b.svs"]  # not retried for every slide once down
    assert len(rec.outcomes) == 4 and len(rec.unrecorded) == 3
    errors = [line for line in rec.summary_lines() if "DATABASE ERROR" in line]
    assert len(errors) == 1 and "3 slide(s) not recorded" in errors[0]
    assert "slidestream db sync" in errors[0] and rec.exit_code == 1
    assert len(_rows(tmp_path)) == 4


def test_bad_database_or_output_folder_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slidestream.pipeline.run as run_module

    def no_work(config: RunConfig) -> None:
        raise AssertionError("models were loaded before the checks")

    monkeypatch.setattr(run_module, "load_models", no_work)
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    url = "postgresql+psycopg://u:pw@127.0.0.1:1/test?password=qs&connect_timeout=2"
    with pytest.raises(DatabaseError, match="cannot connect"):
        run_batch([slide], RunConfig(out_dir=tmp_path / "out", db_url=url))
    with pytest.raises(DatabaseError, match="unsupported database backend"):
        run_batch([slide], RunConfig(out_dir=tmp_path / "out", db_url="nonsense://"))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="output folder cannot be written"):
        run_batch([slide], RunConfig(out_dir=blocker / "out", db_url=None))
    assert not (tmp_path / "out" / "a").exists()


def test_read_only_output_folder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PermissionError on the probe file (a real read-only folder where not root)."""
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:
        real = Path.write_bytes

        def denied(self: Path, data: bytes) -> int:
            if self.parent == out:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", denied)
    else:
        out.chmod(0o555)
    try:
        result = CliRunner().invoke(cli, ["run", str(slide), "--out", str(out), "--no-db"])
    finally:
        out.chmod(0o755)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "Permission denied" in result.output and "--out" in result.output
    assert list(out.iterdir()) == []


def test_unexpected_os_error_is_one_line(tmp_path: Path) -> None:
    from slidestream.wsi.synthetic import write_pyramidal_tiff

    rgb = np.full((256, 256, 3), 200, np.uint8)
    slide = write_pyramidal_tiff(tmp_path / "s.svs", rgb, mpp=0.5, vendor_style="aperio")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    result = CliRunner().invoke(cli, ["tissue", str(slide), "--out", str(blocker / "mask.png")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "afile" in result.output


# --------------------------------------------------------------------------- inputs


def test_manifest_encodings(tmp_path: Path) -> None:
    (tmp_path / "a.svs").write_bytes(b"x")
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffpath,note\na.svs,café\n".encode())
    assert [p.name for p in discover_slides([bom])] == ["a.svs"]
    excel = tmp_path / "excel.csv"
    excel.write_bytes("path,note\r\na.svs,ok\r\na.svs,café\r\n".encode("cp1252"))
    with pytest.raises(ConfigError) as info:
        discover_slides([excel])
    message = str(info.value)
    assert str(excel) in message and "line 3" in message and "UTF-8" in message
    assert "\n" not in message
    result = CliRunner().invoke(cli, ["run", str(excel), "--out", str(tmp_path / "o"), "--no-db"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- signals, modes


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_become_interrupted(signum: int) -> None:
    from slidestream._cli_run import stop_on_signals

    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as info, stop_on_signals():
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert info.value.signum == signum
    assert signal.getsignal(signum) == before


def test_interrupt_is_one_line_with_signal_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    import slidestream.commands as commands

    def interrupted(*args: object, **kwargs: object) -> None:
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(commands, "run_slides", interrupted)
    result = CliRunner().invoke(cli, ["run", ".", "--out", "unused", "--no-db"])
    assert result.exit_code == 128 + signal.SIGTERM
    assert result.output.strip().splitlines() == [
        "Error: interrupted (SIGTERM): workers stopped, unfinished slide outputs removed; "
        "rerun the same command to resume (finished slides are kept)"
    ]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    from slidestream.tiling import TissueMask

    old = os.umask(umask)
    try:
        assert file_mode() == 0o666 & ~umask
        text = write_text_atomic(tmp_path / "summary.json", "{}")
        mask = TissueMask(
            mask=np.ones((8, 8), bool), mpp=8.0, slide_mpp=0.5, l0_dimensions=(128, 128)
        )
        png = mask.to_png(tmp_path / "tissue_mask.png")
    finally:
        os.umask(old)
    assert text.stat().st_mode & 0o777 == 0o666 & ~umask
    assert png.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_slide_leaves_no_staging_and_no_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slidestream.overlays as overlays
    from slidestream.demo_slide import DemoSlideSpec, write_demo_slide

    slide = write_demo_slide(
        tmp_path / "s.svs", DemoSlideSpec(width_px=512, height_px=512, mpp=0.5, seed=1)
    )

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("overlay renderer broke")

    monkeypatch.setattr(overlays, "render_overlay_png", broken)
    out = tmp_path / "out"
    config = RunConfig(
        out_dir=out, workers=0, postprocess_workers=0, nuclei_model="classical",
        show_progress=False, db_url=None,
    )  # fmt: skip
    (outcome,) = run_batch([slide], config)
    assert outcome.status == "failed" and "overlay renderer broke" in (outcome.reason or "")
    assert sorted(p.name for p in out.iterdir()) == [FAILURES_NAME]


def test_signal_while_readers_start_is_delivered_after_the_start() -> None:
    """An interrupt during ``iter(loader)`` (reader processes starting) is held back until
    every reader is started, so none is left unknown to the clean-up."""
    from slidestream._cli_run import stop_on_signals
    from slidestream.tiling._dataset import _start_readers

    started: list[str] = []

    class Loader:
        def __iter__(self) -> Any:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
            started.append("all readers")
            return iter(())

    with pytest.raises(Interrupted), stop_on_signals():
        _start_readers(Loader())
        for _ in range(1000):
            pass
    assert started == ["all readers"]


def test_claim_creates_the_output_folder(tmp_path: Path) -> None:
    """``analyse_slide`` is library API: OUT need not exist yet when a slide is claimed."""
    folder = tmp_path / "new-out" / "slide"
    with claim_folder(folder) as claim:
        assert isinstance(claim, SlideClaim) and lock_path(folder).is_file()
    assert list((tmp_path / "new-out").iterdir()) == []
