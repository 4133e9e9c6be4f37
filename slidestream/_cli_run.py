"""``slidestream run`` (batch whole-slide analysis) and ``slidestream demo``."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import click

from slidestream._cli_db import default_db_url
from slidestream._cli_options import (
    config_option,
    db_option,
    mpp_option,
    out_option,
    run_option,
    workers_option,
)

__all__ = ["register", "stop_on_signals"]


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`~slidestream.errors.Interrupted` in this process.

    Every worker process gets SIGTERM at once (in the handler); the batch then unwinds as for
    Ctrl-C: the slide in progress removes its staging folder and releases its lock, the workers
    are reaped, ``failures.csv`` is merged, and the CLI prints one line. Further signals during
    that clean-up (a few seconds) are ignored.
    """
    from slidestream.errors import Interrupted
    from slidestream.pipeline import terminate_children

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        terminate_children()  # before unwinding frees what starting workers still read
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


#: Run options given as flags (field names of RunConfig), besides --mpp/--device/--workers.
_RUN_FLAGS = (
    "nuclei_model",
    "tissue_model",
    "batch_size",
    "postprocess_workers",
    "nuclei_as",
    "nuclei_classification",
    "overlay_type",
    "tissue_mask_mpp",
    "min_tissue_area_um2",
    "min_tissue_fraction",
)


def _with_run_flags(func: Any) -> Any:
    for field in reversed(_RUN_FLAGS):
        func = run_option(field)(func)
    return func


@click.command("run")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@out_option("dir", help="Output folder; each slide writes OUT/<slide-name>/ (see README).")
@mpp_option()
@run_option("device")
@workers_option()
@_with_run_flags
@run_option("force")
@db_option
@click.option("--no-db", is_flag=True, help="Record nothing in a database.")
@config_option
@click.option(
    "--dask",
    "dask_scheduler",
    default=None,
    metavar="ADDRESS|local[:N]",
    help="Run slides as tasks on a Dask cluster: a scheduler address (tcp://HOST:8786; start it "
    "with `dask scheduler` and `dask worker ADDRESS`), or local[:N] for N worker processes on "
    "this machine (default: one per core). OUT and the slides must be storage every worker "
    "sees at the same path (checked before any slide).",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def run_command(
    inputs: tuple[Path, ...],
    out: Path,
    mpp: float | None,
    device: str | None,
    force: bool,
    db_url: str | None,
    no_db: bool,
    config_file: Path | None,
    dask_scheduler: str | None,
    no_progress: bool,
    **flags: Any,
) -> None:
    """Analyse whole slides: nuclei, tissue classes, QuPath overlays and slide statistics.

    INPUTS are slide files, folders (searched recursively) or manifest CSVs with a `path`
    column. Each slide writes OUT/<slide-name>/ (OUT/<slide-name>-<fingerprint>/ when another
    slide has the same name) with nuclei.geojson.gz, tissue.geojson, nuclei.parquet,
    overlay.png and summary.json. Failed slides are listed in OUT/failures.csv; the exit code
    is 1 when any slide failed (slides without tissue are skipped, not failed).
    """
    from slidestream.commands import run_slides
    from slidestream.config import RunConfig, load_config_file

    options: dict[str, Any] = load_config_file(config_file) if config_file else {}
    given = {"mpp_override": mpp, "device": device, **flags}
    options.update({k: v for k, v in given.items() if v is not None})
    if force:
        options["force"] = True
    config = RunConfig(
        out_dir=out,
        db_url=None if no_db else (db_url or default_db_url(out)),
        show_progress=not no_progress and sys.stderr.isatty(),
        **options,
    )
    if dask_scheduler:
        _quiet_dask()
    with stop_on_signals():
        report = run_slides(list(inputs), config, dask_scheduler=dask_scheduler)
    for line in report.lines:
        click.echo(line, err=True)
    if report.exit_code:
        raise SystemExit(report.exit_code)


def _quiet_dask() -> None:
    """Keep Dask's own INFO lines (cluster start, every connection) off the console unless
    ``-v -v``: ``distributed`` sets its loggers' levels when imported, after the CLI's set-up, and
    the worker processes of ``--dask local[:N]`` read the environment variable."""
    import logging
    import os

    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    import distributed  # noqa: F401  (configures its loggers on import)

    logging.getLogger("distributed").setLevel(logging.WARNING)


@click.command("demo")
@out_option("dir", help="Output folder.", default=Path("demo-output"))
@click.option("--force", is_flag=True, help="Regenerate the demo slide and recompute.")
def demo_command(out: Path, force: bool) -> None:
    """Generate a realistic H&E demo slide and run the whole analysis on it."""
    from slidestream.commands import run_demo

    with stop_on_signals():
        report = run_demo(
            out, force=force, db_url=default_db_url(out), show_progress=sys.stderr.isatty()
        )
    for line in report.lines:
        click.echo(line)
    if report.exit_code:
        raise click.ClickException(report.lines[-1] if report.lines else "demo failed")
    from slidestream._cli_view import view_command_line

    click.echo(f"browse:      {view_command_line(out)}   (then open http://127.0.0.1:8000/)")


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """Attach ``run`` and ``demo`` to the CLI."""
    cli.add_command(run_command)
    cli.add_command(demo_command)
