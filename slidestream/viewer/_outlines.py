"""Nucleus outlines by row number, read from ``nuclei.geojson.gz`` without loading all of it.

``nuclei.parquet`` has no outlines; the GeoJSON has them, feature ``i`` being parquet row ``i``.
Its writer emits one gzip member per chunk of features, so the file is indexed once (one
decompressing pass that records where each member starts and how many features it holds; about
1 s per 10^6 nuclei) and afterwards an outline query decompresses only the members that hold the
requested rows (kept in a byte-bounded cache with the offsets of their features). A plain
``.geojson`` is indexed the same way in blocks of features.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson
from isal import isal_zlib

from slidestream.errors import ConfigError

from ._cache import ByteLRU

__all__ = ["MemberText", "OutlineStore", "member_cache"]

logger = logging.getLogger(__name__)

_FEATURE: Final = b'{"type":"Feature"'
_FEATURE_RE: Final = re.compile(re.escape(_FEATURE))
_READ_BLOCK: Final = 8 * 1024 * 1024
_PLAIN_BLOCK_FEATURES: Final = 4096


MemberText = tuple[bytes, npt.NDArray[np.int64]]
"""A decompressed block of features and the offsets of its features."""


def member_cache(limit_bytes: int) -> ByteLRU[MemberText]:
    """A byte-bounded cache of decompressed feature blocks, for one or several stores."""
    return ByteLRU(limit_bytes, lambda item: len(item[0]) + item[1].nbytes)


@dataclass(frozen=True, slots=True)
class _Member:
    start: int
    """Byte offset in the file."""
    stop: int
    """End offset (exclusive)."""
    first_row: int
    """Row number of its first feature."""
    count: int
    """Features it holds."""


class OutlineStore:
    """Outlines (GeoJSON geometries, level-0 px) of the nuclei of one GeoJSON file.

    Parameters
    ----------
    path
        ``nuclei.geojson.gz`` (gzip members) or ``nuclei.geojson``.
    cache
        Decompressed members kept in memory (shared by the stores of all slides; keys are
        ``(path, member)``); ``None``: a private 64 MiB cache.
    """

    def __init__(self, path: Path, *, cache: ByteLRU[MemberText] | None = None) -> None:
        self.path = path
        self._gz = path.name.lower().endswith(".gz")
        self._members: list[_Member] | None = None
        self._first_rows: npt.NDArray[np.int64] = np.zeros(0, np.int64)
        self._lock = threading.Lock()
        self._cache = cache if cache is not None else member_cache(64 * 1024 * 1024)

    # ------------------------------------------------------------------ index
    def _ensure_index(self) -> list[_Member]:
        with self._lock:
            if self._members is None:
                members = self._scan_gzip() if self._gz else self._scan_plain()
                self._first_rows = np.asarray([m.first_row for m in members], np.int64)
                self._members = members
                logger.info(
                    "%s: %d features in %d blocks indexed",
                    self.path,
                    sum(m.count for m in members),
                    len(members),
                )
            return self._members

    def _scan_gzip(self) -> list[_Member]:
        members: list[_Member] = []
        keep = len(_FEATURE) - 1
        with self.path.open("rb") as fh:
            decomp = isal_zlib.decompressobj(wbits=31)
            start = consumed = count = rows = 0
            tail = b""
            while True:
                data = fh.read(_READ_BLOCK)
                if not data:
                    break
                while data:
                    try:
                        out = decomp.decompress(data)
                    except Exception as exc:  # isal_zlib.error: not gzip, or truncated
                        raise ConfigError(
                            f"{self.path}: corrupt gzip data at byte {consumed} ({exc}); rerun "
                            "slidestream run"
                        ) from exc
                    seen = tail + out
                    count += seen.count(_FEATURE)
                    tail = seen[-keep:] if keep else b""
                    if decomp.eof:
                        used = len(data) - len(decomp.unused_data)
                        stop = consumed + used
                        members.append(_Member(start, stop, rows, count))
                        rows += count
                        data = decomp.unused_data
                        start = consumed = stop
                        count, tail = 0, b""
                        decomp = isal_zlib.decompressobj(wbits=31)
                    else:
                        consumed += len(data)
                        data = b""
        return [m for m in members if m.count > 0]

    def _scan_plain(self) -> list[_Member]:
        data = self.path.read_bytes()
        starts = np.asarray([m.start() for m in _FEATURE_RE.finditer(data)], np.int64)
        members = []
        for i in range(0, starts.size, _PLAIN_BLOCK_FEATURES):
            j = min(starts.size, i + _PLAIN_BLOCK_FEATURES)
            stop = int(starts[j]) if j < starts.size else len(data)
            members.append(_Member(int(starts[i]), stop, i, j - i))
        return members

    # ------------------------------------------------------------------ reading
    def _member_text(self, k: int, member: _Member) -> tuple[bytes, npt.NDArray[np.int64]]:
        key = (str(self.path), k)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        with self.path.open("rb") as fh:
            fh.seek(member.start)
            raw = fh.read(member.stop - member.start)
        text = isal_zlib.decompress(raw, wbits=31) if self._gz else raw
        starts = np.asarray([m.start() for m in _FEATURE_RE.finditer(text)], np.int64)
        if starts.size != member.count:
            raise ConfigError(
                f"{self.path}: block at byte {member.start} holds {starts.size} features, "
                f"expected {member.count}; the file changed, reload the page"
            )
        item = (text, starts)
        self._cache.put(key, item)
        return item

    def geometries(self, rows: npt.NDArray[np.integer[Any]]) -> list[Any]:
        """The GeoJSON geometry of each row (in the order given).

        Raises
        ------
        ConfigError
            A row beyond the file, or a file that is not the writer's.
        """
        members = self._ensure_index()
        if not members:
            if rows.size:
                raise ConfigError(f"{self.path}: no features; rerun slidestream run")
            return []
        rows = np.asarray(rows, np.int64)
        which = np.searchsorted(self._first_rows, rows, side="right") - 1
        out: list[Any] = [None] * rows.size
        for k in np.unique(which):
            member = members[int(k)]
            text, starts = self._member_text(int(k), member)
            for i in np.flatnonzero(which == k):
                local = int(rows[i] - member.first_row)
                if not 0 <= local < member.count:
                    raise ConfigError(f"{self.path}: nucleus {int(rows[i])} is not in the file")
                a = int(starts[local])
                b = int(starts[local + 1]) if local + 1 < starts.size else len(text)
                try:
                    out[i] = _parse_feature(text[a:b])["geometry"]
                except orjson.JSONDecodeError as exc:
                    raise ConfigError(
                        f"{self.path}: nucleus {int(rows[i])} is not valid GeoJSON ({exc}); "
                        "rerun slidestream run"
                    ) from exc
        return out

    def close(self) -> None:
        """Drop this file's cached blocks."""
        name = str(self.path)
        self._cache.discard(lambda key: isinstance(key, tuple) and key[0] == name)


def _parse_feature(chunk: bytes) -> dict[str, Any]:
    """One feature's JSON from its text up to the next feature (comma, footer stripped)."""
    text = chunk.rstrip(b" \t\r\n\x00").rstrip(b",").rstrip()
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        if not text.endswith(b"]}"):  # the last feature, followed by the collection's end
            raise
        value = orjson.loads(text[:-2].rstrip().rstrip(b",").rstrip())
    if not isinstance(value, dict) or "geometry" not in value:
        raise orjson.JSONDecodeError("not a GeoJSON feature", text.decode("utf-8", "replace"), 0)
    return value
