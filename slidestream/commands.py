"""The library function behind each command of the CLI (which only parses options).

Each function takes typed values, does the work (files are written here or below, atomically)
and returns a typed report the CLI prints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slidestream.config import RunConfig
from slidestream.pipeline import Recorder, SlideOutcome, run_batch

__all__ = [
    "BatchReport",
    "DemoReport",
    "SlideDescription",
    "TileReport",
    "TissueReport",
    "describe_slide",
    "list_tiles",
    "read_rgb",
    "run_demo",
    "run_slides",
    "segment_images",
    "tissue_files",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchReport:
    """What ``slidestream run`` reports: every outcome, the console lines, the exit code."""

    outcomes: list[SlideOutcome] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    """The recorder's console summary."""
    exit_code: int = 0
    """0 when no slide failed (skipped slides are not failures), else 1."""


def run_slides(
    inputs: Sequence[Path], config: RunConfig, *, dask_scheduler: str | Any | None = None
) -> BatchReport:
    """``slidestream run``: a local batch, or Dask tasks with ``dask_scheduler``; recorded.

    ``dask_scheduler`` is what :func:`slidestream.distributed.run_batch_dask` takes: a scheduler
    address, ``local[:N]``, a ``distributed.Client`` or a cluster object (``SLURMCluster``).
    """
    with Recorder(config) as recorder:
        if dask_scheduler is not None and dask_scheduler != "":
            from slidestream.distributed import run_batch_dask

            outcomes = run_batch_dask(
                list(inputs), config, scheduler=dask_scheduler, recorder=recorder
            )
        else:
            outcomes = run_batch(list(inputs), config, recorder=recorder)
    return BatchReport(
        outcomes=outcomes, lines=recorder.summary_lines(), exit_code=recorder.exit_code
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoReport:
    """What ``slidestream demo`` reports."""

    outcome: SlideOutcome
    lines: list[str]
    exit_code: int


def run_demo(
    out_dir: Path, *, force: bool = False, db_url: str | None = None, show_progress: bool = False
) -> DemoReport:
    """``slidestream demo``: generate the demo slide (once) and analyse it into ``out_dir``."""

    from slidestream.demo_slide import write_demo_slide

    slide_path = out_dir / "demo-slide.svs"
    if force or not slide_path.exists():
        logging.getLogger(__name__).warning("generating demo slide %s ...", slide_path)
        write_demo_slide(slide_path)
    config = RunConfig(out_dir=out_dir, force=force, db_url=db_url, show_progress=show_progress)
    with Recorder(config) as recorder:
        (outcome,) = run_batch([slide_path], config, recorder=recorder)
    if outcome.status == "failed" or outcome.output_dir is None or outcome.summary is None:
        return DemoReport(outcome=outcome, lines=[f"demo failed: {outcome.reason}"], exit_code=1)
    stats = outcome.summary.statistics
    lines = [
        f"demo slide:  {slide_path}",
        f"outputs:     {outcome.output_dir}/",
        *(f"  {name}" for name in outcome.summary.outputs.values()),
        f"tissue {stats.tissue_area_mm2 or 0:.2f} mm², {stats.nucleus_count or 0} nuclei, "
        f"{stats.nuclei_per_mm2 or 0:.0f} nuclei/mm²",
    ]
    if stats.types:
        lines.append(
            "nucleus types: "
            + ", ".join(
                f"{name} {t.nucleus_count} ({t.nuclei_per_mm2 or 0:.0f}/mm²)"
                for name, t in stats.types.items()
            )
        )
        for cname, cstats in stats.classes.items():
            inf = cstats.types.get("inflammatory")
            if inf is None or not cstats.area_mm2:
                continue
            ratio = cstats.inflammatory_epithelial_ratio
            lines.append(
                f"  in {cname} ({cstats.area_mm2:.2f} mm²): {inf.nuclei_per_mm2 or 0:.0f} "
                "inflammatory nuclei/mm², inflammatory/epithelial "
                + (f"{ratio:.2f}" if ratio is not None else "n/a")
            )
    if db_url:
        lines.append(f"database:    {db_url} (try: slidestream query --db {db_url} --slides)")
    lines.append(
        "QuPath: open the slide (File > Open), then drag tissue.geojson and "
        "nuclei.geojson.gz onto the viewer (or File > Import objects)."
    )
    return DemoReport(outcome=outcome, lines=lines, exit_code=0)


# --------------------------------------------------------------------------- info


@dataclass(frozen=True, slots=True, kw_only=True)
class LevelInfo:
    """One pyramid level."""

    width: int
    height: int
    downsample: float
    mpp: float | None
    """µm/px of the level (``None`` when the slide's µm/px is unknown)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideDescription:
    """Everything ``slidestream info`` shows of a slide."""

    path: str
    name: str
    vendor: str
    reader: str
    width: int
    height: int
    level_count: int
    levels: list[LevelInfo]
    mpp_x: float | None
    """Level-0 µm/px along x; ``None``: the file states none (pass ``--mpp``)."""
    mpp_y: float | None
    objective_power: float | None
    fingerprint: str
    background: str
    associated_images: list[str]

    def to_json(self) -> dict[str, object]:
        """The ``info --json`` object."""
        import dataclasses

        return dataclasses.asdict(self)

    def to_text(self) -> str:
        """The human-readable ``info`` text."""
        power = self.objective_power
        if self.mpp_x is None or self.mpp_y is None:
            mpp = "unknown (the file states none; pass --mpp, e.g. --mpp 0.25 for a 40x scan)"
        else:
            mpp = f"{self.mpp_x:.5g} x {self.mpp_y:.5g}"
        lines = [
            f"{self.name}  ({self.path})",
            f"  vendor            {self.vendor}  (reader: {self.reader})",
            f"  size              {self.width} x {self.height} px",
            f"  µm/px             {mpp}",
            f"  objective         {f'{power:g}x' if power else 'unknown'}",
            f"  background        {self.background}",
            f"  fingerprint       {self.fingerprint}",
            f"  associated images {', '.join(self.associated_images) or '-'}",
            f"  levels            {self.level_count}",
        ]
        for idx, level in enumerate(self.levels):
            level_mpp = "? µm/px" if level.mpp is None else f"{level.mpp:.4g} µm/px"
            lines.append(
                f"    [{idx}] {level.width:>7} x {level.height:<7} px  "
                f"downsample {level.downsample:<8.4g} {level_mpp}"
            )
        return "\n".join(lines)


def describe_slide(path: Path, *, mpp: float | None = None) -> SlideDescription:
    """``slidestream info``: a slide's metadata; a slide without µm/px is described too."""
    from slidestream.wsi import open_slide

    with open_slide(path, mpp=mpp, require_mpp=False) as slide:
        mpp_x = slide.mpp_x if slide.has_mpp else None
        mpp_y = slide.mpp_y if slide.has_mpp else None
        base = None if mpp_x is None or mpp_y is None else 0.5 * (mpp_x + mpp_y)
        width, height = slide.dimensions
        return SlideDescription(
            path=str(slide.path),
            name=slide.name,
            vendor=slide.vendor,
            reader=slide.reader,
            width=int(width),
            height=int(height),
            level_count=slide.level_count,
            levels=[
                LevelInfo(
                    width=int(w),
                    height=int(h),
                    downsample=float(ds),
                    mpp=None if base is None else base * ds,
                )
                for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples, strict=True)
            ],
            mpp_x=mpp_x,
            mpp_y=mpp_y,
            objective_power=slide.objective_power,
            fingerprint=slide.fingerprint,
            background="#{:02x}{:02x}{:02x}".format(*slide.background_rgb),
            associated_images=list(slide.associated_images),
        )


