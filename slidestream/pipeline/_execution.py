"""How a slide's tile reading and nucleus post-processing run in this process.

Locally both use processes: tile readers are DataLoader workers forked from a fork server, and
post-processing runs in a spawn process pool (or inline, see :func:`worker_counts`). A process
that may not start children cannot do that: a Dask worker run by its nanny (the default of
``dask worker`` and of ``LocalCluster(processes=True)``) is a *daemonic* process, and
``multiprocessing`` refuses to start a child of one (``daemonic processes are not allowed to have
children``). There the same counts run as threads of the worker process instead. Both choices
give the same tiles in the same order and the same nucleus tables, so results do not depend on
them; the choice is recorded in ``summary.json`` (``provenance.execution``).
"""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from slidestream.config import RunConfig
from slidestream.errors import ConfigError

from ._models import LoadedModels, worker_counts
from .inference import postprocess_pool
from .stream import can_start_processes

__all__ = ["Execution", "WorkerKind", "plan_execution", "postprocess_executor"]

WorkerKind = Literal["processes", "threads", "inline"]
"""How a stage's workers run: child processes, threads of this process, or none (the calling
thread does the work)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Execution:
    """How tile reading and post-processing of a slide run here (one value per process)."""

    readers: int
    """Tile-reading workers (0: read in the calling thread)."""
    postprocess: int
    """Nucleus post-processing workers (0: in the calling thread, after each batch)."""
    kind: Literal["processes", "threads"]
    """What the workers are: child processes, or threads (this process may not have children)."""
    host: str = "local"
    """Where the slide runs: ``local``, or ``dask-worker <address>``."""
    reason: str = ""
    """Why ``kind`` was chosen (one line)."""
    batch: str | None = None
    """Id of the Dask batch the slide ran in (``None`` locally)."""

    def __post_init__(self) -> None:
        if self.readers < 0 or self.postprocess < 0:
            raise ConfigError(
                f"Execution: readers={self.readers}, postprocess={self.postprocess}; "
                "expected counts >= 0"
            )
        if self.kind not in ("processes", "threads"):
            raise ConfigError(f"Execution: kind={self.kind!r}; expected 'processes' or 'threads'")

    @property
    def reader_kind(self) -> WorkerKind:
        """How the tile readers run."""
        return self.kind if self.readers > 0 else "inline"

    @property
    def postprocess_kind(self) -> WorkerKind:
        """How nucleus post-processing runs."""
        return self.kind if self.postprocess > 0 else "inline"

    def record(self) -> dict[str, str]:
        """The ``provenance.execution`` block of ``summary.json``."""
        out = {
            "host": self.host,
            "tile_reading": self.reader_kind,
            "postprocess": self.postprocess_kind,
            "reason": self.reason,
        }
        if self.batch is not None:
            out["batch"] = self.batch
        return out


def plan_execution(
    config: RunConfig,
    models: LoadedModels,
    *,
    cpus: int | None = None,
    allow_processes: bool | None = None,
    host: str = "local",
    batch: str | None = None,
) -> Execution:
    """Worker counts (:func:`worker_counts`) and whether they can be processes here.

    Parameters
    ----------
    config, models
        The run's configuration (``--workers``, ``--postprocess-workers``) and loaded models.
    cpus
        CPU cores one slide may use (default: those of this process).
    allow_processes
        Whether this process may start children (default: it is not daemonic).
    host, batch
        Recorded as :attr:`Execution.host` and :attr:`Execution.batch`.
    """
    readers, post = worker_counts(config, models, cpus=cpus)
    allowed = can_start_processes() if allow_processes is None else allow_processes
    if allowed:
        reason = "this process may start child processes"
    else:
        reason = "daemonic process (e.g. a Dask worker under a nanny) may not start processes"
    return Execution(
        readers=readers,
        postprocess=post,
        kind="processes" if allowed else "threads",
        host=host,
        reason=reason,
        batch=batch,
    )


def postprocess_executor(execution: Execution) -> Executor | None:
    """The post-processing pool of ``execution`` (``None``: post-process inline). The caller
    shuts it down."""
    if execution.postprocess <= 0:
        return None
    if execution.kind == "processes":
        return postprocess_pool(execution.postprocess)
    return ThreadPoolExecutor(
        max_workers=execution.postprocess, thread_name_prefix="nucleus-postprocess"
    )
