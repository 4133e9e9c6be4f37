"""The client side of a Dask batch: submit one task per slide, follow them, record outcomes.

Faults. A worker lost mid-slide (killed, out of memory, its machine gone) makes the scheduler
run the task again on another worker (``distributed.scheduler.allowed-failures``, default 3); the
retry removes the lost run's staging folder, and a slide the lost worker had already published
is recognised by the batch id in its ``summary.json`` (not analysed again). The client records
each slide once, when its future finishes. A task that still fails (every retry lost, or a bug)
becomes a ``failed`` outcome with the slide's fingerprint and the parameters hash, like any
failure. Ctrl-C cancels the futures, interrupts the running tasks (their staging folders are
removed) and waits for them to stop, so nothing partial is left.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

from slidestream.config import RunConfig
from slidestream.errors import ClusterError
from slidestream.inputs import discover_slides
from slidestream.pipeline import Recorder, SlideOutcome, shared_names

from ._cluster import check_cluster, connect
from ._tasks import (
    EVENT_TOPIC,
    SlideTaskResult,
    WorkerReport,
    analyse_on_worker,
    fingerprint_on_worker,
    interrupt_tasks,
    running_keys,
)

__all__ = ["run_batch_dask"]

logger = logging.getLogger(__name__)

#: Seconds the client waits for interrupted tasks to stop after Ctrl-C.
_CANCEL_WAIT_S = 60.0


def run_batch_dask(
    inputs: Sequence[Path],
    config: RunConfig,
    *,
    scheduler: str | Any,
    recorder: Recorder | None = None,
) -> list[SlideOutcome]:
    """Analyse every slide of ``inputs`` as Dask tasks; record outcomes here as they finish.

    Parameters
    ----------
    inputs
        Slide files, folders and manifest CSVs, with paths valid on the workers.
    config
        Run configuration; ``out_dir`` must be shared by the workers and this process.
    scheduler
        ``"local"`` / ``"local:N"`` (a :class:`distributed.LocalCluster` of N worker processes,
        one thread each, started and stopped here), a scheduler address (``tcp://host:8786``),
        a ``distributed.Client``, or a cluster object (``LocalCluster``, dask-jobqueue's
        ``SLURMCluster``).
    recorder
        Records every outcome (default: a new :class:`Recorder` of ``config``).

    Returns
    -------
    list of SlideOutcome
        One per slide, in input order (each with the path as given).

    Raises
    ------
    ClusterError
        Before any slide: the scheduler cannot be reached, no worker joins, a worker cannot see
        OUT or a slide, or cannot load the models.
    """
    from slidestream.wsi import slide_name

    slides = discover_slides(inputs)
    shared = shared_names(slides)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    batch = uuid.uuid4().hex[:16]
    resolved = [Path(p).resolve() for p in slides]
    rec = recorder if recorder is not None else Recorder(config)
    results: dict[int, SlideOutcome] = {}
    try:
        with connect(scheduler) as client:
            reports = check_cluster(
                client, config.with_options(show_progress=False), resolved, batch=batch
            )
            logger.info(
                "%d slide(s) on %d Dask worker(s), batch %s", len(slides), len(reports), batch
            )
            # Largest slide first (Dask runs higher priorities first): a huge slide started
            # last would keep one worker busy while the others idle.
            rank = {p: r for r, p in enumerate(sorted(resolved, key=_size_bytes))}
            # Progress is the client's: a worker's tile bars would go to its own stderr.
            task_config = config.with_options(show_progress=False)
            futures = [
                client.submit(
                    analyse_on_worker,
                    path,
                    task_config,
                    slide_name(Path(p)) in shared,
                    batch,
                    pure=False,
                    key=f"slidestream-{batch}-{i}-{slide_name(path)}",
                    priority=rank[path],
                )
                for i, (p, path) in enumerate(zip(slides, resolved, strict=True))
            ]
            follow = _Follow(client, futures, slides, config, reports[0])
            try:
                follow.run(lambda i, outcome: _record(i, outcome, results, rec))
            except (OSError, TimeoutError, CancelledError) as exc:  # the scheduler went away
                _cancel(client, futures)
                reason = (
                    "the client lost its connection to the scheduler"
                    if isinstance(exc, CancelledError)
                    else " ".join(str(exc).split()) or type(exc).__name__
                )
                raise ClusterError(
                    f"lost the Dask scheduler after {len(results)} of {len(slides)} slide(s) "
                    f"({reason}); rerun the same command: finished slides are up to date"
                ) from exc
            except BaseException:
                _cancel(client, futures)
                raise
            finally:
                follow.close()
    finally:
        if recorder is None:
            rec.close()
        else:
            rec.write_failures()
    return [results[i] for i in sorted(results)]


def _size_bytes(path: Path) -> int:
    """Bytes of a slide file (or of a DICOM folder's files); 0 when unreadable."""
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _record(i: int, outcome: SlideOutcome, results: dict[int, SlideOutcome], rec: Recorder) -> None:
    results[i] = outcome
    rec.record(outcome)


class _Follow:
    """Waits for the slide futures, turns each into an outcome, and shows the progress."""

    def __init__(
        self,
        client: Any,
        futures: list[Any],
        slides: Sequence[Path],
        config: RunConfig,
        identity: WorkerReport,
    ) -> None:
        self._client = client
        self._futures = futures
        self._slides = slides
        self._config = config
        self._identity = identity
        self._index = {f.key: i for i, f in enumerate(futures)}
        self._running: dict[str, str] = {}
        """worker address -> name of the slide it runs (from the tasks' events)."""
        self._lock = threading.Lock()
        self._bar: Any = None
        self._subscribed = False
        if config.show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(futures), desc="slides", unit="slide", position=0)
        try:
            client.subscribe_topic(EVENT_TOPIC, self._on_event)
            self._subscribed = True
        except Exception:  # an old scheduler: progress without slide names
            logger.debug("cannot subscribe to %s", EVENT_TOPIC, exc_info=True)

    def _on_event(self, event: Any) -> None:
        _, msg = event
        with self._lock:
            if msg.get("state") == "started":
                self._running[str(msg["worker"])] = str(msg["slide"])
            elif self._running.get(str(msg["worker"])) == msg.get("slide"):
                del self._running[str(msg["worker"])]

    def running(self) -> dict[str, str]:
        """Worker address -> the slide it is analysing now."""
        with self._lock:
            return dict(self._running)

    def run(self, on_outcome: Any) -> None:
        from distributed import wait

        pending = set(self._futures)
        done_count = 0
        while pending:
            try:
                done, pending = wait(  # type: ignore[no-untyped-call]
                    pending, timeout=1.0, return_when="FIRST_COMPLETED"
                )
            except TimeoutError:  # nothing finished this second
                done = set()
            for future in sorted(done, key=lambda f: self._index[f.key]):
                i = self._index[future.key]
                outcome, worker = self._outcome(i, future)
                done_count += 1
                logger.info(
                    "[%d/%d] %s: %s on %s (%.1f s)",
                    done_count,
                    len(self._futures),
                    self._slides[i],
                    outcome.status,
                    worker,
                    outcome.seconds,
                )
                on_outcome(i, outcome)
                if self._bar is not None:
                    self._bar.update(1)
            if self._bar is not None:
                names = ", ".join(f"{w}: {s}" for w, s in sorted(self.running().items()))
                self._bar.set_postfix_str(names, refresh=True)

    def _outcome(self, i: int, future: Any) -> tuple[SlideOutcome, str]:
        """The outcome of slide ``i`` (with its path as given) and the worker that ran it."""
        path = self._slides[i]
        try:
            result: SlideTaskResult = future.result()
        except Exception as exc:  # every retry lost (KilledWorker), or a bug in the task
            return self._task_failure(i, exc), "no worker"
        return dataclasses.replace(result.outcome, path=path), result.worker

    def _task_failure(self, i: int, exc: Exception) -> SlideOutcome:
        from distributed import KilledWorker

        from slidestream.wsi import slide_name

        path = self._slides[i]
        if isinstance(exc, KilledWorker):
            reason = (
                f"{path}: every Dask worker that ran this slide died ({exc}); check the "
                "workers' memory limit and logs"
            )
        else:
            reason = f"{path}: {type(exc).__name__}: {exc}"
        logger.error("%s", " ".join(reason.split()))
        fingerprint: str | None = None
        try:  # the fingerprint the local path would record
            fingerprint = self._client.submit(
                fingerprint_on_worker, Path(path).resolve(), self._config, pure=False
            ).result(timeout=120)
        except Exception:
            logger.debug("no fingerprint for %s", path, exc_info=True)
        return SlideOutcome(
            path=path,
            slide_name=slide_name(Path(path)),
            status="failed",
            fingerprint=fingerprint,
            parameters_hash=str(self._identity.parameters_hash),
            models=self._identity.models or {},
            reason=" ".join(reason.split()),
            error_class=type(exc).__name__,
        )

    def close(self) -> None:
        if self._subscribed:
            try:
                self._client.unsubscribe_topic(EVENT_TOPIC)
            except Exception:
                logger.debug("cannot unsubscribe from %s", EVENT_TOPIC, exc_info=True)
            self._subscribed = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _cancel(client: Any, futures: list[Any]) -> None:
    """Ctrl-C (or any error) in the client: cancel every slide task and wait until none runs.

    Queued tasks never start; running ones get :class:`TaskCancelled` raised in their thread,
    which removes their staging folder on the way out.
    """
    keys = [str(f.key) for f in futures if not f.done()]
    if not keys:
        return
    logger.warning("cancelling %d slide task(s) on the cluster ...", len(keys))
    try:
        client.cancel(futures, force=True)
        deadline = time.monotonic() + _CANCEL_WAIT_S
        interrupted: set[str] = set()
        while time.monotonic() < deadline:
            running = [k for ks in client.run(running_keys, keys).values() for k in ks]
            if not running:
                return
            fresh = [k for k in running if k not in interrupted]
            if fresh:  # once each: a second interrupt could stop its clean-up
                client.run(interrupt_tasks, fresh)
                interrupted.update(fresh)
            time.sleep(0.5)
        logger.error("slide tasks %s still running after %g s", running, _CANCEL_WAIT_S)
    except Exception:  # the cluster is gone: nothing runs there any more
        logger.debug("cancelling the slide tasks failed", exc_info=True)