# --------------------------------------------------------------------------- tissue, tiles


#: Colour of the one ``Tissue`` annotation of ``slidestream tissue --geojson``.
TISSUE_COLOR = (80, 160, 80)


@dataclass(frozen=True, slots=True, kw_only=True)
class TissueReport:
    """What ``slidestream tissue`` wrote and found."""

    slide: str
    tissue_area_mm2: float
    tissue_fraction: float
    mask_shape: tuple[int, int]
    """(height, width) of the mask in px."""
    mask_mpp: float
    outputs: list[Path]

    def line(self) -> str:
        """One-line summary."""
        h, w = self.mask_shape
        return (
            f"{self.slide}: tissue {self.tissue_area_mm2:.3f} mm² "
            f"({100 * self.tissue_fraction:.1f} % of the slide), mask {w} x {h} px at "
            f"{self.mask_mpp:g} µm/px -> {', '.join(str(p) for p in self.outputs)}"
        )


def tissue_files(
    slide_path: Path,
    out_png: Path,
    *,
    geojson_path: Path | None = None,
    mpp: float | None = None,
    mask_mpp: float | None = None,
    min_area_um2: float | None = None,
) -> TissueReport:
    """``slidestream tissue``: the tissue mask PNG and, optionally, one QuPath ``Tissue``
    annotation (level-0 px, clipped to the slide). Defaults come from the configuration table."""
    from slidestream.config import DEFAULTS
    from slidestream.overlays import write_tissue_geojson
    from slidestream.tiling import detect_tissue
    from slidestream.wsi import open_slide

    with open_slide(slide_path, mpp=mpp) as slide:
        mask = detect_tissue(
            slide,
            mask_mpp=DEFAULTS.tissue_mask_mpp if mask_mpp is None else mask_mpp,
            min_tissue_area_um2=DEFAULTS.min_tissue_area_um2
            if min_area_um2 is None
            else min_area_um2,
        )
        outputs = [mask.to_png(out_png)]
        if geojson_path is not None:
            write_tissue_geojson(
                geojson_path,
                {"Tissue": mask.to_polygons()} if mask.mask.any() else {},
                class_colors={"Tissue": TISSUE_COLOR},
                mpp=float(slide.mpp),
                id_namespace=slide.fingerprint,
                l0_bounds=(float(slide.dimensions[0]), float(slide.dimensions[1])),
            )
            outputs.append(geojson_path)
    if not mask.mask.any():
        logging.getLogger(__name__).warning("%s: no tissue detected", slide_path)
    return TissueReport(
        slide=slide_path.name,
        tissue_area_mm2=float(mask.tissue_area_mm2),
        tissue_fraction=float(mask.tissue_fraction),
        mask_shape=(int(mask.mask.shape[0]), int(mask.mask.shape[1])),
        mask_mpp=float(mask.mpp),
        outputs=outputs,
    )


