"""Slide fingerprints: OpenSlide quickhash-1 where available, else sha256 of the file bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

__all__ = ["sha256_of_files"]

_CHUNK_BYTES = 4 * 1024 * 1024


def sha256_of_files(paths: Iterable[Path]) -> str:
    """Hex sha256 over the bytes of ``paths`` (in the given order).

    For a multi-file slide (a DICOM folder) each file's name is hashed before its bytes, so a
    renamed member changes the fingerprint but the folder's own location does not.

    Parameters
    ----------
    paths
        Files to hash; a single slide file is a one-element sequence.

    Returns
    -------
    str
        64 lower-case hex digits (the same shape as OpenSlide's quickhash-1).
    """
    digest = hashlib.sha256()
    members = list(paths)
    for member in members:
        if len(members) > 1:
            digest.update(member.name.encode("utf-8") + b"\0")
        with member.open("rb") as fh:
            while chunk := fh.read(_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()
