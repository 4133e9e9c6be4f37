"""CLI commands (placeholder until the owning issue lands)."""

from __future__ import annotations

import click


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """Attach this module's commands to the CLI groups."""
