"""``slidestream view``: the local web viewer of an output folder."""

from __future__ import annotations

from pathlib import Path

import click

from slidestream._cli_db import DB_ENVVAR

__all__ = ["register", "view_command_line"]


def view_command_line(out_dir: Path) -> str:
    """The ``slidestream view`` command that shows the results in ``out_dir``."""
    import shlex

    return f"slidestream view {shlex.quote(str(out_dir))}"


@click.command("view")
@click.argument(
    "out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="OUT"
)
@click.option(
    "--db",
    "db_url",
    default=None,
    metavar="URL",
    envvar=DB_ENVVAR,
    show_envvar=True,
    help="Statistics database for the cohort page (opened read-only); default OUT/slidestream.db "
    "when it exists.",
)
@click.option("--no-db", is_flag=True, help="No database: slide list and slide pages only.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on; anything but 127.0.0.1 shares the results with the network.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="TCP port (0: any free port).",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the slide list in a browser.")
@click.option(
    "--tile-cache-mb",
    type=click.IntRange(0, 65536),
    default=256,
    show_default=True,
    help="Memory for encoded slide and overlay tiles (MiB).",
)
def view_command(
    out_dir: Path,
    db_url: str | None,
    no_db: bool,
    host: str,
    port: int,
    open_browser: bool,
    tile_cache_mb: int,
) -> None:
    """Browse the results of `slidestream run` in OUT in a web browser.

    Serves a slide list (status and headline statistics), deep-zoom slide pages with the
    tissue classes and nuclei as overlays, and, with a database, a cohort page with the
    `slidestream query` statistics. Only OUT's results are served; the database is opened
    read-only. Stop with Ctrl+C.
    """
    from slidestream.db import connect_read_only, mask_url
    from slidestream.viewer import ViewerConfig, is_loopback, serve

    if not no_db and db_url is None and (out_dir / "slidestream.db").is_file():
        db_url = f"sqlite:///{(out_dir / 'slidestream.db').resolve().as_posix()}"
    engine = None if no_db or db_url is None else connect_read_only(db_url)
    config = ViewerConfig(
        out_dir=out_dir, db_url=db_url, tile_cache_bytes=tile_cache_mb * 1024 * 1024
    )
    if not is_loopback(host):
        click.echo(
            f"WARNING: serving on {host}: anyone who can reach this machine can see these "
            "slides; use --host 127.0.0.1 (the default) to keep them private",
            err=True,
        )

    source = ""
    if engine is not None and db_url is not None:
        source = f", database {mask_url(db_url)} (read-only)"

    def ready(url: str) -> None:
        click.echo(f"slidestream view: {out_dir}{source}", err=True)
        click.echo(f"open {url} in a browser (Ctrl+C stops)", err=True)

    serve(config, host=host, port=port, engine=engine, open_browser=open_browser, on_ready=ready)


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """Attach ``view`` to the CLI."""
    cli.add_command(view_command)
