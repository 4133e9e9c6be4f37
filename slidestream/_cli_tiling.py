"""CLI: ``slidestream tissue`` (tissue mask PNG + QuPath GeoJSON) and ``slidestream tiles``.

Both open the slide with :func:`slidestream.wsi.open_slide` (``--mpp`` overrides the slide's own
level-0 µm/px, never a target resolution) and call one function of :mod:`slidestream.commands`.
"""

from __future__ import annotations

from pathlib import Path

import click

from slidestream._cli_options import mpp_option, out_option, run_option

__all__ = ["register"]


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """Attach ``tissue`` and ``tiles`` to the top-level group."""

    @cli.command("tissue")
    @click.argument("slide", type=click.Path(exists=True, path_type=Path))
    @out_option("file", help="Tissue mask PNG (255 = tissue).")
    @click.option(
        "--geojson",
        type=click.Path(dir_okay=False, writable=True, path_type=Path),
        default=None,
        help="Also write the tissue outline as a QuPath GeoJSON annotation.",
    )
    @mpp_option()
    @run_option("tissue_mask_mpp")
    @run_option("min_tissue_area_um2")
    def tissue(
        slide: Path,
        out: Path,
        geojson: Path | None,
        mpp: float | None,
        tissue_mask_mpp: float | None,
        min_tissue_area_um2: float | None,
    ) -> None:
        """Detect tissue on SLIDE; write a mask PNG (and a QuPath GeoJSON outline)."""
        from slidestream.commands import tissue_files

        report = tissue_files(
            slide,
            out,
            geojson_path=geojson,
            mpp=mpp,
            mask_mpp=tissue_mask_mpp,
            min_area_um2=min_tissue_area_um2,
        )
        click.echo(report.line(), err=True)

    @cli.command("tiles")
    @click.argument("slide", type=click.Path(exists=True, path_type=Path))
    @click.option(
        "--tile-mpp",
        type=click.FloatRange(min=0.0, min_open=True),
        default=0.5,
        show_default=True,
        help="Target resolution of the tiles in µm/px.",
    )
    @click.option(
        "--size",
        "size_px",
        type=click.IntRange(min=1),
        default=256,
        show_default=True,
        help="Tile edge in px at --tile-mpp, halo included.",
    )
    @click.option(
        "--overlap",
        "overlap_px",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Overlap of neighbouring tiles in px at --tile-mpp (even).",
    )
    @run_option("min_tissue_fraction")
    @out_option("file", help="CSV file (default: standard output).", required=False)
    @mpp_option()
    @run_option("tissue_mask_mpp")
    def tiles(
        slide: Path,
        tile_mpp: float,
        size_px: int,
        overlap_px: int,
        min_tissue_fraction: float | None,
        out: Path | None,
        mpp: float | None,
        tissue_mask_mpp: float | None,
    ) -> None:
        """List the tissue tiles of SLIDE as CSV (level-0 px coordinates)."""
        from slidestream.commands import list_tiles
        from slidestream.errors import ConfigError

        try:
            report = list_tiles(
                slide,
                tile_mpp=tile_mpp,
                size_px=size_px,
                overlap_px=overlap_px,
                min_tissue=min_tissue_fraction,
                out=out,
                mpp=mpp,
                mask_mpp=tissue_mask_mpp,
            )
        except ConfigError as exc:  # a bad tiling is a usage error: exit code 2
            raise click.UsageError(str(exc)) from exc
        if report.csv_text is not None:
            click.echo(report.csv_text, nl=False)
        click.echo(report.summary, err=True)
