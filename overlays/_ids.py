"""Deterministic object ids: ``uuid5(NUCLEUS_ID_NAMESPACE, f"{slide_fingerprint}:{index}")``."""

from __future__ import annotations

import hashlib
import uuid
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["NUCLEUS_ID_NAMESPACE", "nucleus_ids", "uuid5_text"]

NUCLEUS_ID_NAMESPACE: Final = uuid.UUID("5d1e5a7e-0b8c-5c5e-9a43-51de57ea0000")
"""uuid5 namespace of every slidestream object id (nuclei and tissue annotations)."""

_HEX: Final = np.frombuffer(b"0123456789abcdef", np.uint8)
_UUID_HEX_POS: Final = np.r_[0:8, 9:13, 14:18, 19:23, 24:36]


def uuid5_text(id_namespace: str, start: int, count: int) -> npt.NDArray[np.uint8]:
    """Canonical uuid5 strings of nuclei ``start ..`` as a (count, 36) uint8 ASCII matrix."""
    base = hashlib.sha1(NUCLEUS_ID_NAMESPACE.bytes + f"{id_namespace}:".encode())
    digests = bytearray()
    for i in range(start, start + count):
        h = base.copy()
        h.update(str(i).encode())
        digests += h.digest()[:16]
    raw = np.frombuffer(bytes(digests), np.uint8).reshape(count, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    text = np.full((count, 36), ord("-"), np.uint8)
    hexed = np.empty((count, 32), np.uint8)
    hexed[:, 0::2] = _HEX[raw >> 4]
    hexed[:, 1::2] = _HEX[raw & 0x0F]
    text[:, _UUID_HEX_POS] = hexed
    return text


def nucleus_ids(id_namespace: str, start: int, count: int) -> list[str]:
    """Return the ids of nuclei ``start .. start + count - 1`` of a slide, as canonical strings.

    Equal to ``str(uuid.uuid5(NUCLEUS_ID_NAMESPACE, f"{id_namespace}:{index}"))``, computed in bulk.

    Examples
    --------
    >>> import uuid
    >>> nucleus_ids("abc", 7, 1) == [str(uuid.uuid5(NUCLEUS_ID_NAMESPACE, "abc:7"))]
    True
    """
    if count <= 0:
        return []
    text = uuid5_text(id_namespace, start, count)
    return text.view("S36").ravel().astype("U36").tolist()  # type: ignore[no-any-return]
