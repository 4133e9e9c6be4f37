"""The analysed slides of an output folder, and safe access to their result files.

Nothing from a URL ever becomes a path: a request names a slide, the name is looked up among the
folders found by listing ``OUT`` (exact match), and a result file is one of the fixed names of
:data:`RESULT_FILES` inside that folder. A folder or file that resolves outside ``OUT`` (a
symbolic link out of it) is ignored. The slide file itself is the one its ``summary.json``
names (it usually lives outside ``OUT``).
"""

from __future__ import annotations

import csv
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import orjson

from slidestream.db import RunOutcome
from slidestream.wsi import slide_name

__all__ = ["RESULT_FILES", "ResultCatalog", "SlideEntry", "SlideStatus"]

logger = logging.getLogger(__name__)

SlideStatus = Literal["done", "failed", "skipped", "incomplete", "running"]

RESULT_FILES: Final[Mapping[str, str]] = {
    "summary": "summary.json",
    "tissue": "tissue.geojson",
    "nuclei_parquet": "nuclei.parquet",
    "nuclei_geojson": "nuclei.geojson.gz",
    "overlay": "overlay.png",
    "tissue_mask": "tissue_mask.png",
}
"""The result files a viewer may read, by kind (``slidestream run`` output names)."""
_OUTPUT_KEYS: Final[Mapping[str, str]] = {
    "summary": "summary_json",
    "tissue": "tissue_geojson",
    "nuclei_parquet": "nuclei_parquet",
    "nuclei_geojson": "nuclei_geojson",
    "overlay": "overlay_png",
    "tissue_mask": "tissue_mask_png",
}
_FAILURES: Final = "failures.csv"


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideEntry:
    """One slide of the catalogue (from ``OUT`` or only from the database)."""

    name: str
    """The slide's name: its folder name in ``OUT`` (the key in URLs)."""
    status: SlideStatus
    """``done`` (results complete), ``failed``, ``skipped``, ``incomplete`` (no summary)."""
    reason: str | None = None
    """Why it failed or was skipped."""
    folder: Path | None = None
    """Resolved result folder inside ``OUT``; ``None`` for a slide known only to the database."""
    summary: Mapping[str, Any] | None = field(default=None, repr=False)
    """The parsed ``summary.json``."""
    version: int = 0
    """``summary.json`` modification time (ns): caches of a re-analysed slide are not reused."""
    slide_path: Path | None = None
    """The analysed slide file, as its summary names it."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Cohort metadata from the database."""

    @property
    def viewable(self) -> bool:
        """True when the results can be shown (a complete summary in ``OUT``)."""
        return self.folder is not None and self.summary is not None

    def statistics(self) -> Mapping[str, Any]:
        """``summary.json["statistics"]`` (empty when absent)."""
        stats = (self.summary or {}).get("statistics")
        return stats if isinstance(stats, Mapping) else {}


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):
        return False


