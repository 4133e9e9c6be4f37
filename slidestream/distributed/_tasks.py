"""What runs on the Dask workers: the slide task, the pre-flight check, the interrupt.

Everything here is a module-level function (workers import it by name, so every worker needs
the same slidestream installed) and never touches the database: the client records.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slidestream.config import RunConfig
from slidestream.errors import SlidestreamError
from slidestream.pipeline import (
    LoadedModels,
    SlideOutcome,
    analyse_guarded,
    load_models,
    plan_execution,
    postprocess_executor,
    read_summary,
)

__all__ = [
    "CHECK_PREFIX",
    "EVENT_TOPIC",
    "SlideTaskResult",
    "TaskCancelled",
    "WorkerReport",
    "analyse_on_worker",
    "check_worker",
    "fingerprint_on_worker",
    "interrupt_tasks",
    "running_keys",
]

logger = logging.getLogger(__name__)

EVENT_TOPIC = "slidestream-slide"
"""Dask event topic of the slide tasks (``{"slide", "worker", "state"}``), for the progress."""

CHECK_PREFIX = ".slidestream-dask-check-"
"""Name prefix of the file the client writes into OUT for the shared-storage check."""

_MODELS: dict[tuple[str, str, str], LoadedModels] = {}
"""Models loaded in this worker process, by (nuclei model, tissue model, device)."""
_MODELS_LOCK = threading.Lock()


class TaskCancelled(BaseException):
    """Raised inside a running slide task whose batch the client cancelled (Ctrl-C).

    A ``BaseException``, so no slide-error handler swallows it; the slide's staging folder is
    removed on the way out (:func:`slidestream.pipeline.analyse_guarded`).
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideTaskResult:
    """What a slide task returns to the client."""

    outcome: SlideOutcome
    worker: str
    """Address of the worker that ran it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReport:
    """What the pre-flight check found on one worker."""

    worker: str
    problem: str | None = None
    """One line naming what this worker cannot do (``None``: ready)."""
    parameters_hash: str | None = None
    """The parameters hash with the models this worker loaded."""
    models: Any = None
    """Their records (``{role: ModelRecord}``)."""
    software_version: str | None = None
    cpus: int = 0


def worker_models(config: RunConfig) -> LoadedModels:
    """The models of ``config``, loaded once per worker process (thread-safe)."""
    key = (config.nuclei_model, config.tissue_model, config.device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_models(config)
        return _MODELS[key]


def _this_worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except ValueError:  # not inside a worker (called directly, e.g. in a test)
        return None


def _worker_address() -> str:
    worker = _this_worker()
    return str(worker.address) if worker is not None else f"pid {os.getpid()}"


def _event(slide: str, state: str) -> None:
    worker = _this_worker()
    if worker is not None:
        try:
            message = {"slide": slide, "worker": worker.address, "state": state}
            worker.log_event(EVENT_TOPIC, message)
        except Exception:  # progress only; never fail a slide for it
            logger.debug("could not send a progress event", exc_info=True)


def check_worker(
    out_dir: str, check_name: str, token: str, slides: Sequence[str], config: RunConfig
) -> WorkerReport:
    """Pre-flight, on one worker: OUT is the client's (shared) folder and writable, every slide
    path exists here, and the models load. Never raises: a problem comes back as one line."""
    import tempfile

    from slidestream.pipeline import cpu_count
    from slidestream.pipeline.provenance import software_version

    worker = _worker_address()
    out = Path(out_dir)
    fix = "OUT must be shared storage mounted at the same path on every worker and the client"
    try:
        seen = (out / check_name).read_text(encoding="utf-8")
    except OSError as exc:
        return WorkerReport(
            worker=worker,
            problem=f"worker {worker} cannot see {out / check_name} written by the client "
            f"({type(exc).__name__}); {fix}",
        )
    if seen != token:
        return WorkerReport(
            worker=worker,
            problem=f"worker {worker} sees another folder at {out} (check file differs); {fix}",
        )
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".slidestream-write-test-"):
            pass
    except OSError as exc:
        return WorkerReport(
            worker=worker, problem=f"worker {worker} cannot write to {out}: {exc}; {fix}"
        )
    missing = [s for s in slides if not Path(s).exists()]
    if missing:
        return WorkerReport(
            worker=worker,
            problem=f"worker {worker} cannot see {len(missing)} of {len(slides)} slide(s), e.g. "
            f"{missing[0]}; slides must be on storage every worker sees at the same path",
        )
    try:
        models = worker_models(config)
    except (SlidestreamError, OSError) as exc:
        reason = " ".join(str(exc).split())
        return WorkerReport(
            worker=worker,
            problem=f"worker {worker} cannot load the models: {reason}; model paths must be "
            "visible to every worker (or use a shipped model name)",
        )
    return WorkerReport(
        worker=worker,
        parameters_hash=config.parameters_hash(models.hashes()),
        models=models.records(),
        software_version=software_version(),
        cpus=cpu_count(),
    )


def _published_in_batch(
    path: Path, config: RunConfig, models: LoadedModels, batch: str
) -> SlideOutcome | None:
    """The ``done`` outcome of ``path`` if this batch already published it.

    A worker lost after publishing a slide but before returning its result makes Dask run the
    task again: the slide is then neither analysed nor recorded twice.
    """
    from slidestream.wsi import slide_name

    name = slide_name(path)
    for folder in [config.out_dir / name, *sorted(config.out_dir.glob(f"{name}-*"))]:
        summary = read_summary(folder)
        if (
            summary is not None
            and summary.provenance.execution.get("batch") == batch
            and summary.slide.path == str(path)
        ):
            return SlideOutcome(
                path=path,
                slide_name=summary.slide.name,
                status="done",
                fingerprint=summary.slide.fingerprint,
                parameters_hash=summary.provenance.parameters_hash,
                models=models.records(),
                output_dir=folder,
                summary=summary,
                started_at=summary.provenance.started_at,
            )
    return None


def analyse_on_worker(
    path: Path, config: RunConfig, shared_name: bool, batch: str
) -> SlideTaskResult:
    """Dask task: analyse one slide on this worker; never raises for a bad slide.

    Tile reading and post-processing use what this worker process may have (threads in a
    daemonic worker, see :func:`slidestream.pipeline.plan_execution`), one CPU core per task
    (Dask's unit: one task per thread, one thread per core) unless ``--workers`` /
    ``--postprocess-workers`` say otherwise.
    """
    from slidestream.wsi import slide_name

    worker = _worker_address()
    models = worker_models(config)
    previous = _published_in_batch(path, config, models, batch)
    if previous is not None:
        logger.info("%s: already published by this batch (a lost worker's retry)", path)
        return SlideTaskResult(outcome=previous, worker=worker)
    execution = plan_execution(config, models, cpus=1, host=f"dask-worker {worker}", batch=batch)
    _event(slide_name(path), "started")
    pool = postprocess_executor(execution)
    try:
        outcome = analyse_guarded(
            path, config, models, pool=pool, shared_name=shared_name, execution=execution
        )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _event(slide_name(path), "finished")
    return SlideTaskResult(outcome=outcome, worker=worker)


def fingerprint_on_worker(path: Path, config: RunConfig) -> str | None:
    """The fingerprint a failure of ``path`` is recorded with (as the local path computes it:
    the slide's, else the sha256 of its bytes, ``None`` if it does not exist)."""
    from slidestream.wsi import file_fingerprint, open_slide

    try:
        with open_slide(path, mpp=config.mpp_override, require_mpp=False) as slide:
            return str(slide.fingerprint)
    except (SlidestreamError, OSError):
        pass
    try:
        return file_fingerprint(path) if path.exists() else None
    except OSError:
        return None


def running_keys(keys: Sequence[str], dask_worker: Any = None) -> list[str]:
    """On a worker (``client.run``): which of ``keys`` are executing there now."""
    if dask_worker is None:
        return []
    wanted = set(keys)
    return [str(k) for k in dict(dask_worker.active_threads).values() if str(k) in wanted]


def interrupt_tasks(keys: Sequence[str], dask_worker: Any = None) -> int:
    """On a worker (``client.run``): raise :class:`TaskCancelled` in the threads executing any
    of ``keys`` (Python checks for it between bytecodes); returns how many were interrupted."""
    if dask_worker is None:
        return 0
    wanted = set(keys)
    count = 0
    for ident, key in dict(dask_worker.active_threads).items():
        if str(key) in wanted:
            hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(ident), ctypes.py_object(TaskCancelled)
            )
            count += int(hit)
    return count
