"""Atomic file output: write ``<name>.tmp`` beside the target, fsync, then rename.

A reader never sees a half-written output: either the previous file (or none) or the complete new
one. When the writer raises, the temporary file is removed and the target is left untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_open", "atomic_path", "temporary_name"]

logger = logging.getLogger(__name__)


def temporary_name(path: Path) -> Path:
    """Return the temporary name used while ``path`` is written (``<name>.tmp``, same folder)."""
    return path.with_name(path.name + ".tmp")


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
    ``PIL.Image.save``). On an exception the temporary file is removed and the exception re-raised.

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
        tmp.replace(target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(target.parent)
    logger.debug("wrote %s", target)