class ResultCatalog:
    """The slides of an output folder (rescanned on demand, summaries cached by mtime).

    Parameters
    ----------
    out_dir
        The output folder of ``slidestream run``.
    runs
        Optional source of database outcomes (latest run per slide name).
    metadata
        Optional source of database metadata per slide name.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        runs: Callable[[], Sequence[RunOutcome]] | None = None,
        metadata: Callable[[], Mapping[str, Mapping[str, str]]] | None = None,
    ) -> None:
        self.root = out_dir.resolve()
        self._runs = runs
        self._metadata = metadata
        self._lock = threading.Lock()
        self._summaries: dict[str, tuple[int, int, Mapping[str, Any] | None]] = {}
        self._entries: dict[str, SlideEntry] = {}

    # ------------------------------------------------------------------ scanning
    def refresh(self) -> list[SlideEntry]:
        """Rescan ``OUT`` (and the database); return every entry sorted by name."""
        entries: dict[str, SlideEntry] = {}
        failures = self._failures()
        try:
            listing = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as exc:
            logger.error("%s: cannot list the output folder (%s)", self.root, exc)
            listing = []
        for item in listing:
            name = item.name
            if name.startswith(".") or not _is_plain_name(name):
                continue
            folder = Path(item.path)
            if not folder.is_dir() or not _inside(folder, self.root):
                continue
            entries[name] = self._scan_folder(name, folder.resolve(), failures.get(name))
        for name, reason in failures.items():
            if name not in entries:
                entries[name] = SlideEntry(name=name, status="failed", reason=reason)
        self._merge_database(entries)
        with self._lock:
            self._entries = entries
        return [entries[k] for k in sorted(entries)]

    def get(self, name: str) -> SlideEntry | None:
        """The entry of slide ``name`` (exact match; rescans once when unknown)."""
        with self._lock:
            entry = self._entries.get(name)
        folder = entry.folder if entry is not None else None
        if entry is not None and folder is not None:
            # refresh this one slide cheaply (a re-analysis or removal shows at once)
            if not folder.is_dir():
                entry = None
            else:
                entry = self._scan_folder(name, folder, entry.reason)
                with self._lock:
                    self._entries[name] = entry
                return entry
        if entry is None:
            return next((e for e in self.refresh() if e.name == name), None)
        return entry

    def result_file(self, entry: SlideEntry, kind: str) -> Path | None:
        """The result file ``kind`` (a key of :data:`RESULT_FILES`) of a slide, if present.

        Returns ``None`` unless it is a regular file that resolves inside ``OUT``.
        """
        if entry.folder is None or kind not in RESULT_FILES:
            return None
        name = RESULT_FILES[kind]
        outputs = (entry.summary or {}).get("outputs")
        if isinstance(outputs, Mapping):
            named = outputs.get(_OUTPUT_KEYS[kind])
            if isinstance(named, str) and _is_plain_name(named) and not named.startswith("."):
                name = named
        path = entry.folder / name
        if not path.is_file() or not _inside(path, self.root):
            return None
        return path.resolve()

    # ------------------------------------------------------------------ internals
    def _read_summary(self, path: Path) -> tuple[int, Mapping[str, Any] | None]:
        try:
            st = path.stat()
        except OSError:
            return 0, None
        key = str(path)
        cached = self._summaries.get(key)
        if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
            return st.st_mtime_ns, cached[2]
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            logger.warning("%s: unreadable summary (%s)", path, exc)
            data = None
        summary = data if isinstance(data, dict) else None
        self._summaries[key] = (st.st_mtime_ns, st.st_size, summary)
        return st.st_mtime_ns, summary

    def _scan_folder(self, name: str, folder: Path, failure: str | None) -> SlideEntry:
        summary_path = folder / RESULT_FILES["summary"]
        if not summary_path.is_file() or not _inside(summary_path, self.root):
            return SlideEntry(
                name=name,
                status="failed" if failure else "incomplete",
                reason=failure or "no summary.json: the analysis did not finish; rerun it",
                folder=folder,
            )
        version, summary = self._read_summary(summary_path)
        if summary is None:
            return SlideEntry(
                name=name,
                status="incomplete",
                reason=f"{summary_path}: summary.json is not valid JSON; rerun the analysis",
                folder=folder,
                version=version,
            )
        slide_info = summary.get("slide")
        raw_path = slide_info.get("path") if isinstance(slide_info, Mapping) else None
        slide_path = None
        if isinstance(raw_path, str) and raw_path:
            candidate = Path(raw_path).expanduser()
            if not candidate.is_absolute() and not candidate.exists():
                candidate = self.root / candidate
            slide_path = candidate
        return SlideEntry(
            name=name,
            status="failed" if failure else "done",
            reason=failure,
            folder=folder,
            summary=summary,
            version=version,
            slide_path=slide_path,
        )

    def _failures(self) -> dict[str, str]:
        path = self.root / _FAILURES
        if not path.is_file() or not _inside(path, self.root):
            return {}
        out: dict[str, str] = {}
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    raw = row.get("path") or ""
                    if raw:
                        out[slide_name(Path(raw))] = row.get("error") or "failed"
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            logger.warning("%s: unreadable (%s)", path, exc)
        return out

    def _merge_database(self, entries: dict[str, SlideEntry]) -> None:
        if self._runs is None:
            return
        try:
            runs = list(self._runs())
            metadata = dict(self._metadata()) if self._metadata is not None else {}
        except Exception as exc:  # the slide list must work without the database
            logger.error("database unavailable for the slide list: %s", exc)
            return
        for run in runs:
            known = entries.get(run.slide_name)
            meta = metadata.get(run.slide_name, {})
            if known is None:
                entries[run.slide_name] = SlideEntry(
                    name=run.slide_name,
                    status=_db_status(run.status),
                    reason=run.error,
                    metadata=meta,
                )
                continue
            status = known.status
            reason = known.reason
            if not known.viewable and run.status in ("failed", "skipped"):
                status, reason = _db_status(run.status), run.error or reason
            entries[run.slide_name] = SlideEntry(
                name=known.name,
                status=status,
                reason=reason,
                folder=known.folder,
                summary=known.summary,
                version=known.version,
                slide_path=known.slide_path,
                metadata=meta,
            )
        for name, meta in metadata.items():
            known = entries.get(name)
            if known is not None and not known.metadata:
                entries[name] = SlideEntry(
                    name=known.name,
                    status=known.status,
                    reason=known.reason,
                    folder=known.folder,
                    summary=known.summary,
                    version=known.version,
                    slide_path=known.slide_path,
                    metadata=meta,
                )


def _db_status(status: str) -> SlideStatus:
    if status == "succeeded":
        return "done"
    if status in ("failed", "skipped", "running"):
        return status  # type: ignore[return-value]
    return "incomplete"
