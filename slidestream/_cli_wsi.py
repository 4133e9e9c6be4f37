"""CLI: ``slidestream info SLIDE`` (slide metadata, human-readable or JSON)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

__all__ = ["register"]

logger = logging.getLogger(__name__)


def _info_record(slide: Any) -> dict[str, Any]:
    levels = [
        {
            "width": w,
            "height": h,
            "downsample": ds,
            "mpp": slide.mpp * ds,
        }
        for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples, strict=True)
    ]
    width, height = slide.dimensions
    return {
        "path": str(slide.path),
        "name": slide.name,
        "vendor": slide.vendor,
        "reader": slide.reader,
        "width": width,
        "height": height,
        "level_count": slide.level_count,
        "levels": levels,
        "mpp_x": slide.mpp_x,
        "mpp_y": slide.mpp_y,
        "objective_power": slide.objective_power,
        "fingerprint": slide.fingerprint,
        "background": "#{:02x}{:02x}{:02x}".format(*slide.background_rgb),
        "associated_images": list(slide.associated_images),
    }


def _human(record: dict[str, Any]) -> str:
    power = record["objective_power"]
    lines = [
        f"{record['name']}  ({record['path']})",
        f"  vendor            {record['vendor']}  (reader: {record['reader']})",
        f"  size              {record['width']} x {record['height']} px",
        f"  µm/px             {record['mpp_x']:.5g} x {record['mpp_y']:.5g}",
        f"  objective         {f'{power:g}x' if power else 'unknown'}",
        f"  background        {record['background']}",
        f"  fingerprint       {record['fingerprint']}",
        f"  associated images {', '.join(record['associated_images']) or '-'}",
        f"  levels            {record['level_count']}",
    ]
    for idx, level in enumerate(record["levels"]):
        lines.append(
            f"    [{idx}] {level['width']:>7} x {level['height']:<7} px  "
            f"downsample {level['downsample']:<8.4g} {level['mpp']:.4g} µm/px"
        )
    return "\n".join(lines)


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """Attach ``info`` to the top-level group."""

    @cli.command("info")
    @click.argument("slide", type=click.Path(exists=True, path_type=Path))
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @click.option(
        "--mpp",
        type=click.FloatRange(min=0.0, min_open=True),
        default=None,
        help="µm/px at level 0 (overrides the file; needed when the slide has none).",
    )
    def info(slide: Path, as_json: bool, mpp: float | None) -> None:
        """Show a slide's size, pyramid, µm/px, vendor and fingerprint."""
        from slidestream.wsi import open_slide

        with open_slide(slide, mpp=mpp) as opened:
            record = _info_record(opened)
        click.echo(json.dumps(record, indent=2) if as_json else _human(record))
