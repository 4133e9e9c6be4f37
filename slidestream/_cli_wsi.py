"""CLI: ``slidestream info SLIDE`` (slide metadata, human-readable or JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from slidestream._cli_options import mpp_option

__all__ = ["register"]


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """Attach ``info`` to the top-level group."""

    @cli.command("info")
    @click.argument("slide", type=click.Path(exists=True, path_type=Path))
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @mpp_option()
    def info(slide: Path, as_json: bool, mpp: float | None) -> None:
        """Show a slide's size, pyramid, µm/px, vendor and fingerprint.

        A slide whose file states no µm/px is shown with µm/px unknown (pass --mpp to the
        analysis commands).
        """
        from slidestream.commands import describe_slide

        description = describe_slide(slide, mpp=mpp)
        click.echo(
            json.dumps(description.to_json(), indent=2) if as_json else description.to_text()
        )
