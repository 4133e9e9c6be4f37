"""TIFF structure: fast-path level matching for OpenSlide-opened slides, and the tifffile fallback.

The fast path uses the TIFF's own pyramid pages. For Aperio SVS these are the tiled pages in file
order (the stripped thumbnail and the label/macro pages are skipped); for generic tiled TIFF the
tiled main-chain pages. Each OpenSlide level must map to one page of identical size, otherwise the
slide stays on OpenSlide.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slidestream.errors import SlideOpenError

from ._resolution import mpp_from_tiff_resolution
from ._tiff_reader import TiffLevel, level_from_page

__all__ = ["FallbackTiff", "fast_levels", "open_fallback_tiff"]

logger = logging.getLogger(__name__)

#: OpenSlide vendors whose pyramid is plain TIFF pages the fast path decodes identically.
FAST_VENDORS = frozenset({"aperio", "generic-tiff"})

_UM_PER_OME_UNIT = {
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "Å": 1e-4,
}


def fast_levels(
    path: Path, vendor: str, level_dimensions: Sequence[tuple[int, int]]
) -> list[TiffLevel] | None:
    """TIFF pages for every OpenSlide level, or None when the fast path does not apply.

    Parameters
    ----------
    path
        Slide file.
    vendor
        OpenSlide vendor; only :data:`FAST_VENDORS` qualify.
    level_dimensions
        OpenSlide's ``(width, height)`` per level.
    """
    if vendor not in FAST_VENDORS or path.is_dir():
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tiled: list[Any] = [page for page in tif.pages if getattr(page, "is_tiled", False)]
            levels: list[TiffLevel] = []
            start = 0
            for width, height in level_dimensions:
                match = None
                for idx in range(start, len(tiled)):
                    page = tiled[idx]
                    if (int(page.imagewidth), int(page.imagelength)) == (width, height):
                        match, start = page, idx + 1
                        break
                if match is None:
                    logger.debug("%s: no TIFF page for level %dx%d", path.name, width, height)
                    return None
                level = level_from_page(match)
                if isinstance(level, str):
                    logger.debug("%s: fast path off (%s)", path.name, level)
                    return None
                levels.append(level)
            return levels
    except Exception as exc:  # tifffile cannot parse what OpenSlide opened: keep OpenSlide
        logger.debug("%s: fast path off (tifffile: %s)", path.name, exc)
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackTiff:
    """What the tifffile fallback learned about a TIFF OpenSlide refused."""

    vendor: str
    levels: tuple[TiffLevel, ...]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_candidates: tuple[tuple[str, tuple[float, float] | None], ...]
    objective_power: float | None
    properties: dict[str, str] = field(default_factory=dict)


def _ome_mpp(xml_text: str) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first OME Image (converted to µm), or None."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            values: list[float] = []
            for axis in ("X", "Y"):
                raw = element.get(f"PhysicalSize{axis}")
                unit = element.get(f"PhysicalSize{axis}Unit", "µm")
                if raw is None or unit not in _UM_PER_OME_UNIT:
                    return None
                try:
                    value = float(raw) * _UM_PER_OME_UNIT[unit]
                except ValueError:
                    return None
                if not value > 0:
                    return None
                values.append(value)
            return values[0], values[1]
    return None


def _ome_objective(xml_text: str) -> float | None:
    found = re.search(r'NominalMagnification="([0-9.]+)"', xml_text)
    if found is None:
        return None
    try:
        return float(found.group(1))
    except ValueError:
        return None


def _tag_properties(page: Any) -> dict[str, str]:
    props: dict[str, str] = {}
    for tag in page.tags.values():
        value = tag.value
        if isinstance(value, bytes | bytearray) or tag.name in ("ImageDescription",):
            continue
        if isinstance(value, str | int | float) or hasattr(value, "name"):
            text = value.name.lower() if hasattr(value, "name") else str(value)
            props[f"tiff.{tag.name}"] = text
        elif isinstance(value, tuple) and len(value) == 2 and tag.name.endswith("Resolution"):
            num, den = value
            props[f"tiff.{tag.name}"] = repr(num / den) if den else "0"
    return props


def _resolution(page: Any) -> tuple[float, float] | None:
    def _ratio(name: str) -> float | None:
        tag = page.tags.get(name)
        if tag is None:
            return None
        value = tag.value
        if isinstance(value, tuple) and len(value) == 2:
            return float(value[0]) / float(value[1]) if value[1] else None
        return float(value)

    unit_tag = page.tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    if page.tags.get("XResolution") is None:
        return None
    return mpp_from_tiff_resolution(_ratio("XResolution"), _ratio("YResolution"), unit)


def open_fallback_tiff(path: Path, reason: str) -> FallbackTiff:
    """Read the pyramid of a (OME-)TIFF with tifffile.

    Parameters
    ----------
    path
        The TIFF file.
    reason
        Why OpenSlide refused it (goes into the error message).

    Raises
    ------
    SlideOpenError
        If tifffile cannot parse it or its pages are not 8-bit grey/RGB(A) the reader decodes.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ValueError("no image series")
            series = tif.series[0]
            is_ome = bool(tif.is_ome)
            axes = str(series.axes)
            if axes not in ("YXS", "YX"):
                raise ValueError(f"series axes {axes!r} are not YX(S) RGB/grey")
            pages = [lvl.keyframe for lvl in series.levels]
            levels: list[TiffLevel] = []
            for page in pages:
                level = level_from_page(page)
                if isinstance(level, str):
                    raise ValueError(level)
                levels.append(level)
            first = pages[0]
            xml_text = (tif.ome_metadata or "") if is_ome else ""
            props = _tag_properties(first)
            candidates: list[tuple[str, tuple[float, float] | None]] = []
            if is_ome:
                ome = _ome_mpp(xml_text)
                candidates.append(("OME PhysicalSizeX/Y", ome))
                if ome is not None:
                    props["ome.PhysicalSizeX"], props["ome.PhysicalSizeY"] = (
                        repr(ome[0]),
                        repr(ome[1]),
                    )
            candidates.append(("TIFF resolution tags", _resolution(first)))
    except Exception as exc:
        raise SlideOpenError(
            f"{path.name}: not a readable slide (OpenSlide: {reason}; tifffile: {exc}); "
            "convert it to a tiled pyramidal TIFF (8-bit RGB, JPEG/deflate/LZW)"
        ) from exc
    width0, height0 = levels[0].width, levels[0].height
    downsamples = tuple(
        1.0 if i == 0 else (width0 / lvl.width + height0 / lvl.height) / 2.0
        for i, lvl in enumerate(levels)
    )
    return FallbackTiff(
        vendor="ome-tiff" if is_ome else "tiff",
        levels=tuple(levels),
        level_dimensions=tuple((lvl.width, lvl.height) for lvl in levels),
        level_downsamples=downsamples,
        mpp_candidates=tuple(candidates),
        objective_power=_ome_objective(xml_text) if is_ome else None,
        properties=props,
    )
