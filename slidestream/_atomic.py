"""Atomic file output, the one helper every package writes files with.

A file is written as ``<name>.tmp`` beside its target, flushed and fsynced, then renamed onto
the target with ``os.replace`` (atomic on POSIX within one folder) and the folder entry is
fsynced; its mode is ``0o666`` less the umask (:func:`file_mode`). A reader therefore never
sees a half-written output: either the previous file (or none) or the complete new one. When
the writer raises, the temporary file is removed and the target is left untouched.

This module is a bottom layer (like :mod:`slidestream.errors`): every package may import it, it
imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_open",
    "atomic_path",
    "file_mode",
    "temporary_name",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)


def temporary_name(path: Path) -> Path:
    """Return the temporary name used while ``path`` is written (``<name>.tmp``, same folder)."""
    return path.with_name(path.name + ".tmp")


def _umask() -> int:
    """The process umask (read from ``/proc`` where possible, so it is never changed)."""
    try:
        with Path("/proc/self/status").open(encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - not Linux
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def file_mode() -> int:
    """The mode of every output file: ``0o666`` less the umask (``0o644`` under umask 022).

    Outputs follow the umask as files created with ``open`` do, whatever the writer library
    (some create their files ``0o600``), so colleagues on shared storage can read all of them.
    """
    return 0o666 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry (the rename) to disk where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _remove_quietly(tmp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it onto ``path``.

    For writers that insist on opening the file themselves (``pyarrow.parquet.ParquetWriter``,
    ``PIL.Image.save``, ``safetensors.save_file``, tifffile). The temporary name ends in
    ``.tmp``, so writers that infer the format from the suffix must be told the format. On an
    exception the temporary file is removed and the exception re-raised.

    Parameters
    ----------
    path : str or PathLike
        Final destination. Its folder must exist.

    Yields
    ------
    Path
        ``<path>.tmp`` in the same folder (so the final ``os.replace`` is atomic).
    """
    target = Path(path)
    tmp = temporary_name(target)
    try:
        yield tmp
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(file_mode())
        tmp.replace(target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(target.parent)
    logger.debug("wrote %s", target)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open ``<path>.tmp`` for binary writing; on success flush, fsync and rename onto ``path``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_open(out) as fh:
    ...     _ = fh.write(b"hello")
    >>> out.read_bytes()
    b'hello'
    """
    target = Path(path)
    tmp = temporary_name(target)
    try:
        with tmp.open("wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(file_mode())
        tmp.replace(target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(target.parent)
    logger.debug("wrote %s", target)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path) as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (newlines as given); returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON (no NaN) atomically; returns the path."""
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return write_text_atomic(path, text)
