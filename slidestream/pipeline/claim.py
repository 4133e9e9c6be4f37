"""Claiming a slide's output folder, so that two runs into one ``OUT`` never work on one slide.

Before a slide is analysed, its run creates ``OUT/.<folder>.lock`` (``<folder>`` being the
slide's output folder, see :mod:`.plan`), holding the owner's pid, host name, process start
time and the time of the claim as JSON. The file is written under a temporary name and linked
into place (``os.link`` fails when the lock exists), so a lock is never seen half-written and
exactly one of two runs racing for a slide gets it. The other one skips the slide (it is being
analysed) and names the owner.

A lock is *stale* when its owner is gone: same host and the pid is not running (or runs a
different process: its start time differs), or the file is unreadable and older than
:data:`UNREADABLE_STALE_S`. A stale lock (``kill -9``, power cut) is taken over, so a rerun
recovers. A lock of another host is never taken over (its pid cannot be checked from here); the
skip message names the file to remove when no run is active there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

__all__ = ["LockOwner", "SlideClaim", "claim_folder", "lock_path"]

logger = logging.getLogger(__name__)

UNREADABLE_STALE_S = 60.0
"""An unreadable (empty, truncated) lock older than this many seconds is stale."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LockOwner:
    """Who holds a slide's lock."""

    pid: int
    host: str
    process_start: str | None
    """Start time of the owner process (``/proc/<pid>/stat`` ticks), ``None`` where unknown."""
    claimed_at: str
    """ISO 8601 UTC time of the claim."""

    def describe(self) -> str:
        """``pid 123 on host lab-1 since 2026-...``."""
        return f"pid {self.pid} on host {self.host} since {self.claimed_at}"

    def to_json(self) -> dict[str, object]:
        """The lock file's content."""
        return {
            "pid": self.pid,
            "host": self.host,
            "process_start": self.process_start,
            "claimed_at": self.claimed_at,
        }


def lock_path(folder: Path) -> Path:
    """The lock file of a slide output folder: ``OUT/.<folder>.lock``."""
    return folder.with_name(f".{folder.name}.lock")


def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), else ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so split after its ")".
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _me() -> LockOwner:
    pid = os.getpid()
    return LockOwner(
        pid=pid,
        host=socket.gethostname(),
        process_start=_process_start(pid),
        claimed_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _read(path: Path) -> LockOwner | None:
    """The owner recorded in a lock file; ``None`` when it is unreadable. Missing: raises."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        start = data.get("process_start")
        return LockOwner(
            pid=int(data["pid"]),
            host=str(data["host"]),
            process_start=None if start is None else str(start),
            claimed_at=str(data.get("claimed_at", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _alive(owner: LockOwner) -> bool:
    """Whether the owner of a lock may still be running (always true for another host)."""
    if owner.host != socket.gethostname():
        return True
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    if owner.process_start is not None:
        now = _process_start(owner.pid)
        if now is not None and now != owner.process_start:
            return False  # the pid was reused by another process
    return True


def _stale(path: Path, owner: LockOwner | None) -> bool:
    if owner is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > UNREADABLE_STALE_S
    return not _alive(owner)


def _create(path: Path, owner: LockOwner) -> bool:
    """Create the lock atomically with ``owner``'s content; ``False`` when it exists."""
    tmp = path.with_name(f"{path.name}.{owner.pid}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)  # OUT (analyse_slide may be called directly)
    tmp.write_text(json.dumps(owner.to_json()) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        # A file system without hard links: exclusive create (a reader may, for an instant,
        # see an empty file; it is then treated as held until UNREADABLE_STALE_S).
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(tmp.read_text(encoding="utf-8"))
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _remove_stale(path: Path, seen: LockOwner | None) -> None:
    """Remove a stale lock, unless another process replaced it meanwhile."""
    grave = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        path.rename(grave)
    except FileNotFoundError:
        return
    try:
        removed = _read(grave)
    except OSError:
        removed = None
    if removed != seen:
        # Another run took the stale lock over between our read and our rename: put its lock
        # back (a link, so a lock created in the meantime is not overwritten).
        with contextlib.suppress(FileExistsError):
            os.link(grave, path)
    grave.unlink(missing_ok=True)


class SlideClaim:
    """A held lock on a slide output folder; a context manager releasing it (idempotent)."""

    def __init__(self, path: Path, owner: LockOwner) -> None:
        self.path = path
        self.owner = owner

    def __enter__(self) -> SlideClaim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        try:
            current = _read(self.path)
        except OSError:
            return
        if current == self.owner:
            self.path.unlink(missing_ok=True)


def claim_folder(folder: Path, *, attempts: int = 5) -> SlideClaim | LockOwner:
    """Claim a slide's output folder.

    Parameters
    ----------
    folder
        The slide's output folder ``OUT/<folder>`` (it need not exist; ``OUT`` must).
    attempts
        How often a stale lock is taken over before giving up (each race lost to another run
        costs one attempt).

    Returns
    -------
    SlideClaim or LockOwner
        The claim (release it when the slide is published or has failed), or the live owner
        of the lock when another run holds it.

    Raises
    ------
    OSError
        The lock cannot be written (e.g. a read-only ``OUT``).
    """
    path = lock_path(folder)
    me = _me()
    owner: LockOwner | None = None
    for _ in range(attempts):
        if _create(path, me):
            logger.debug("%s: claimed (%s)", path, me.describe())
            return SlideClaim(path, me)
        try:
            owner = _read(path)
        except FileNotFoundError:
            continue  # released meanwhile
        if not _stale(path, owner):
            break
        logger.warning(
            "%s: removing the stale lock of %s",
            path,
            owner.describe() if owner is not None else "an unreadable lock file",
        )
        _remove_stale(path, owner)
    if owner is None:
        owner = LockOwner(pid=0, host="?", process_start=None, claimed_at="?")
    return owner
