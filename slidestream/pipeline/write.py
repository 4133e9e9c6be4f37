"""Stage 5, writing and publishing: a slide's outputs, its summary, and the move into place.

Every output of a slide is first written into a hidden staging folder beside the final one
(``OUT/.<folder>.partial``). Only when all of them are complete are they moved, one
``os.replace`` each, into ``OUT/<folder>/``; ``summary.json`` — the marker that a slide is
done — is removed first and moved last. An interrupted run therefore leaves either the previous
complete result or no summary at all (the slide is redone on the next run), never a mix that
looks complete; the staging folder of an interrupted run is deleted when the slide is redone.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slidestream._atomic import write_json_atomic
from slidestream.config import RunConfig
from slidestream.summary import (
    OUTPUT_NAMES,
    SUMMARY_NAME,
    ModelRecord,
    Provenance,
    SlideRecord,
    SlideStatistics,
    Summary,
)

from .plan import SlidePlan
from .provenance import git_commit, library_versions, software_version

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from shapely.geometry.base import BaseGeometry

    from slidestream.overlays import NucleusTable
    from slidestream.tiling import TissueMask
    from slidestream.wsi import Slide

__all__ = [
    "build_summary",
    "publish",
    "staging_dir",
    "write_nuclei",
    "write_overlay",
    "write_summary",
    "write_tissue",
]

logger = logging.getLogger(__name__)


def staging_dir(final: Path) -> Path:
    """A fresh, empty staging folder for the slide folder ``final`` (a stale one is removed)."""
    stage = final.with_name(f".{final.name}.partial")
    if stage.exists():
        logger.info("%s: removing outputs of an interrupted run", stage)
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def publish(stage: Path, final: Path) -> None:
    """Move every file of ``stage`` into ``final``; ``summary.json`` goes last.

    Parameters
    ----------
    stage
        The staging folder holding complete outputs.
    final
        The slide's output folder (created if needed). Files of an earlier run that this run
        does not produce again are left in place.
    """
    final.mkdir(parents=True, exist_ok=True)
    (final / SUMMARY_NAME).unlink(missing_ok=True)  # not "done" while files are swapped
    summary = stage / SUMMARY_NAME
    for item in sorted(stage.iterdir()):
        if item != summary:
            item.replace(final / item.name)
    if summary.exists():
        summary.replace(final / SUMMARY_NAME)
    shutil.rmtree(stage, ignore_errors=True)


def write_tissue(
    stage: Path,
    slide: Slide,
    mask: TissueMask,
    class_polygons: Mapping[str, BaseGeometry],
    class_colors: Mapping[str, tuple[int, int, int]],
) -> None:
    """The tissue mask PNG and the tissue-class GeoJSON annotations."""
    from slidestream.overlays import write_tissue_geojson

    mask.to_png(stage / OUTPUT_NAMES["tissue_mask_png"])
    write_tissue_geojson(
        stage / OUTPUT_NAMES["tissue_geojson"],
        class_polygons,
        class_colors=class_colors,
        mpp=float(slide.mpp),
        id_namespace=slide.fingerprint,
        l0_bounds=(float(slide.dimensions[0]), float(slide.dimensions[1])),
    )


def write_nuclei(
    stage: Path,
    slide: Slide,
    tables: Iterable[NucleusTable],
    *,
    as_points: bool,
    class_colors: Mapping[str, tuple[int, int, int]],
    classify_by: str = "tissue",
    type_colors: Mapping[str, tuple[int, int, int]] | None = None,
) -> int:
    """Stream the classified nuclei into the GeoJSON and the parquet table; returns the count.

    ``classify_by`` (``"type"`` or ``"tissue"``) is the detections' QuPath classification for
    typed nuclei (:func:`slidestream.overlays.write_nuclei_geojson`); ``type_colors`` maps
    type classifications to colours (:func:`slidestream.overlays.nucleus_type_colors`).
    """
    from slidestream.overlays import write_nuclei_geojson

    return write_nuclei_geojson(
        stage / OUTPUT_NAMES["nuclei_geojson"],
        tables,
        id_namespace=slide.fingerprint,
        as_points=as_points,
        class_colors=class_colors,
        parquet_path=stage / OUTPUT_NAMES["nuclei_parquet"],
        l0_bounds=(float(slide.dimensions[0]), float(slide.dimensions[1])),
        classify_by="type" if classify_by == "type" else "tissue",
        type_colors=type_colors,
    )


def write_overlay(
    stage: Path,
    slide: Slide,
    class_polygons: Mapping[str, BaseGeometry],
    class_colors: Mapping[str, tuple[int, int, int]],
    centroids: npt.NDArray[np.float64],
    *,
    type_index: npt.NDArray[np.int8] | None = None,
    type_names: tuple[str, ...] = (),
    overlay_type: str = "all",
    type_colors: Mapping[str, tuple[int, int, int]] | None = None,
) -> None:
    """The overview PNG: thumbnail, class regions and nucleus density.

    For typed nuclei (``type_index`` into ``type_names``, aligned with ``centroids``) the density
    panel maps the nuclei of ``overlay_type`` (``"all"``: every nucleus) and the legend lists
    every type with its colour (``type_colors``, by classification; default the fixed
    colours) and count. An ``overlay_type`` the model does not have maps every nucleus.
    """
    import numpy as np

    from slidestream.overlays import nucleus_type_colors, render_overlay_png, type_classification

    thumb = slide.get_thumbnail((2048, 2048))
    density_of, legend, points = None, [], centroids
    title = f"{len(centroids):,} nuclei"
    if type_names and type_index is not None and len(type_index) == len(centroids):
        counts = np.bincount(type_index[type_index >= 0], minlength=len(type_names))
        colours = dict(type_colors or nucleus_type_colors(type_names))
        for t, name in enumerate(type_names):
            q = type_classification(name)
            legend.append((q, colours.get(q, (128, 128, 128)), int(counts[t])))
        if overlay_type in type_names:
            points = centroids[type_index == type_names.index(overlay_type)]
            density_of = type_classification(overlay_type)
            title += f", {len(points):,} {overlay_type}"
        elif overlay_type != "all":
            logger.info(
                "overlay.png: the nucleus model has no type %r (types %s); mapping every nucleus",
                overlay_type,
                ", ".join(type_names),
            )
    render_overlay_png(
        stage / OUTPUT_NAMES["overlay_png"],
        thumb,
        thumb_l0_scale=thumb.shape[1] / slide.dimensions[0],
        class_polygons=dict(class_polygons),
        class_colors=dict(class_colors),
        nucleus_centroids_l0=points,
        slide_mpp=float(slide.mpp),
        density_of=density_of,
        type_legend=legend,
        title=title,
    )


def build_summary(
    *,
    plan: SlidePlan,
    slide: Slide,
    statistics: SlideStatistics,
    models: Mapping[str, ModelRecord],
    device: str,
    config: RunConfig,
    workers: Mapping[str, int],
    timings_s: Mapping[str, float],
    tissue_mask_mpp: float,
    stain_gains: tuple[float, ...] | None,
    truncated: int,
    started_at: str,
) -> Summary:
    """The slide's :class:`~slidestream.summary.Summary` (provenance included)."""
    slide_record = SlideRecord(
        name=plan.name,
        path=str(Path(plan.path).resolve()),
        fingerprint=plan.fingerprint,
        output_dir=plan.output_dir.name,
        vendor=slide.vendor,
        reader=slide.reader,
        width=int(slide.dimensions[0]),
        height=int(slide.dimensions[1]),
        mpp_x=float(slide.mpp_x),
        mpp_y=float(slide.mpp_y),
        objective_power=slide.objective_power,
    )
    provenance = Provenance(
        parameters_hash=plan.parameters_hash,
        software_version=software_version(),
        git_commit=git_commit(),
        versions=library_versions(),
        device=device,
        models=dict(models),
        parameters=config.result_parameters(),
        config=config.tree(),
        workers=dict(workers),
        timings_s=dict(timings_s),
        tissue_mask_mpp=tissue_mask_mpp,
        tissue_stain_gains=stain_gains,
        truncated_nuclei=truncated,
        started_at=started_at,
        finished_at=datetime.now(UTC).isoformat(),
    )
    return Summary(slide=slide_record, statistics=statistics, provenance=provenance)


def write_summary(stage: Path, summary: Summary) -> Any:
    """``summary.json`` into the staging folder (atomically)."""
    return write_json_atomic(stage / SUMMARY_NAME, summary.to_json())
