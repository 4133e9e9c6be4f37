"""``run --dask`` against real worker processes: nanny (daemonic) workers of a ``LocalCluster``,
a scheduler plus ``dask worker`` processes started with the CLI, a worker killed mid-batch, and
Ctrl-C in the client. Each compares against a local run of the same slides.

Only the first test is fast (one worker process, one small slide); the rest are ``slow``.
Every process a test starts is stopped by it.
"""

from __future__ import annotations

import _thread
import csv
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slidestream.config import RunConfig
from slidestream.demo_slide import DemoSlideSpec, write_demo_slide
from slidestream.pipeline import SlideOutcome

SPECS = {
    "alpha": DemoSlideSpec(width_px=1024, height_px=768, mpp=0.5, seed=8),
    "beta": DemoSlideSpec(width_px=1024, height_px=768, mpp=0.5, seed=9),
    "gamma": DemoSlideSpec(width_px=1024, height_px=768, mpp=0.5, seed=10),
    "delta": DemoSlideSpec(width_px=1024, height_px=768, mpp=0.5, seed=11),
}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four generated slides, a broken file and a white (no tissue) slide."""
    from slidestream.wsi.synthetic import write_pyramidal_tiff

    folder = tmp_path_factory.mktemp("dask-slides")
    out = {name: write_demo_slide(folder / f"{name}.svs", spec) for name, spec in SPECS.items()}
    broken = folder / "broken.svs"
    broken.write_bytes(b"not a slide at all")
    out["broken"] = broken
    glass = np.clip(np.random.default_rng(0).normal(242, 2, (768, 1024, 3)), 0, 255)
    out["white"] = write_pyramidal_tiff(
        folder / "white.svs", glass.astype(np.uint8), mpp=0.5, vendor_style="aperio"
    )
    return out


def _config(out: Path) -> RunConfig:
    return RunConfig(
        out_dir=out,
        nuclei_model="classical",
        show_progress=False,
        db_url=f"sqlite:///{out / 'runs.db'}",
    )


@pytest.fixture(scope="module")
def local_reference(
    slides: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, SlideOutcome]:
    """The local run of every slide (the results every Dask run must reproduce)."""
    from slidestream.pipeline import run_batch

    out = tmp_path_factory.mktemp("local")
    outcomes = run_batch(list(slides.values()), _config(out))
    return {o.slide_name: o for o in outcomes}


def _key(o: SlideOutcome) -> tuple[Any, ...]:
    """What must be equal between a local and a Dask outcome of the same slide."""
    stats = o.summary.statistics if o.summary is not None else None
    return (
        o.slide_name,
        o.status,
        o.skip_reason,
        o.fingerprint,
        o.parameters_hash,
        o.reason,
        o.error_class,
        dict(o.models),
        stats,
    )


def _records(out: Path) -> tuple[list[dict[str, str]], list[tuple[Any, ...]]]:
    """failures.csv rows (without the time) and the database runs, sorted."""
    from sqlalchemy import select

    from slidestream.db import AnalysisRun, Slide, connect

    rows: list[dict[str, str]] = []
    if (out / "failures.csv").exists():
        with (out / "failures.csv").open() as fh:
            rows = [{k: v for k, v in r.items() if k != "time"} for r in csv.DictReader(fh)]
    engine = connect(f"sqlite:///{out / 'runs.db'}")
    try:
        with engine.connect() as conn:
            runs = conn.execute(
                select(
                    AnalysisRun.status,
                    AnalysisRun.slide_name,
                    AnalysisRun.error,
                    AnalysisRun.parameters_hash,
                    Slide.fingerprint,
                ).outerjoin(Slide, Slide.id == AnalysisRun.slide_id)
            ).all()
    finally:
        engine.dispose()
    return sorted(rows, key=lambda r: r["slide_name"]), sorted(tuple(r) for r in runs)


def _assert_same_as_local(
    outcomes: Sequence[SlideOutcome],
    reference: dict[str, SlideOutcome],
    out: Path,
    local_out: Path | None = None,
) -> None:
    assert sorted(o.slide_name for o in outcomes) == sorted(reference)
    for o in outcomes:
        assert _key(o) == _key(reference[o.slide_name]), o.slide_name
        if o.status == "done":
            assert o.summary is not None
            assert o.summary.provenance.execution["tile_reading"] == "threads"
            assert o.summary.provenance.execution["host"].startswith("dask-worker ")
    assert not list(out.glob(".*partial")), "staging folder left behind"
    assert not list(out.glob(".slidestream-*")), "check file left behind"
    if local_out is not None:
        assert _records(out) == _records(local_out)


def _local_out(reference: dict[str, SlideOutcome]) -> Path:
    done = next(o for o in reference.values() if o.output_dir is not None)
    assert done.output_dir is not None
    return done.output_dir.parent


def test_nanny_worker_analyses_a_slide_as_locally(slides: dict[str, Path], tmp_path: Path) -> None:
    """Fast regression: a nanny worker is daemonic, and every slide failed with "daemonic
    processes are not allowed to have children" (the tile readers were processes)."""
    from distributed import LocalCluster

    from slidestream.distributed import run_batch_dask
    from slidestream.pipeline import run_batch

    config = _config(tmp_path / "dask").with_options(db_url=None)
    (local,) = run_batch([slides["alpha"]], config.with_options(out_dir=tmp_path / "local"))
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        (remote,) = run_batch_dask([slides["alpha"]], config, scheduler=cluster)
    assert remote.status == "done", remote.reason
    assert _key(remote) == _key(local)
    assert remote.summary is not None and local.summary is not None
    execution = remote.summary.provenance.execution
    assert execution["tile_reading"] == execution["postprocess"] == "threads"
    assert local.summary.provenance.execution["tile_reading"] == "processes"
    assert not list((tmp_path / "dask").glob(".*partial"))


