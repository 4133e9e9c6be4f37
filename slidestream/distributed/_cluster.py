"""Reaching a Dask cluster: ``--dask ADDRESS`` or ``--dask local[:N]``, and the pre-flight check.

Every problem found here is a one-line :class:`~slidestream.errors.ClusterError`, raised before
any slide is submitted.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slidestream._atomic import write_text_atomic
from slidestream.config import RunConfig
from slidestream.errors import ClusterError, ConfigError

from ._tasks import CHECK_PREFIX, WorkerReport, check_worker

__all__ = ["DaskTarget", "check_cluster", "connect", "parse_dask_target"]

logger = logging.getLogger(__name__)

#: Seconds to wait for the scheduler to answer.
CONNECT_TIMEOUT_S = 10.0
#: Seconds to wait for a first worker to join a scheduler that has none.
WORKERS_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DaskTarget:
    """Where the slide tasks go: a scheduler address, or a new local cluster."""

    address: str | None = None
    """Scheduler address (``tcp://host:8786``); ``None`` for a local cluster."""
    local_workers: int | None = None
    """Worker processes of the local cluster (``local:N``)."""


def parse_dask_target(text: str, *, cpus: int | None = None) -> DaskTarget:
    """Parse ``--dask``: ``local`` (one worker process per core), ``local:N``, or an address.

    Raises
    ------
    ConfigError
        ``local:`` followed by anything but a positive integer, or an empty value.
    """
    from slidestream.pipeline import cpu_count

    value = text.strip()
    if not value:
        raise ConfigError("--dask: empty value; give a scheduler address or local[:N]")
    if value == "local" or value.startswith("local:"):
        count = value.partition(":")[2]
        if not count:
            return DaskTarget(local_workers=cpus if cpus is not None else cpu_count())
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"--dask {text}: {count!r} is not a worker count; expected local or local:N "
                "with N >= 1 (e.g. local:4)"
            )
        return DaskTarget(local_workers=int(count))
    return DaskTarget(address=value)


@contextlib.contextmanager
def connect(
    scheduler: str | Any,
    *,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    workers_timeout_s: float = WORKERS_TIMEOUT_S,
) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``, closed (with anything started here) on exit.

    Parameters
    ----------
    scheduler
        ``local``, ``local:N``, a scheduler address, a ``distributed.Client`` (used as is, not
        closed) or a cluster object (``LocalCluster``, dask-jobqueue's ``SLURMCluster``, anything
        with a ``scheduler_address``; not closed).

    Raises
    ------
    ClusterError
        The scheduler cannot be reached (wrong address, not running), or no worker joins it
        within ``workers_timeout_s``.
    """
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if isinstance(scheduler, Client):
            client: Any = scheduler
            where = str(getattr(scheduler.scheduler, "address", "the given client"))
        elif isinstance(scheduler, str):
            target = parse_dask_target(scheduler)
            if target.local_workers is not None:
                cluster = stack.enter_context(
                    LocalCluster(  # type: ignore[no-untyped-call]
                        n_workers=target.local_workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=None,
                    )
                )
                where = f"a local cluster of {target.local_workers} worker process(es)"
                client = stack.enter_context(Client(cluster))  # type: ignore[no-untyped-call]
            else:
                where = str(target.address)
                client = stack.enter_context(_client_for(where, connect_timeout_s))
        elif hasattr(scheduler, "scheduler_address"):
            where = str(scheduler.scheduler_address)
            client = stack.enter_context(_client_for(scheduler, connect_timeout_s))
        else:
            raise ConfigError(
                f"run_batch_dask: scheduler={scheduler!r}; expected an address, local[:N], a "
                "distributed.Client or a cluster object"
            )
        try:
            client.wait_for_workers(1, timeout=workers_timeout_s)
        except TimeoutError as exc:
            raise ClusterError(
                f"Dask scheduler {where}: no worker joined within {workers_timeout_s:g} s; start "
                f"workers with `dask worker {where}` (or scale the cluster)"
            ) from exc
        yield client


def _client_for(target: Any, timeout_s: float) -> Any:
    from distributed import Client

    try:
        return Client(target, timeout=timeout_s)  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ClusterError(
            f"cannot reach the Dask scheduler at {target}: {reason}; start it with `dask "
            "scheduler` (default tcp://HOST:8786) and pass its address, or use --dask local[:N]"
        ) from exc


def check_cluster(
    client: Any, config: RunConfig, slides: Sequence[Path], *, batch: str
) -> list[WorkerReport]:
    """Pre-flight on every worker, before any slide: shared OUT, slides visible, models load.

    The client writes a check file with a random token into OUT; each worker must read back the
    same token (so OUT is the same storage, not a same-named local folder), write there, see
    every slide path and load the models (once per worker process: the slide tasks reuse them).
    All workers must then agree on the parameters hash (same models and post-processing).

    Raises
    ------
    ClusterError
        One line naming the first worker with a problem, the problem and the fix.
    """
    token = uuid.uuid4().hex
    check_name = f"{CHECK_PREFIX}{batch}"
    check_path = config.out_dir / check_name
    write_text_atomic(check_path, token)
    try:
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        futures = [
            client.submit(
                check_worker,
                str(config.out_dir),
                check_name,
                token,
                [str(s) for s in slides],
                config,
                workers=[w],
                allow_other_workers=False,
                pure=False,
                key=f"slidestream-check-{batch}-{i}",
            )
            for i, w in enumerate(workers)
        ]
        reports: list[WorkerReport] = client.gather(futures)
    finally:
        check_path.unlink(missing_ok=True)
    for report in reports:
        if report.problem is not None:
            raise ClusterError(report.problem)
    hashes = {r.parameters_hash for r in reports}
    if len(hashes) > 1:
        by_worker = ", ".join(f"{r.worker}: {str(r.parameters_hash)[:12]}" for r in reports)
        raise ClusterError(
            f"Dask workers disagree on the models' parameters hash ({by_worker}); install the "
            "same slidestream and weights on every worker"
        )
    logger.info("Dask pre-flight passed on %d worker(s)", len(reports))
    return reports
