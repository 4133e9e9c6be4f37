"""Turn ``slidestream run`` inputs (files, folders, manifest CSVs) into a list of slides."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable
from pathlib import Path

from slidestream.errors import ConfigError
from slidestream.wsi import SLIDE_EXTENSIONS

__all__ = ["discover_slides", "slide_suffix"]

logger = logging.getLogger(__name__)

# Image formats that are slides only when named explicitly (a folder of PNG tiles is not a batch
# of slides) and the companion files of multi-file formats, which are never slides themselves.
_EXPLICIT_ONLY = frozenset({".png", ".jpg", ".jpeg"})
_DICOM = ".dcm"


def slide_suffix(path: Path) -> str:
    """The slide extension of ``path``, lower case, double suffixes included (``.ome.tif``)."""
    name = path.name.lower()
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _decode_manifest(manifest: Path, data: bytes) -> str:
    """The text of a manifest: UTF-8, with or without a byte-order mark."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{manifest}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}; Excel's "
            "'CSV' is cp1252); save it as 'CSV UTF-8 (Comma delimited)' or convert it, e.g. "
            f"`iconv -f cp1252 -t utf-8 '{manifest}' > manifest-utf8.csv`"
        ) from exc


def _from_manifest(manifest: Path) -> list[Path]:
    try:
        text = _decode_manifest(manifest, manifest.read_bytes())
        with io.StringIO(text, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ConfigError(
                    f"{manifest}: manifest CSV has no 'path' column; add a header line "
                    "with a column named path"
                )
            rows = [row["path"].strip() for row in reader if row.get("path", "").strip()]
    except OSError as exc:
        raise ConfigError(f"{manifest}: cannot read manifest ({exc})") from exc
    except csv.Error as exc:
        raise ConfigError(f"{manifest}: not a valid CSV file ({exc}); fix the file") from exc
    base = manifest.parent
    return [(base / p) if not Path(p).is_absolute() else Path(p) for p in rows]


def _from_folder(folder: Path) -> list[Path]:
    found: list[Path] = []
    dicom_dirs: set[Path] = set()
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.parts[-2:]):
            continue
        suffix = slide_suffix(path)
        if suffix == _DICOM:
            dicom_dirs.add(path.parent)  # a DICOM WSI series is one slide per folder
        elif suffix in SLIDE_EXTENSIONS and suffix not in _EXPLICIT_ONLY:
            found.append(path)
    found.extend(sorted(dicom_dirs))
    return found


def discover_slides(inputs: Iterable[Path]) -> list[Path]:
    """Expand inputs into slide paths, in a deterministic order without duplicates.

    Parameters
    ----------
    inputs
        Slide files, folders (searched recursively for known slide extensions; each folder of
        DICOM files counts as one slide) and manifest CSVs with a ``path`` column (relative paths
        are relative to the CSV).

    Returns
    -------
    list of Path
        Slides to analyse. Missing files are kept, so the batch reports them as failures.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        if item.is_dir():
            paths = _from_folder(item)
            if not paths:
                logger.warning("%s: folder holds no slide files", item)
        elif item.suffix.lower() == ".csv":
            paths = _from_manifest(item)
        else:
            paths = [item]
        for path in paths:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out
