"""The library function behind each command of the CLI (which only parses options).

Each function takes typed values, does the work (files are written here or below, atomically)
and returns a typed report the CLI prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slidestream.config import RunConfig
from slidestream.pipeline import Recorder, SlideOutcome, run_batch

__all__ = ["BatchReport", "DemoReport", "run_demo", "run_slides"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchReport:
    """What ``slidestream run`` reports: every outcome, the console lines, the exit code."""

    outcomes: list[SlideOutcome] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    """The recorder's console summary."""
    exit_code: int = 0
    """0 when no slide failed (skipped slides are not failures), else 1."""


def run_slides(
    inputs: Sequence[Path], config: RunConfig, *, dask_scheduler: str | None = None
) -> BatchReport:
    """``slidestream run``: a local batch, or Dask tasks with ``dask_scheduler``; recorded."""
    with Recorder(config) as recorder:
        if dask_scheduler:
            from slidestream.distributed import run_batch_dask

            outcomes = run_batch_dask(
                list(inputs), config, scheduler=dask_scheduler, recorder=recorder
            )
        else:
            outcomes = run_batch(list(inputs), config, recorder=recorder)
    return BatchReport(
        outcomes=outcomes, lines=recorder.summary_lines(), exit_code=recorder.exit_code
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoReport:
    """What ``slidestream demo`` reports."""

    outcome: SlideOutcome
    lines: list[str]
    exit_code: int


def run_demo(
    out_dir: Path, *, force: bool = False, db_url: str | None = None, show_progress: bool = False
) -> DemoReport:
    """``slidestream demo``: generate the demo slide (once) and analyse it into ``out_dir``."""
    import logging

    from slidestream.demo_slide import write_demo_slide

    slide_path = out_dir / "demo-slide.svs"
    if force or not slide_path.exists():
        logging.getLogger(__name__).warning("generating demo slide %s ...", slide_path)
        write_demo_slide(slide_path)
    config = RunConfig(out_dir=out_dir, force=force, db_url=db_url, show_progress=show_progress)
    with Recorder(config) as recorder:
        (outcome,) = run_batch([slide_path], config, recorder=recorder)
    if outcome.status == "failed" or outcome.output_dir is None or outcome.summary is None:
        return DemoReport(outcome=outcome, lines=[f"demo failed: {outcome.reason}"], exit_code=1)
    stats = outcome.summary.statistics
    lines = [
        f"demo slide:  {slide_path}",
        f"outputs:     {outcome.output_dir}/",
        *(f"  {name}" for name in outcome.summary.outputs.values()),
        f"tissue {stats.tissue_area_mm2 or 0:.2f} mm², {stats.nucleus_count or 0} nuclei, "
        f"{stats.nuclei_per_mm2 or 0:.0f} nuclei/mm²",
    ]
    if db_url:
        lines.append(f"database:    {db_url} (try: slidestream query --db {db_url} --slides)")
    lines.append(
        "QuPath: open the slide (File > Open), then drag tissue.geojson and "
        "nuclei.geojson.gz onto the viewer (or File > Import objects)."
    )
    return DemoReport(outcome=outcome, lines=lines, exit_code=0)
