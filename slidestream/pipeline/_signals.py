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
import signal
import threading
from collections.abc import Iterator

__all__ = ["sigint_ignored"]


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