@pytest.mark.slow
def test_local_cluster_of_two_processes_matches_the_local_run(
    slides: dict[str, Path], local_reference: dict[str, SlideOutcome], tmp_path: Path
) -> None:
    from slidestream.commands import run_slides

    out = tmp_path / "dask"
    report = run_slides(list(slides.values()), _config(out), dask_scheduler="local:2")
    assert report.exit_code == 1  # the broken slide
    _assert_same_as_local(report.outcomes, local_reference, out, _local_out(local_reference))
    assert len({o.summary.provenance.execution["host"] for o in report.outcomes if o.summary}) > 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def cli_cluster(tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` and ``dask worker ... --nworkers 2 --nthreads 1`` on 127.0.0.1."""
    from distributed import Client

    dask = str(Path(sys.executable).with_name("dask"))
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    common = {"cwd": tmp_path, "start_new_session": True}
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=(logs / "scheduler.log").open("wb"),
        stderr=subprocess.STDOUT,
        **common,  # type: ignore[call-overload]
    )
    workers = subprocess.Popen(
        [dask, "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard"],
        stdout=(logs / "workers.log").open("wb"),
        stderr=subprocess.STDOUT,
        **common,  # type: ignore[call-overload]
    )
    try:
        with Client(address, timeout=60) as client:  # type: ignore[no-untyped-call]
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        _stop(workers)
        _stop(scheduler)


@pytest.mark.slow
def test_cli_scheduler_and_nanny_workers_run_the_batch_like_a_local_run(
    slides: dict[str, Path],
    local_reference: dict[str, SlideOutcome],
    cli_cluster: str,
    tmp_path: Path,
) -> None:
    """Exactly the commands of the docstring: no traceback, no partial folder, same results."""
    from slidestream.pipeline import read_summary

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "slidestream", "run", *map(str, slides.values())]
    command += ["--out", str(out), "--nuclei-model", "classical", "--no-progress"]
    command += ["--db", f"sqlite:///{out / 'runs.db'}", "--dask", cli_cluster]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        check=False,
    )
    assert result.returncode == 1, result.stderr  # the broken slide only
    assert "Traceback" not in result.stderr
    assert "4 slide(s) analysed, 0 up to date, 1 skipped (no tissue), 1 failed" in result.stderr
    local_out = _local_out(local_reference)
    for name, ref in local_reference.items():
        if ref.status == "done":
            summary = read_summary(out / name)
            assert summary is not None and ref.summary is not None
            assert summary.statistics == ref.summary.statistics, name
            assert summary.provenance.execution["tile_reading"] == "threads"
    assert not list(out.glob(".*partial"))
    assert _records(out) == _records(local_out)


def _wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_worker_killed_mid_slide_loses_and_doubles_nothing(
    slides: dict[str, Path], local_reference: dict[str, SlideOutcome], tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster

    from slidestream.distributed import run_batch_dask
    from slidestream.distributed._tasks import running_keys
    from slidestream.pipeline import Recorder

    out = tmp_path / "dask"
    config = _config(out)
    batch = [slides[n] for n in ("alpha", "beta", "gamma", "delta")]
    killed: list[str] = []

    def kill_one_mid_slide(client: Any) -> None:
        _wait_for(lambda: list(out.glob(".*partial")), 300, "a slide being written")
        keys = [str(k) for k in client.processing() for k in client.processing()[k]]
        busy = _wait_for(
            lambda: {w: ks for w, ks in client.run(running_keys, keys).items() if ks},
            60,
            "a running task",
        )
        worker = sorted(busy)[0]
        pid = client.run(os.getpid, workers=[worker])[worker]
        killed.append(worker)
        os.kill(pid, signal.SIGKILL)

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]
        Recorder(config) as recorder,
    ):
        killer = threading.Thread(target=kill_one_mid_slide, args=(client,), daemon=True)
        killer.start()
        outcomes = run_batch_dask(batch, config, scheduler=client, recorder=recorder)
        killer.join(timeout=60)
    assert killed, "no worker was killed"
    assert len(recorder.outcomes) == len(outcomes) == 4
    _assert_same_as_local(
        outcomes, {o.slide_name: local_reference[o.slide_name] for o in outcomes}, out
    )
    runs = _records(out)[1]
    assert sorted(r[1] for r in runs) == ["alpha", "beta", "delta", "gamma"]  # once each
    assert {r[0] for r in runs} == {"succeeded"}


@pytest.mark.slow
def test_ctrl_c_in_the_client_cancels_and_leaves_nothing_partial(
    slides: dict[str, Path], tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster

    from slidestream.distributed import run_batch_dask
    from slidestream.distributed._tasks import running_keys

    out = tmp_path / "dask"
    config = _config(out).with_options(db_url=None)
    batch = [slides[n] for n in ("alpha", "beta", "gamma", "delta")]

    interrupted_at: list[float] = []

    def interrupt_mid_slide() -> None:
        _wait_for(lambda: list(out.glob(".*partial")), 300, "a slide being written")
        interrupted_at.append(time.monotonic())
        _thread.interrupt_main()

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        threading.Thread(target=interrupt_mid_slide, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            run_batch_dask(batch, config, scheduler=client)
        # the running tasks were interrupted, not waited for (a slide takes ~5-10 s here)
        assert time.monotonic() - interrupted_at[0] < 4.0
        keys = [str(k) for ks in client.processing().values() for k in ks]
        assert not [k for ks in client.run(running_keys, keys).values() for k in ks]
        time.sleep(1.0)  # nothing may appear afterwards either
    assert not list(out.glob(".*partial")), "staging folder left behind"
    assert not list(out.glob("*/summary.json")), "an interrupted slide was published"


@pytest.mark.slow
def test_a_retried_task_returns_what_its_batch_already_published(
    slides: dict[str, Path], tmp_path: Path
) -> None:
    """A worker lost after publishing but before returning makes Dask run the task again: the
    retry finds the batch id in the published summary and does not analyse the slide again
    (another batch, or --force in a new batch, does)."""
    from slidestream.distributed import analyse_on_worker

    config = _config(tmp_path).with_options(db_url=None, force=True)
    path = slides["alpha"].resolve()
    first = analyse_on_worker(path, config, False, "batch-1").outcome
    assert first.status == "done" and first.summary is not None
    assert first.summary.provenance.execution["batch"] == "batch-1"
    again = analyse_on_worker(path, config, False, "batch-1").outcome
    assert again.status == "done" and again.summary == first.summary  # not redone
    assert again.fingerprint == first.fingerprint
    assert again.parameters_hash == first.parameters_hash
    other = analyse_on_worker(path, config, False, "batch-2").outcome
    assert other.status == "done" and other.summary is not None
    assert other.summary.provenance.started_at != first.summary.provenance.started_at


@pytest.mark.slow
def test_an_up_to_date_slide_restores_a_lost_database_row(
    slides: dict[str, Path], tmp_path: Path
) -> None:
    """A slide published by a worker whose result never reached the client (scheduler or
    client lost) is up to date on the rerun; recording it then restores its database row,
    and recording it again writes nothing."""
    from slidestream.pipeline import run_batch

    out = tmp_path / "out"
    run_batch([slides["beta"]], _config(out).with_options(db_url=None))  # published, unrecorded
    config = _config(out)
    for _ in range(2):
        (again,) = run_batch([slides["beta"]], config)
        assert (again.status, again.skip_reason) == ("skipped", "up_to_date")
        runs = _records(out)[1]
        assert [(r[0], r[1]) for r in runs] == [("succeeded", "beta")]