TILE_COLUMNS = (
    "index",
    "col",
    "row",
    "l0_x",
    "l0_y",
    "l0_width",
    "l0_height",
    "tissue_fraction",
    "is_partial",
)
"""Columns of the ``slidestream tiles`` CSV (level-0 px)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TileReport:
    """What ``slidestream tiles`` found (and the CSV text when no file was asked for)."""

    csv_text: str | None
    kept: int
    grid: tuple[int, int]
    """(columns, rows)."""
    summary: str


def list_tiles(
    slide_path: Path,
    *,
    tile_mpp: float,
    size_px: int,
    overlap_px: int,
    min_tissue: float | None = None,
    out: Path | None = None,
    mpp: float | None = None,
    mask_mpp: float | None = None,
) -> TileReport:
    """``slidestream tiles``: the tissue tiles of a slide as CSV (``out``, else returned)."""
    import csv
    import io

    from slidestream._atomic import write_text_atomic
    from slidestream.config import DEFAULTS
    from slidestream.tiling import TilingConfig, detect_tissue, plan_tiles
    from slidestream.wsi import open_slide

    min_fraction = DEFAULTS.min_tissue_fraction if min_tissue is None else min_tissue
    config = TilingConfig(
        tile_mpp=tile_mpp,
        tile_size_px=size_px,
        overlap_px=overlap_px,
        min_tissue_fraction=min_fraction,
    )
    with open_slide(slide_path, mpp=mpp) as slide:
        mask = detect_tissue(
            slide,
            mask_mpp=DEFAULTS.tissue_mask_mpp if mask_mpp is None else mask_mpp,
            min_tissue_area_um2=DEFAULTS.min_tissue_area_um2,
        )
        grid = plan_tiles(slide, config, mask)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TILE_COLUMNS)
    for t in grid:
        writer.writerow(
            [t.index, t.col, t.row, f"{t.l0_x:.3f}", f"{t.l0_y:.3f}", f"{t.l0_width:.3f}",
             f"{t.l0_height:.3f}", f"{t.tissue_fraction:.4f}", int(t.is_partial)]
        )  # fmt: skip
    if out is not None:
        write_text_atomic(out, buffer.getvalue())
    summary = (
        f"{slide_path.name}: {len(grid)} of {grid.n_cols * grid.n_rows} tiles kept "
        f"({grid.n_cols} x {grid.n_rows} grid, {size_px} px at {tile_mpp:g} µm/px, "
        f"overlap {overlap_px} px, min tissue {min_fraction:g})"
    )
    return TileReport(
        csv_text=None if out is not None else buffer.getvalue(),
        kept=len(grid),
        grid=(grid.n_cols, grid.n_rows),
        summary=summary,
    )


# --------------------------------------------------------------------------- segment


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentReport:
    """What ``slidestream segment`` wrote."""

    masks: list[Path]
    geojson: list[Path]
    types_csv: list[Path]
    nuclei: int


def segment_images(
    images: Sequence[Path],
    out_dir: Path,
    *,
    mpp: float,
    model: str,
    device: str = "auto",
    geojson: bool = False,
    show_progress: bool = True,
) -> SegmentReport:
    """``slidestream segment``: uint16 instance-mask PNGs (and QuPath GeoJSON) per image.

    ``mpp`` is the images' own µm/px; the model resamples to its working resolution. A model
    with a type head also writes ``<stem>.types.csv`` (``id,type,p_<type>...``; ``id`` is the
    label in the PNG), and its GeoJSON detections are classified by nucleus type with a fixed
    colour per type and the type probabilities as measurements.
    """
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from slidestream._atomic import atomic_path
    from slidestream._device import resolve_device
    from slidestream.errors import ConfigError
    from slidestream.models import load_nuclei_model

    out_dir.mkdir(parents=True, exist_ok=True)
    seg = load_nuclei_model(model, resolve_device(device))
    typed = hasattr(seg, "segment_typed") and getattr(seg, "n_types", 0) > 0
    masks: list[Path] = []
    docs: list[Path] = []
    tables: list[Path] = []
    total = 0
    for path in tqdm(images, desc="segment", unit="image", disable=not show_progress):
        rgb = read_rgb(path)
        types = None
        if typed:
            labels, types = seg.segment_typed(rgb, mpp)  # type: ignore[union-attr]
        else:
            labels = seg.segment(rgb, mpp)
        if int(labels.max(initial=0)) > 65535:
            raise ConfigError(
                f"{path}: more than 65535 nuclei do not fit a uint16 PNG; split the image"
            )
        with atomic_path(out_dir / f"{path.stem}.png") as tmp:
            Image.fromarray(labels.astype(np.uint16)).save(tmp, format="PNG")
        masks.append(out_dir / f"{path.stem}.png")
        if types is not None:
            tables.append(out_dir / f"{path.stem}.types.csv")
            _write_types_csv(tables[-1], types, labels)
        if geojson:
            docs.append(out_dir / f"{path.stem}.geojson")
            total += _write_image_geojson(docs[-1], path, labels, rgb, mpp, types)
    return SegmentReport(masks=masks, geojson=docs, types_csv=tables, nuclei=total)


def _write_types_csv(path: Path, types: Any, labels: Any) -> int:
    """``<stem>.types.csv``: ``id,type,p_<type>...`` for each instance id present in ``labels``."""
    import csv

    import numpy as np

    from slidestream._atomic import atomic_path
    from slidestream.overlays import type_probability_key

    present = set(np.unique(labels).tolist()) - {0}
    rows = 0
    with atomic_path(path) as tmp, Path(tmp).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "type", *(type_probability_key(n) for n in types.names)])
        for k, label in enumerate(types.ids.tolist()):
            if label not in present:
                continue
            probs = types.probabilities[k]
            writer.writerow(
                [label, types.names[int(types.index[k])], *(f"{float(p):.4f}" for p in probs)]
            )
            rows += 1
    return rows


def _write_image_geojson(
    path: Path, image_path: Path, labels: Any, rgb: Any, mpp: float, types: Any = None
) -> int:
    """One image's nuclei as QuPath detections (classified by type when ``types`` is given)."""
    import functools
    import hashlib

    from slidestream.models import measure_nuclei
    from slidestream.overlays import extract_tile_nuclei, write_nuclei_geojson
    from slidestream.pipeline.inference import measure_typed
    from slidestream.pipeline.stitching import with_nucleus_types

    h, w = labels.shape
    bounds = (float(w), float(h))
    # A whole image is one tile without halo: nuclei on its edge are expected, so the stitcher's
    # "nucleus touches the tile border" warning is silenced for this call.
    stitch_logger = logging.getLogger("slidestream.overlays._stitch")
    level = stitch_logger.level
    stitch_logger.setLevel(logging.ERROR)
    measure = measure_nuclei if types is None else functools.partial(measure_typed, types=types)
    try:
        table = extract_tile_nuclei(
            labels, rgb, core=(0, 0, w, h), l0_origin=(0.0, 0.0), l0_per_px=1.0,
            mpp=mpp, measure=measure, l0_bounds=bounds,
        )  # fmt: skip
    finally:
        stitch_logger.setLevel(level)
    if types is not None:
        table, _ = with_nucleus_types(table, tuple(types.names))
    digest = hashlib.sha256(image_path.read_bytes()).hexdigest()
    return write_nuclei_geojson(
        path, [table], id_namespace=digest, l0_bounds=bounds, classify_by="type"
    )


def read_rgb(path: Path) -> Any:
    """An image file as RGB uint8 (H, W, 3); a one-line :class:`ConfigError` when unreadable."""
    import numpy as np
    from PIL import Image

    from slidestream.errors import ConfigError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read image ({exc}); pass PNG/JPEG/TIFF RGB") from exc
