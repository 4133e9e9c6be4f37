"""``slidestream run`` (batch whole-slide analysis) and ``slidestream demo``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from slidestream._cli_db import DB_ENVVAR, default_db_url

__all__ = ["register"]


def _db_url(option: str | None, out_dir: Path, no_db: bool) -> str | None:
    """``--db`` (or ``$SLIDESTREAM_DB``, filled in by click) else the output folder's SQLite."""
    if no_db:
        return None
    return option or default_db_url(out_dir)


@click.command("run")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder; each slide writes OUT/<slide-name>/.",
)
@click.option(
    "--mpp",
    type=click.FloatRange(0.01, 100.0),
    default=None,
    help="The slides' own level-0 µm/px, for slides that lack it (never a target resolution).",
)
@click.option("--nuclei-model", default=None, help="Nucleus model name or folder [default].")
@click.option("--tissue-model", default=None, help="Tissue model name or folder [default].")
@click.option("--device", default=None, help="auto (CUDA when present), cpu or cuda[:N] [auto].")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=None, help="Tiles per batch.")
@click.option(
    "--workers",
    type=click.IntRange(0, 64),
    default=None,
    help="Tile-reading worker processes [from the CPU count].",
)
@click.option(
    "--postprocess-workers",
    type=click.IntRange(0, 64),
    default=None,
    help=(
        "Nucleus post-processing processes [from the CPU count; 0 (in the main process) for "
        "an fp32 model on <= 2 CPU cores]."
    ),
)
@click.option(
    "--nuclei-as",
    type=click.Choice(["polygons", "points"]),
    default=None,
    help="Nuclei as outlines, or as centroids for slides too large for QuPath's memory.",
)
@click.option("--force", is_flag=True, help="Recompute slides whose results are up to date.")
@click.option(
    "--db",
    "db_url",
    default=None,
    metavar="URL",
    envvar=DB_ENVVAR,
    show_envvar=True,
    help="Statistics database (SQLAlchemy URL); default OUT/slidestream.db.",
)
@click.option("--no-db", is_flag=True, help="Record nothing in a database.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="TOML file of run options (command-line options win).",
)
@click.option(
    "--dask",
    "dask_scheduler",
    default=None,
    metavar="ADDRESS",
    help="Run slides as tasks on a Dask distributed cluster (scheduler address); OUT must be "
    "shared storage.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def run_command(
    inputs: tuple[Path, ...],
    out_dir: Path,
    mpp: float | None,
    nuclei_model: str | None,
    tissue_model: str | None,
    device: str | None,
    batch_size: int | None,
    workers: int | None,
    postprocess_workers: int | None,
    nuclei_as: str | None,
    force: bool,
    db_url: str | None,
    no_db: bool,
    config_file: Path | None,
    dask_scheduler: str | None,
    no_progress: bool,
) -> None:
    """Analyse whole slides: nuclei, tissue classes, QuPath overlays and slide statistics.

    INPUTS are slide files, folders (searched recursively) or manifest CSVs with a `path`
    column. Each slide writes OUT/<slide-name>/ with nuclei.geojson.gz, tissue.geojson,
    nuclei.parquet, overlay.png and summary.json. Failed slides are listed in OUT/failures.csv;
    the exit code is 1 when any slide failed.
    """
    from slidestream.config import RunConfig, load_config_file
    from slidestream.pipeline import run_batch

    options: dict[str, Any] = load_config_file(config_file) if config_file else {}
    given = {
        "mpp_override": mpp,
        "nuclei_model": nuclei_model,
        "tissue_model": tissue_model,
        "device": device,
        "batch_size": batch_size,
        "workers": workers,
        "postprocess_workers": postprocess_workers,
        "nuclei_as": nuclei_as,
    }
    options.update({k: v for k, v in given.items() if v is not None})
    options["out_dir"] = out_dir
    options["force"] = force or bool(options.get("force", False))
    options["db_url"] = _db_url(db_url, out_dir, no_db)
    options["show_progress"] = not no_progress and sys.stderr.isatty()
    config = RunConfig(**options)
    if dask_scheduler:
        from slidestream.distributed import run_batch_dask

        outcomes = run_batch_dask(list(inputs), config, scheduler=dask_scheduler)
    else:
        outcomes = run_batch(list(inputs), config)
    failed = [o for o in outcomes if o.status == "failed"]
    done = sum(o.status == "succeeded" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    click.echo(
        f"{done} slide(s) analysed, {skipped} up to date, {len(failed)} failed; "
        f"outputs in {out_dir}",
        err=True,
    )
    if failed:
        for o in failed:
            click.echo(f"FAILED {o.path}: {o.error}", err=True)
        click.echo(f"failures recorded in {out_dir / 'failures.csv'}", err=True)
        raise SystemExit(1)


@click.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-output"),
    show_default=True,
    help="Output folder.",
)
@click.option("--force", is_flag=True, help="Regenerate the demo slide and recompute.")
def demo_command(out_dir: Path, force: bool) -> None:
    """Generate a realistic H&E demo slide and run the whole analysis on it."""
    from slidestream.config import RunConfig
    from slidestream.demo_slide import write_demo_slide
    from slidestream.pipeline import run_batch

    slide_path = out_dir / "demo-slide.svs"
    if force or not slide_path.exists():
        click.echo(f"generating demo slide {slide_path} ...", err=True)
        write_demo_slide(slide_path)
    config = RunConfig(
        out_dir=out_dir,
        force=force,
        db_url=default_db_url(out_dir),
        show_progress=sys.stderr.isatty(),
    )
    outcomes = run_batch([slide_path], config)
    outcome = outcomes[0]
    if outcome.status == "failed":
        raise click.ClickException(f"demo failed: {outcome.error}")
    slide_out = out_dir / "demo-slide"
    summary = outcome.summary or {}
    stats = summary.get("statistics", {})
    click.echo(f"demo slide:  {slide_path}")
    click.echo(f"outputs:     {slide_out}/")
    for name in (
        "overlay.png",
        "nuclei.geojson.gz",
        "tissue.geojson",
        "nuclei.parquet",
        "summary.json",
    ):
        click.echo(f"  {name}")
    if stats:
        click.echo(
            f"tissue {stats.get('tissue_area_mm2', 0):.2f} mm², "
            f"{stats.get('nucleus_count', 0)} nuclei, "
            f"{stats.get('nuclei_per_mm2') or 0:.0f} nuclei/mm²"
        )
    click.echo(
        f"database:    {out_dir / 'slidestream.db'} (try: slidestream query --db "
        f"{default_db_url(out_dir)} --slides)"
    )
    click.echo(
        "QuPath: open the slide (File > Open), then drag tissue.geojson and "
        "nuclei.geojson.gz onto the viewer (or File > Import objects)."
    )
    from slidestream._cli_view import view_command_line

    click.echo(f"browse:      {view_command_line(out_dir)}   (then open http://127.0.0.1:8000/)")


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """Attach ``run`` and ``demo`` to the CLI."""
    cli.add_command(run_command)
    cli.add_command(demo_command)
