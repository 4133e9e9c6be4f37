"""Stage 1, plan: which slides, where each one's outputs go, and whether to redo it.

Output folders. A slide's results go to ``OUT/<name>/``, ``<name>`` being the slide's file name
without its extension (``a/slide.svs`` -> ``slide``), except when that could mix two different
slides. The rule, in order:

1. a folder ``OUT/<name>/`` or ``OUT/<name>-<fp8>/`` whose ``summary.json`` belongs to this
   slide (same fingerprint) is the slide's folder (so reruns find their results);
2. otherwise ``OUT/<name>/``, if no other slide of the batch has the same name and the folder
   holds no other slide's results;
3. otherwise ``OUT/<name>-<fp8>/``, ``<fp8>`` being the first 8 hex digits of the slide's
   fingerprint (``a/slide.svs`` and ``b/slide.svs`` -> ``slide-1f0c93ab/`` and
   ``slide-7e21d4c0/``).

Two different slides therefore never share a folder, and a slide's folder depends only on its
name, its content and what ``OUT`` already holds.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from slidestream.config import RunConfig
from slidestream.summary import SUMMARY_NAME, Summary

from ._models import LoadedModels

__all__ = ["SlidePlan", "output_folder", "plan_slide", "read_summary", "shared_names"]

logger = logging.getLogger(__name__)


def read_summary(slide_out: Path) -> Summary | None:
    """The published ``summary.json`` of a slide folder, or ``None`` when absent or unreadable."""
    import json

    from slidestream.errors import ConfigError

    path = slide_out / SUMMARY_NAME
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
        return Summary.from_json(data, source=str(path))
    except (OSError, ValueError, ConfigError, TypeError):
        return None


def shared_names(paths: Iterable[Path]) -> frozenset[str]:
    """Slide names given by more than one slide of a batch (their folders get ``-<fp8>``)."""
    from slidestream.wsi import slide_name

    counts = Counter(slide_name(Path(p)) for p in paths)
    return frozenset(name for name, n in counts.items() if n > 1)


def output_folder(out_dir: Path, name: str, fingerprint: str, *, shared_name: bool) -> Path:
    """The output folder of a slide (see the module docstring for the rule).

    Parameters
    ----------
    out_dir
        The run's output folder.
    name
        The slide's name (file name without the slide extension).
    fingerprint
        The slide's fingerprint.
    shared_name
        Whether another slide of the batch has the same name.

    Returns
    -------
    Path
        ``out_dir / name`` or ``out_dir / f"{name}-{fingerprint[:8]}"``.
    """
    plain, suffixed = out_dir / name, out_dir / f"{name}-{fingerprint[:8]}"
    owners = {}
    for folder in (plain, suffixed):
        summary = read_summary(folder)
        owners[folder] = None if summary is None else summary.slide.fingerprint
    for folder in (plain, suffixed):
        if owners[folder] == fingerprint:
            return folder
    if not shared_name and owners[plain] is None:
        return plain
    if owners[suffixed] not in (None, fingerprint):  # pragma: no cover - 32-bit prefix clash
        return out_dir / f"{name}-{fingerprint}"
    return suffixed


@dataclass(frozen=True, slots=True, kw_only=True)
class SlidePlan:
    """What to do with one slide: its identity, its folder, and whether it is up to date."""

    path: Path
    """The slide as given."""
    name: str
    fingerprint: str
    parameters_hash: str
    output_dir: Path
    previous: Summary | None
    """The summary already in ``output_dir`` (``None`` if none)."""
    up_to_date: bool
    """``previous`` has this slide's fingerprint and parameters hash (and no ``--force``)."""


def plan_slide(
    path: Path,
    name: str,
    fingerprint: str,
    config: RunConfig,
    models: LoadedModels,
    *,
    shared_name: bool,
) -> SlidePlan:
    """Plan one opened slide: its output folder and the skip decision."""
    parameters_hash = config.parameters_hash(models.hashes())
    folder = output_folder(config.out_dir, name, fingerprint, shared_name=shared_name)
    previous = read_summary(folder)
    up_to_date = (
        not config.force
        and previous is not None
        and previous.slide.fingerprint == fingerprint
        and previous.provenance.parameters_hash == parameters_hash
    )
    return SlidePlan(
        path=path,
        name=name,
        fingerprint=fingerprint,
        parameters_hash=parameters_hash,
        output_dir=folder,
        previous=previous,
        up_to_date=up_to_date,
    )
