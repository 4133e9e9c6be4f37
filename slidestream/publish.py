"""Staging and publishing of a slide's outputs, so nothing is ever half-written.

Every output of a slide is first written into a hidden staging folder beside the final one
(``DIR/.<slide-name>.partial``). Only when all of them are complete are they moved, one
``os.replace`` each, into ``DIR/<slide-name>/``; ``summary.json`` — the marker that a slide is
done — is removed first and moved last. An interrupted run therefore leaves either the previous
complete result or no summary at all (the slide is redone on the next run), never a mix that
looks complete; the staging folder of an interrupted run is deleted when the slide is redone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["SUMMARY_NAME", "publish", "read_summary", "staging_dir", "write_json_atomic"]

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"


def staging_dir(out_dir: Path, slide_name: str) -> Path:
    """A fresh, empty staging folder for ``slide_name`` (a stale one is removed)."""
    stage = out_dir / f".{slide_name}.partial"
    if stage.exists():
        logger.info("%s: removing outputs of an interrupted run", stage)
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON via a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_summary(slide_out: Path) -> dict[str, Any] | None:
    """The published ``summary.json`` of a slide, or ``None`` when absent or unreadable."""
    path = slide_out / SUMMARY_NAME
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def publish(stage: Path, final: Path) -> None:
    """Move every file of ``stage`` into ``final``; ``summary.json`` goes last.

    Parameters
    ----------
    stage
        The staging folder holding complete outputs.
    final
        The slide's output folder (created if needed). Files of an earlier run that this run
        does not produce again are left in place.
    """
    final.mkdir(parents=True, exist_ok=True)
    (final / SUMMARY_NAME).unlink(missing_ok=True)  # not "done" while files are swapped
    summary = stage / SUMMARY_NAME
    for item in sorted(stage.iterdir()):
        if item != summary:
            item.replace(final / item.name)
    if summary.exists():
        summary.replace(final / SUMMARY_NAME)
    shutil.rmtree(stage, ignore_errors=True)
