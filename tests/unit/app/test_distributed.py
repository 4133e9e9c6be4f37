"""Fast tests of the Dask plumbing that need no cluster: ``--dask`` parsing, the execution plan
of a daemonic process, the workers' pre-flight check, an unreachable scheduler."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from slidestream.config import RunConfig
from slidestream.errors import ClusterError, ConfigError


def test_parse_dask_target() -> None:
    from slidestream.distributed import DaskTarget, parse_dask_target

    assert parse_dask_target("local:3") == DaskTarget(local_workers=3)
    assert parse_dask_target("local", cpus=5) == DaskTarget(local_workers=5)
    assert parse_dask_target("tcp://10.0.0.1:8786") == DaskTarget(address="tcp://10.0.0.1:8786")
    for bad in ("local:0", "local:x", "local:-2", " "):
        with pytest.raises(ConfigError) as info:
            parse_dask_target(bad)
        assert "\n" not in str(info.value)


def test_a_daemonic_process_runs_its_workers_as_threads(tmp_path: Path) -> None:
    from slidestream import pipeline

    nuclei = SimpleNamespace(net=None, precision=None)
    models = pipeline.LoadedModels(nuclei=nuclei, tissue=None, device="cpu")
    config = RunConfig(out_dir=tmp_path)
    local = pipeline.plan_execution(config, models, cpus=2, allow_processes=True)
    daemon = pipeline.plan_execution(
        config, models, cpus=2, allow_processes=False, host="dask-worker x", batch="b1"
    )
    assert (local.readers, local.postprocess) == (daemon.readers, daemon.postprocess) == (1, 1)
    assert local.record()["tile_reading"] == local.record()["postprocess"] == "processes"
    record = daemon.record()
    assert record["tile_reading"] == record["postprocess"] == "threads"
    assert record["host"] == "dask-worker x" and record["batch"] == "b1"
    assert "daemonic" in record["reason"]
    inline = pipeline.plan_execution(
        config.with_options(workers=0, postprocess_workers=0), models, allow_processes=False
    )
    assert inline.record()["tile_reading"] == inline.record()["postprocess"] == "inline"
    pool = pipeline.postprocess_executor(daemon)
    assert pool is not None
    try:
        assert pool.submit(sum, [1, 2]).result() == 3
    finally:
        pool.shutdown()
    assert pipeline.postprocess_executor(inline) is None


def test_summary_keeps_the_execution_record(tmp_path: Path) -> None:
    from slidestream.summary import Provenance

    prov = Provenance(parameters_hash="h", execution={"tile_reading": "threads"})
    assert prov.execution["tile_reading"] == "threads"
    assert Provenance(parameters_hash="h").execution == {}


def _config(tmp_path: Path, **options: object) -> RunConfig:
    return RunConfig(
        out_dir=tmp_path, nuclei_model="classical", show_progress=False, db_url=None, **options
    )


def test_worker_check_names_the_worker_and_the_fix(tmp_path: Path) -> None:
    from slidestream.distributed._tasks import check_worker

    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    (tmp_path / ".check").write_text("token")
    config = _config(tmp_path)
    ok = check_worker(str(tmp_path), ".check", "token", [str(slide)], config)
    assert ok.problem is None and ok.parameters_hash and ok.models["nuclei"].sha256 == "classical"

    unseen = check_worker(str(tmp_path), ".missing", "token", [str(slide)], config)
    assert unseen.problem is not None and "cannot see" in unseen.problem
    assert "shared storage" in unseen.problem and "\n" not in unseen.problem
    other = check_worker(str(tmp_path), ".check", "another", [str(slide)], config)
    assert other.problem is not None and "another folder" in other.problem
    no_slide = check_worker(str(tmp_path), ".check", "token", [str(tmp_path / "b.svs")], config)
    assert no_slide.problem is not None and "b.svs" in no_slide.problem
    weights = tmp_path / "nowhere" / "weights.safetensors"
    no_model = check_worker(
        str(tmp_path),
        ".check",
        "token",
        [str(slide)],
        _config(tmp_path).with_options(nuclei_model=str(weights)),
    )
    assert no_model.problem is not None and "cannot load the models" in no_model.problem
    assert "\n" not in no_model.problem


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_scheduler_is_one_line_before_any_work(tmp_path: Path) -> None:
    from slidestream.distributed import connect

    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(ClusterError) as info, connect(address, connect_timeout_s=1.0):
        pass
    message = str(info.value)
    assert address in message and "dask scheduler" in message and "\n" not in message
    assert time.perf_counter() - t0 < 30
    with pytest.raises(ClusterError, match="cannot reach"), connect("nonsense://x:1"):
        pass


def test_cli_reports_a_bad_dask_value_on_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from slidestream.cli import cli

    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["run", str(slide), "--out", str(out), "--no-db", "--dask", "local:zero"]
    )
    assert result.exit_code != 0
    assert "local:N" in result.output and "Traceback" not in result.output
    assert not list(out.glob(".*partial")) if out.exists() else True


def test_slurm_example_builds_one_thread_workers_and_takes_a_cluster_object() -> None:
    """docs/dask_slurm.py: its SLURMCluster job runs one-thread worker processes (checked on the
    job script: nothing is submitted), and run_batch_dask accepts a cluster object (tested with
    the LocalCluster-compatible interface in tests/integration/test_dask.py)."""
    pytest.importorskip("dask_jobqueue")
    import importlib.util

    path = Path(__file__).resolve().parents[3] / "docs" / "dask_slurm.py"
    spec = importlib.util.spec_from_file_location("dask_slurm_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cluster = example.make_cluster(
        queue="cpu",
        account="lab",
        cores=4,
        memory="16GB",
        walltime="01:00:00",
        dashboard_address=":0",
    )
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p cpu" in script and "#SBATCH -A lab" in script
    assert "--nworkers 4" in script and "--nthreads 1" in script
    assert "--nanny" in script or "--no-nanny" not in script
