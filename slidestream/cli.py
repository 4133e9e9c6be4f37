"""The ``slidestream`` command line.

The CLI is thin: each command module (``_cli_*.py``) parses options into config objects and calls
the library. Heavy libraries (torch, OpenSlide, MONAI) are imported inside the commands, so
``slidestream --help`` stays fast. Every :class:`~slidestream.errors.SlidestreamError` becomes a
one-line message here, in one place; ``--debug`` shows the traceback instead.

Exit codes: 0 success, 1 failure (or some slides of a batch failed, or the database failed
during a batch), 2 usage error, 130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from slidestream._version import __version__
from slidestream.errors import Interrupted, SlidestreamError

__all__ = ["cli", "main"]

logger = logging.getLogger(__name__)


def _interrupted_line(signum: int) -> str:
    import signal

    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = str(signum)
    return (
        f"interrupted ({name}): workers stopped, unfinished slide outputs removed; rerun the "
        "same command to resume (finished slides are kept)"
    )


def _os_error_line(exc: OSError) -> str:
    """One line for an I/O error no command anticipated (read-only folder, a file in a path)."""
    where = exc.filename if exc.filename is not None else "slidestream"
    problem = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {problem}; check the path and its permissions (--debug for the traceback)"


class _Group(click.Group):
    """A click group that maps library errors to one-line messages (exit code 1).

    Also one line, never a traceback: an interrupt (Ctrl-C or SIGTERM; exit code
    ``128 + signal``) and an I/O error (``PermissionError``, ``NotADirectoryError``...). A
    closed stdout (the reader of a pipe left) ends the command quietly with exit code 141.
    """

    def invoke(self, ctx: click.Context) -> Any:
        root = ctx.find_root()
        debug = root.obj is not None and root.obj.get("debug")
        try:
            return super().invoke(ctx)
        except SlidestreamError as exc:
            if debug:
                raise
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt as exc:
            import signal

            signum = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
            click.echo(f"Error: {_interrupted_line(signum)}", err=True)
            raise SystemExit(128 + signum) from None
        except BrokenPipeError:
            # The reader of stdout left (``query --slides --format csv | head``): stop quietly
            # with the status of a process ended by SIGPIPE; later writes (interpreter exit
            # flushing stdout) go nowhere instead of raising again.
            import os
            import signal

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise SystemExit(128 + int(signal.SIGPIPE)) from None
        except OSError as exc:
            if debug:
                raise
            raise click.ClickException(_os_error_line(exc)) from exc


def _configure_logging(verbose: int, debug: bool) -> None:
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    if verbose >= 2 or debug:
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Third-party loggers stay quiet unless asked twice.
    if verbose < 2 and not debug:
        for name in ("PIL", "matplotlib", "distributed", "numba", "alembic", "sqlalchemy"):
            logging.getLogger(name).setLevel(logging.WARNING)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="slidestream")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, debug: bool) -> None:
    """slidestream: whole-slide image analysis for digital pathology.

    Streams whole-slide images into nucleus segmentation and tissue classification, writes
    QuPath-compatible GeoJSON overlays and stores slide statistics in a SQL database.
    """
    ctx.obj = {"debug": debug, "verbose": verbose}
    _configure_logging(verbose, debug)


@cli.group(cls=_Group)
def train() -> None:
    """Train a nucleus or tissue model on local data."""


@cli.group(cls=_Group)
def evaluate() -> None:
    """Evaluate a nucleus or tissue model against annotated data."""


def _register_commands() -> None:
    from slidestream import (
        _cli_annotations,
        _cli_db,
        _cli_nuclei,
        _cli_run,
        _cli_tiling,
        _cli_tissue,
        _cli_view,
        _cli_wsi,
    )

    modules = (
        _cli_wsi,
        _cli_tiling,
        _cli_nuclei,
        _cli_annotations,
        _cli_tissue,
        _cli_run,
        _cli_db,
        _cli_view,
    )
    for module in modules:
        module.register(cli, train=train, evaluate=evaluate)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="slidestream")


if __name__ == "__main__":  # pragma: no cover
    main()
