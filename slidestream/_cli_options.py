"""Command-line options shared by several commands, each defined once.

Run options come from the configuration table (:data:`slidestream.config.OPTIONS`): one flag,
one type, one range and one default everywhere (``--mpp`` is always the input's own level-0
µm/px, never a working resolution). An option built by :func:`run_option` defaults to ``None``
("not given"), so a value from ``--config`` or the table's default applies; the help text shows
the table's default.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

from slidestream.config import DEFAULTS, MPP_RANGE, option

__all__ = [
    "DB_ENVVAR",
    "config_option",
    "db_option",
    "device_option",
    "mpp_option",
    "out_option",
    "run_option",
    "workers_option",
]

_F = TypeVar("_F", bound=Callable[..., Any])

DB_ENVVAR = "SLIDESTREAM_DB"
"""Environment variable holding the database URL when ``--db`` is not given."""


def run_option(field: str, *, default: Any = None, help: str | None = None) -> Callable[[_F], _F]:
    """The flag of a run option (``--batch-size``...), from the configuration table."""
    opt = option(field)
    if opt.flag is None:  # pragma: no cover - a programming error
        raise ValueError(f"{field} has no command-line flag")
    text = help or opt.help
    if opt.default is not None and default is None:
        text += f" [default: {opt.default}]"
    if opt.kind is bool:
        return click.option(opt.flag, field, is_flag=True, default=bool(default), help=text)
    return click.option(opt.flag, field, type=opt.param, default=default, help=text)


def mpp_option(
    *, required: bool = False, multiple: bool = False, help: str | None = None
) -> Callable[[_F], _F]:
    """``--mpp``: the input's own level-0 µm/px (0.01-100), never a target resolution."""
    text = help or option("mpp_override").help
    return click.option(
        "--mpp",
        "mpps" if multiple else "mpp",
        type=MPP_RANGE,
        default=None,
        required=required,
        multiple=multiple,
        help=text,
    )


def device_option(*, default: str | None = None) -> Callable[[_F], _F]:
    """``--device auto|cpu|cuda[:N]`` (the table's default when ``default`` is None)."""
    opt = option("device")
    return click.option(
        "--device",
        "device",
        type=opt.param,
        default=default or DEFAULTS.device,
        show_default=True,
        help=opt.help,
    )


def workers_option() -> Callable[[_F], _F]:
    """``--workers N``: tile-reading worker processes (0: in the main process)."""
    return run_option("workers")


def out_option(
    kind: Literal["dir", "file"], *, help: str, required: bool = True, default: Path | None = None
) -> Callable[[_F], _F]:
    """``--out``: the output folder (``kind="dir"``) or file of a command."""
    return click.option(
        "--out",
        "out",
        type=click.Path(file_okay=kind == "file", dir_okay=kind == "dir", path_type=Path),
        required=required and default is None,
        default=default,
        show_default=default is not None,
        help=help,
    )


def db_option(func: _F) -> _F:
    """The ``--db URL`` option (falls back on ``$SLIDESTREAM_DB``)."""
    return click.option(
        "--db",
        "db_url",
        metavar="URL",
        envvar=DB_ENVVAR,
        show_envvar=True,
        help="Database URL: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB.",
    )(func)


def config_option(func: _F) -> _F:
    """``--config FILE``: a TOML configuration file (command-line options win)."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="TOML configuration file (tables [slides] [tissue] [nuclei] [resources] [run]; "
        "command-line options win).",
    )(func)
