"""What the viewer's routes call: slides, tiles, overlays and statistics of one output folder.

:class:`ViewerService` holds the catalogue of ``OUT``, the open slides, the nucleus indices and
the tile cache; the web layer (``_app.py``) only parses requests and formats
answers. Every lookup starts from a slide *name* found in the catalogue; unknown names, levels
and tiles raise :class:`NotFoundError`, an unreadable slide a
:class:`~slidestream.errors.SlidestreamError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cv2
import imagecodecs
import numpy as np
import numpy.typing as npt
import orjson
from sqlalchemy import Engine

from slidestream.db import latest_runs, list_slides
from slidestream.errors import ConfigError, SlideOpenError, SlidestreamError
from slidestream.overlays import (
    MEASUREMENT_DISPLAY_NAMES,
    NUCLEUS_TYPE_CLASSES,
    NUCLEUS_TYPE_COLORS,
    UNCLASSIFIED,
)

from ._cache import ByteLRU
from ._catalog import ResultCatalog, SlideEntry
from ._config import ViewerConfig
from ._dzi import (
    DeepZoomGrid,
    TileNotFoundError,
    encode_jpeg,
    needs_low_res,
    render_slide_tile,
    tile_from_image,
)
from ._nuclei_index import NucleusIndex
from ._outlines import OutlineStore, member_cache
from ._overlay_tiles import DENSITY_ABOVE_MPP, DensityPyramid, render_nuclei_tile
from ._slides import LOW_RES_PX, SlidePool, SlideReaders

__all__ = ["TYPE_COLOURS", "NotFoundError", "SlideNuclei", "ViewerService"]

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]

TYPE_COLOURS: Final[Mapping[str, RGB]] = {
    **{t: NUCLEUS_TYPE_COLORS[q] for t, q in NUCLEUS_TYPE_CLASSES.items()},
    UNCLASSIFIED: (128, 128, 128),
}
"""Colours of nucleus types (when ``nuclei.parquet`` has a ``type`` column): the fixed colours
of the QuPath detections (:data:`slidestream.overlays.NUCLEUS_TYPE_COLORS`)."""
_THUMBNAIL_PX: Final = 320


class NotFoundError(LookupError):
    """No such slide, result file, level or tile (answered with 404)."""


def _model_type_colours(summary: Mapping[str, Any] | None) -> dict[str, RGB]:
    """Type name -> colour that a ``train nuclei-types`` model gave (``summary.json``
    ``provenance.models.nuclei.details.type_colors``); empty for the shipped model."""
    try:
        given = summary["provenance"]["models"]["nuclei"]["details"]["type_colors"]  # type: ignore[index]
        return {str(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in given.items()}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return {}


def _fallback_colour(name: str) -> RGB:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    hue = digest[0] / 255.0 * 179.0
    hsv = np.array([[[hue, 170, 210]]], np.uint8)
    r, g, b = (int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])
    return r, g, b


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideNuclei:
    """The nuclei of one slide, ready to draw."""

    index: NucleusIndex
    """Spatial index over ``nuclei.parquet``."""
    pyramid: DensityPyramid
    """Its density raster."""
    colours: npt.NDArray[np.uint8]
    """``(len(index.categories), 3)`` RGB per category."""
    outlines: OutlineStore | None
    """Outlines from ``nuclei.geojson.gz``, when present."""

    def colour_map(self) -> dict[str, list[int]]:
        """Category name -> ``[r, g, b]``."""
        return {
            name: [int(c) for c in self.colours[i]] for i, name in enumerate(self.index.categories)
        }


class ViewerService:
    """The analysed slides of one output folder, as the viewer serves them.

    Parameters
    ----------
    config
        What to serve.
    engine
        The statistics database, opened read-only, or ``None``.
    """

    def __init__(self, config: ViewerConfig, *, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine
        self.catalog = ResultCatalog(
            config.out_dir,
            runs=(lambda: latest_runs(engine)) if engine is not None else None,
            metadata=(lambda: _metadata_by_name(engine)) if engine is not None else None,
        )
        self.slides = SlidePool(
            max_open=config.max_open_slides, readers_per_slide=config.readers_per_slide
        )
        self.tiles: ByteLRU[bytes] = ByteLRU(config.tile_cache_bytes, len)
        self._nuclei: OrderedDict[tuple[str, int], SlideNuclei] = OrderedDict()
        self._colours: dict[tuple[str, int], dict[str, RGB]] = {}
        self._gates: dict[tuple[str, int], threading.Lock] = {}
        self._lock = threading.Lock()
        self._empty_png: dict[tuple[int, int], bytes] = {}
        self._outline_cache = member_cache(config.outline_cache_bytes)
        self.catalog.refresh()

    # ------------------------------------------------------------------ slides
    def entries(self) -> list[SlideEntry]:
        """Every slide of ``OUT`` (and of the database), rescanned."""
        return self.catalog.refresh()

    def entry(self, name: str) -> SlideEntry:
        """The entry of a slide whose results are in ``OUT``.

        Raises
        ------
        NotFoundError
            No such slide, or no complete results for it.
        """
        entry = self.catalog.get(name)
        if entry is None:
            raise NotFoundError(f"no slide named {name!r} in {self.catalog.root}")
        if not entry.viewable:
            raise NotFoundError(
                f"slide {name!r} has no complete results in {self.catalog.root} "
                f"({entry.status}: {entry.reason or 'no summary.json'})"
            )
        return entry

    def geometry(self, entry: SlideEntry) -> tuple[tuple[int, int], float]:
        """Level-0 ``(width, height)`` px and µm/px of a slide, from its ``summary.json``."""
        slide = (entry.summary or {}).get("slide")
        try:
            if not isinstance(slide, Mapping):
                raise TypeError("no slide block")
            dims = (int(slide["width"]), int(slide["height"]))
            mpp = (float(slide["mpp_x"]) + float(slide["mpp_y"])) / 2.0
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{entry.folder}/summary.json: no slide size or µm/px ({exc}); rerun "
                "slidestream run"
            ) from exc
        if dims[0] < 1 or dims[1] < 1 or not mpp > 0:
            raise ConfigError(f"{entry.folder}/summary.json: invalid slide size or µm/px")
        return dims, mpp

    def grid(self, entry: SlideEntry) -> DeepZoomGrid:
        """The DeepZoom pyramid of a slide."""
        dims, _ = self.geometry(entry)
        return DeepZoomGrid(
            l0_dimensions=dims,
            tile_size_px=self.config.tile_size_px,
            overlap_px=self.config.tile_overlap_px,
        )

    def readers(self, entry: SlideEntry) -> SlideReaders:
        """The open slide file of an entry.

        Raises
        ------
        SlideOpenError
            The file is gone, unreadable, or not the analysed slide.
        """
        path = entry.slide_path
        if path is None:
            raise SlideOpenError(
                f"{entry.folder}/summary.json names no slide file; rerun slidestream run"
            )
        if not path.exists():
            raise SlideOpenError(
                f"{path}: slide file missing (moved or deleted since the analysis); put it "
                "back or rerun slidestream run on its new location"
            )
        fingerprint = (entry.summary or {}).get("slide", {}).get("fingerprint")
        readers = self.slides.get(
            (entry.name, entry.version),
            path,
            fingerprint=fingerprint if isinstance(fingerprint, str) else None,
        )
        dims, _ = self.geometry(entry)
        if readers.geometry.dimensions != dims:
            raise SlideOpenError(
                f"{path}: slide is {readers.geometry.dimensions[0]}x"
                f"{readers.geometry.dimensions[1]} px, the results are of a "
                f"{dims[0]}x{dims[1]} px slide; rerun slidestream run on it"
            )
        return readers

    def check_slide(self, name: str) -> SlideEntry:
        """The entry, after making sure its slide file opens (for the slide page)."""
        entry = self.entry(name)
        self.readers(entry)
        return entry

    def slide_tile(self, name: str, z: int, col: int, row: int) -> bytes:
        """A JPEG DeepZoom tile of the slide (cached)."""
        entry = self.entry(name)
        region = self._region(entry, z, col, row)
        key = ("slide", entry.name, entry.version, z, col, row)
        cached = self.tiles.get(key)
        if cached is not None:
            return cached
        readers = self.readers(entry)
        low = readers.geometry.dimensions[0] / LOW_RES_PX
        low = max(low, readers.geometry.dimensions[1] / LOW_RES_PX)
        if region.z_downsample >= low and needs_low_res(readers.geometry.level_downsamples, region):
            rgb = tile_from_image(readers.low_res(), readers.geometry.dimensions, region)
            data = encode_jpeg(rgb, quality=self.config.jpeg_quality)
        else:
            with readers.lease() as slide:
                data = render_slide_tile(slide, region, quality=self.config.jpeg_quality)
        self.tiles.put(key, data)
        return data

    def thumbnail(self, name: str) -> bytes:
        """A JPEG thumbnail of the slide (at most 320 px), cached."""
        entry = self.entry(name)
        key = ("thumbnail", entry.name, entry.version)
        cached = self.tiles.get(key)
        if cached is not None:
            return cached
        readers = self.readers(entry)
        with readers.lease() as slide:
            rgb = slide.get_thumbnail((_THUMBNAIL_PX, _THUMBNAIL_PX))
        data = bytes(imagecodecs.jpeg8_encode(rgb, level=self.config.jpeg_quality))
        self.tiles.put(key, data)
        return data

    def _region(self, entry: SlideEntry, z: int, col: int, row: int) -> Any:
        try:
            return self.grid(entry).region(z, col, row)
        except TileNotFoundError as exc:
            raise NotFoundError(f"slide {entry.name!r}: {exc}") from exc

    # ------------------------------------------------------------------ files
    def result_file(self, name: str, kind: str) -> Path:
        """A result file of a slide (``kind``: a key of :data:`RESULT_FILES`)."""
        entry = self.entry(name)
        path = self.catalog.result_file(entry, kind)
        if path is None:
            raise NotFoundError(f"slide {name!r} has no {kind} result in {self.catalog.root}")
        return path

    def tissue_colours(self, entry: SlideEntry) -> dict[str, RGB]:
        """Tissue class -> colour, from the classifications of ``tissue.geojson``."""
        key = (entry.name, entry.version)
        with self._lock:
            cached = self._colours.get(key)
        if cached is not None:
            return cached
        colours: dict[str, RGB] = {}
        path = self.catalog.result_file(entry, "tissue")
        if path is not None:
            try:
                data = orjson.loads(path.read_bytes())
                for feature in data.get("features", []):
                    cls = (feature.get("properties") or {}).get("classification") or {}
                    name, colour = cls.get("name"), cls.get("color")
                    if isinstance(name, str) and isinstance(colour, list) and len(colour) == 3:
                        colours[name] = (int(colour[0]), int(colour[1]), int(colour[2]))
            except (OSError, orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                logger.warning("%s: unreadable tissue classes", path)
        with self._lock:
            self._colours[key] = colours
        return colours

    # ------------------------------------------------------------------ nuclei
    def nuclei(self, name: str) -> SlideNuclei:
        """The nucleus index of a slide (built on first use, kept for recent slides)."""
        entry = self.entry(name)
        key = (entry.name, entry.version)
        with self._lock:
            found = self._nuclei.get(key)
            if found is not None:
                self._nuclei.move_to_end(key)
                return found
            gate = self._gates.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                found = self._nuclei.get(key)
            if found is not None:
                return found
            built = self._build_nuclei(entry)
            evicted: list[SlideNuclei] = []
            with self._lock:
                for old in [k for k in self._nuclei if k[0] == entry.name]:
                    evicted.append(self._nuclei.pop(old))
                self._nuclei[key] = built
                while len(self._nuclei) > self.config.max_open_slides:
                    evicted.append(self._nuclei.popitem(last=False)[1])
                self._gates.pop(key, None)
        for item in evicted:
            item.index.close()
            if item.outlines is not None:
                item.outlines.close()
        return built

    def _build_nuclei(self, entry: SlideEntry) -> SlideNuclei:
        path = self.catalog.result_file(entry, "nuclei_parquet")
        if path is None:
            raise NotFoundError(
                f"slide {entry.name!r} has no nuclei.parquet in {self.catalog.root}"
            )
        dims, mpp = self.geometry(entry)
        index = NucleusIndex(path, mpp=mpp, l0_dimensions=dims)
        if index.colour_key == "type":
            palette: Mapping[str, RGB] = {**TYPE_COLOURS, **_model_type_colours(entry.summary)}
        else:
            palette = {**self.tissue_colours(entry), UNCLASSIFIED: (128, 128, 128)}
        colours = np.array(
            [palette.get(c) or _fallback_colour(c) for c in index.categories], np.uint8
        ).reshape(-1, 3)
        geojson = self.catalog.result_file(entry, "nuclei_geojson")
        return SlideNuclei(
            index=index,
            pyramid=DensityPyramid(index),
            colours=colours,
            outlines=(
                OutlineStore(geojson, cache=self._outline_cache) if geojson is not None else None
            ),
        )

    def nuclei_tile(self, name: str, z: int, col: int, row: int) -> bytes:
        """A transparent PNG DeepZoom tile of the nuclei (density or dots; cached)."""
        entry = self.entry(name)
        region = self._region(entry, z, col, row)
        key = ("nuclei", entry.name, entry.version, z, col, row)
        cached = self.tiles.get(key)
        if cached is not None:
            return cached
        nuclei = self.nuclei(name)
        data = render_nuclei_tile(
            nuclei.index, nuclei.pyramid, region, nuclei.colours, empty=self._empty_png
        )
        self.tiles.put(key, data)
        return data

    def nuclei_in_box(
        self, name: str, box: tuple[float, float, float, float], *, limit: int
    ) -> dict[str, Any]:
        """The nuclei whose centroid lies in a level-0 box, as a GeoJSON FeatureCollection.

        Parameters
        ----------
        name
            Slide name.
        box
            ``(x0, y0, x1, y1)`` level-0 px.
        limit
            Most features returned; when more nuclei are in the box, those nearest its centre.

        Returns
        -------
        dict
            ``{"type": "FeatureCollection", "features": [...], "count": n in the box,
            "truncated": bool, "colour_key": ..., "outlines": bool}``. Each feature has the
            nucleus outline (``Polygon``; ``Point`` for a run with ``--nuclei-as points`` or
            without GeoJSON) in level-0 px and ``properties`` ``index`` (row of
            ``nuclei.parquet``), ``class`` (its colour key's value), ``colour`` and
            ``measurements`` (QuPath display names).
        """
        nuclei = self.nuclei(name)
        index = nuclei.index
        x0, y0, x1, y1 = box
        pos = index.in_box(x0, y0, x1, y1)
        count = int(pos.size)
        limit = max(1, min(limit, self.config.max_nuclei_per_request))
        if count > limit:
            cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
            d2 = (index.x[pos] - cx) ** 2 + (index.y[pos] - cy) ** 2
            pos = pos[np.argsort(d2, kind="stable")[:limit]]
        rows = index.rows(pos)
        order = {int(r): i for i, r in enumerate(rows.index)}
        by_row = np.argsort(index.row[pos], kind="stable")
        pos = pos[by_row]
        geometries: list[Any] | None = None
        if nuclei.outlines is not None and pos.size:
            try:
                geometries = nuclei.outlines.geometries(index.row[pos])
            except (SlidestreamError, OSError) as exc:
                logger.warning("%s: outlines unavailable (%s); drawing centroids", name, exc)
        cols = rows.columns
        colours = nuclei.colour_map()
        features = []
        for k, p in enumerate(pos):
            row = int(index.row[p])
            i = order[row]
            category = index.categories[int(index.codes[p])]
            measurements = {}
            for column in index.measurement_columns:
                value = cols[column][i]
                if isinstance(value, float) and math.isfinite(value):
                    measurements[MEASUREMENT_DISPLAY_NAMES.get(column, column)] = value
            properties: dict[str, Any] = {
                "index": row,
                "class": category,
                "colour": colours[category],
                "measurements": measurements,
            }
            if index.colour_key == "type" and "tissue_class" in cols:
                properties["tissue_class"] = cols["tissue_class"][i] or UNCLASSIFIED
            geometry = geometries[k] if geometries is not None else None
            if geometry is None:
                geometry = {"type": "Point", "coordinates": [float(index.x[p]), float(index.y[p])]}
            features.append(
                {
                    "type": "Feature",
                    "id": cols["id"][i] if "id" in cols else str(row),
                    "geometry": geometry,
                    "properties": properties,
                }
            )
        return {
            "type": "FeatureCollection",
            "bbox": [x0, y0, x1, y1],
            "count": count,
            "truncated": count > len(features),
            "colour_key": index.colour_key,
            "outlines": geometries is not None,
            "features": features,
        }

    # ------------------------------------------------------------------ descriptions
    def slide_row(self, entry: SlideEntry) -> dict[str, Any]:
        """One slide of ``GET /api/slides``: status and headline statistics."""
        stats = entry.statistics()
        area = stats.get("nucleus_area_um2")
        classes = stats.get("classes")
        fractions = {}
        if isinstance(classes, Mapping):
            for cls, values in classes.items():
                if isinstance(values, Mapping) and values.get("fraction") is not None:
                    fractions[str(cls)] = values.get("fraction")
        slide = (entry.summary or {}).get("slide") or {}
        provenance = (entry.summary or {}).get("provenance") or {}
        return {
            "name": entry.name,
            "status": entry.status,
            "reason": entry.reason,
            "viewable": entry.viewable,
            "in_out_dir": entry.folder is not None,
            "vendor": slide.get("vendor"),
            "width": slide.get("width"),
            "height": slide.get("height"),
            "mpp": slide.get("mpp_x"),
            "objective_power": slide.get("objective_power"),
            "tissue_area_mm2": stats.get("tissue_area_mm2"),
            "nucleus_count": stats.get("nucleus_count"),
            "nuclei_per_mm2": stats.get("nuclei_per_mm2"),
            "nucleus_area_median_um2": area.get("median") if isinstance(area, Mapping) else None,
            "mean_hematoxylin_od": stats.get("mean_hematoxylin_od"),
            "class_fractions": fractions,
            "finished_at": provenance.get("finished_at"),
            "metadata": dict(entry.metadata),
        }

    def slide_info(self, name: str) -> dict[str, Any]:
        """What the slide page needs: geometry, layers, classes and their colours."""
        entry = self.entry(name)
        dims, mpp = self.geometry(entry)
        grid = self.grid(entry)
        has_nuclei = self.catalog.result_file(entry, "nuclei_parquet") is not None
        info: dict[str, Any] = {
            **self.slide_row(entry),
            "dimensions": list(dims),
            "mpp": mpp,
            "dzi_levels": grid.n_levels,
            "tissue_colours": {k: list(v) for k, v in self.tissue_colours(entry).items()},
            "layers": {
                "tissue": self.catalog.result_file(entry, "tissue") is not None,
                "nuclei": has_nuclei,
                "outlines": self.catalog.result_file(entry, "nuclei_geojson") is not None,
                "overlay_png": self.catalog.result_file(entry, "overlay") is not None,
            },
            "density_above_mpp": DENSITY_ABOVE_MPP,
        }
        if has_nuclei:
            nuclei = self.nuclei(name)
            info["nuclei"] = {
                "count": nuclei.index.count,
                "colour_key": nuclei.index.colour_key,
                "colours": nuclei.colour_map(),
                "density_scale_per_mm2": nuclei.index.density_scale,
            }
        return info

    def close(self) -> None:
        """Close every slide and index (idempotent)."""
        self.slides.close()
        with self._lock:
            items, self._nuclei = list(self._nuclei.values()), OrderedDict()
        for item in items:
            item.index.close()
        if self.engine is not None:
            self.engine.dispose()


def _metadata_by_name(engine: Engine) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for row in list_slides(engine):
        meta = row.get("metadata") or {}
        if meta:
            out.setdefault(str(row["name"]), {}).update(meta)
    return out
