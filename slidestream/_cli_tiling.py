"""CLI: ``slidestream tissue`` (tissue mask PNG + QuPath GeoJSON) and ``slidestream tiles``.

Both open the slide with :func:`slidestream.wsi.open_slide` (``--mpp`` overrides the slide's own
level-0 µm/px, never a target resolution) and call :mod:`slidestream.tiling`. Every file is
written atomically (temporary name in the target folder, then rename).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import click

__all__ = ["register"]

logger = logging.getLogger(__name__)

#: Namespace of the deterministic (uuid5) feature ids of tissue annotations.
_TISSUE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://slidestream/tissue")
_TISSUE_COLOR = [80, 160, 80]

_MPP_OPTION = click.option(
    "--mpp",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="The slide's own level-0 µm/px (overrides the file; needed when it has none).",
)
_MASK_MPP_OPTION = click.option(
    "--mask-mpp",
    type=click.FloatRange(min=0.0, min_open=True),
    default=8.0,
    show_default=True,
    help="Resolution of the tissue mask in µm/px.",
)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _coords(ring: Any) -> list[list[float]]:
    return [[round(float(x), 2), round(float(y), 2)] for x, y in ring.coords]


def tissue_feature_collection(
    polygons: Any, *, slide_id: str, um2_per_l0_px2: float
) -> dict[str, Any]:
    """One QuPath ``Tissue`` annotation (MultiPolygon, level-0 px) as a FeatureCollection."""
    import shapely

    geom = shapely.set_precision(polygons, grid_size=0.01)
    parts = [p for p in shapely.get_parts(geom) if isinstance(p, shapely.Polygon) and p.area > 0]
    if not parts:
        return {"type": "FeatureCollection", "features": []}
    coordinates = [
        [_coords(p.exterior), *(_coords(hole) for hole in p.interiors)]
        for p in (shapely.geometry.polygon.orient(p) for p in parts)
    ]
    feature = {
        "type": "Feature",
        "id": str(uuid.uuid5(_TISSUE_NAMESPACE, f"{slide_id}:tissue:0")),
        "geometry": {"type": "MultiPolygon", "coordinates": coordinates},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": "Tissue", "color": _TISSUE_COLOR},
            "measurements": {
                "Area µm^2": round(float(sum(p.area for p in parts)) * um2_per_l0_px2, 3)
            },
        },
    }
    return {"type": "FeatureCollection", "features": [feature]}


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """Attach ``tissue`` and ``tiles`` to the top-level group."""

    @cli.command("tissue")
    @click.argument("slide", type=click.Path(exists=True, path_type=Path))
    @click.option(
        "--out",
        type=click.Path(dir_okay=False, writable=True, path_type=Path),
        required=True,
        help="Tissue mask PNG (255 = tissue).",
    )
    @click.option(
        "--geojson",
        type=click.Path(dir_okay=False, writable=True, path_type=Path),
        default=None,
        help="Also write the tissue outline as a QuPath GeoJSON annotation.",
    )
    @_MPP_OPTION
    @_MASK_MPP_OPTION
    def tissue(
        slide: Path, out: Path, geojson: Path | None, mpp: float | None, mask_mpp: float
    ) -> None:
        """Detect tissue on SLIDE; write a mask PNG (and a QuPath GeoJSON outline)."""
        from slidestream.tiling import detect_tissue
        from slidestream.wsi import open_slide

        with open_slide(slide, mpp=mpp) as opened:
            mask = detect_tissue(opened, mask_mpp=mask_mpp)
            slide_id = opened.fingerprint
            um2_per_px2 = opened.mpp_x * opened.mpp_y
        mask.to_png(out)
        if geojson is not None:
            collection = tissue_feature_collection(
                mask.to_polygons(), slide_id=slide_id, um2_per_l0_px2=um2_per_px2
            )
            _write_atomic(geojson, json.dumps(collection, ensure_ascii=False).encode("utf-8"))
        if not mask.mask.any():
            logger.warning("%s: no tissue detected", slide)
        click.echo(
            f"{slide.name}: tissue {mask.tissue_area_mm2:.3f} mm² "
            f"({100 * mask.tissue_fraction:.1f} % of the slide), mask "
            f"{mask.mask.shape[1]} x {mask.mask.shape[0]} px at {mask.mpp:g} µm/px -> {out}",
            err=True,
        )

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
    @click.option(
        "--min-tissue",
        type=click.FloatRange(0.0, 1.0),
        default=0.1,
        show_default=True,
        help="Minimum tissue fraction of a tile's core.",
    )
    @click.option(
        "--out",
        type=click.Path(dir_okay=False, writable=True, path_type=Path),
        default=None,
        help="CSV file (default: standard output).",
    )
    @_MPP_OPTION
    @_MASK_MPP_OPTION
    def tiles(
        slide: Path,
        tile_mpp: float,
        size_px: int,
        overlap_px: int,
        min_tissue: float,
        out: Path | None,
        mpp: float | None,
        mask_mpp: float,
    ) -> None:
        """List the tissue tiles of SLIDE as CSV (level-0 px coordinates)."""
        from slidestream.errors import ConfigError
        from slidestream.tiling import TilingConfig, detect_tissue, plan_tiles
        from slidestream.wsi import open_slide

        try:
            config = TilingConfig(
                tile_mpp=tile_mpp,
                tile_size_px=size_px,
                overlap_px=overlap_px,
                min_tissue_fraction=min_tissue,
            )
        except ConfigError as exc:  # a usage error: exit code 2
            raise click.UsageError(str(exc)) from exc
        with open_slide(slide, mpp=mpp) as opened:
            grid = plan_tiles(opened, config, detect_tissue(opened, mask_mpp=mask_mpp))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(
            ["index", "col", "row", "l0_x", "l0_y", "l0_width", "l0_height", "tissue_fraction",
             "is_partial"]
        )  # fmt: skip
        for t in grid:
            writer.writerow(
                [t.index, t.col, t.row, f"{t.l0_x:.3f}", f"{t.l0_y:.3f}", f"{t.l0_width:.3f}",
                 f"{t.l0_height:.3f}", f"{t.tissue_fraction:.4f}", int(t.is_partial)]
            )  # fmt: skip
        if out is None:
            click.echo(buffer.getvalue(), nl=False)
        else:
            _write_atomic(out, buffer.getvalue().encode("utf-8"))
        click.echo(
            f"{slide.name}: {len(grid)} of {grid.n_cols * grid.n_rows} tiles kept "
            f"({grid.n_cols} x {grid.n_rows} grid, {size_px} px at {tile_mpp:g} µm/px, "
            f"overlap {overlap_px} px, min tissue {min_tissue:g})",
            err=True,
        )
