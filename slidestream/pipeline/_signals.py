"""Helper processes that ignore the terminal's Ctrl-C; the main process stops them.

Ctrl-C sends SIGINT to the whole foreground process group: the main process and every worker.
A worker that gets it prints its own ``KeyboardInterrupt`` traceback (in the middle of an
import, say). Workers are therefore started with SIGINT ignored: an ignored signal stays
ignored across ``exec`` (spawned processes, the fork server) and ``fork`` (the tile readers
forked from the fork server), and Python keeps it ignored at start-up. The main process turns
the interrupt into one clean stop (:func:`slidestream.pipeline.run.stop_workers`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Iterator

__all__ = ["sigint_ignored", "terminate_children"]


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while child processes are started (no effect outside the main thread).

    The block only starts processes (fork + exec: milliseconds; their imports run after it), so
    a Ctrl-C is ignored for milliseconds at most. A Python handler would not do: ``exec``
    resets it to the default, and the child would raise ``KeyboardInterrupt`` again.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def terminate_children() -> int:
    """Send SIGTERM to every child process now; returns how many.

    Called from the interrupt handler itself, before the batch unwinds: unwinding releases the
    loaders' queues and semaphores, and a tile reader still starting would then fail on a
    removed semaphore and print its traceback. A child killed by SIGTERM's default action
    prints nothing. :func:`slidestream.pipeline.run.stop_workers` then reaps them.
    """
    children = multiprocessing.active_children()
    for child in children:
        with contextlib.suppress(OSError, ValueError):
            child.terminate()
    return len(children)
