"""``open_slide``: pick the reader for a path and assemble the slide's metadata."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from slidestream.errors import ConfigError, SlideOpenError

from ._fingerprint import sha256_of_files
from ._image_reader import ImageReader, load_image_rgb
from ._openslide_reader import (
    OpenSlideReader,
    background_from_properties,
    mpp_candidates,
    objective_power,
    open_openslide,
)
from ._resolution import resolve_mpp
from ._slide import Slide, SlideInfo
from ._tiff_open import fast_levels, open_fallback_tiff
from ._tiff_reader import DEFAULT_CACHE_BYTES, TiffTileReader

__all__ = ["SLIDE_EXTENSIONS", "ReaderChoice", "open_slide", "slide_name"]

logger = logging.getLogger(__name__)

#: Lower-case file suffixes of slides OpenSlide or our fallbacks open. Compound suffixes
#: (``.ome.tif``) come first when stripping names.
SLIDE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".svs",
        ".tif",
        ".tiff",
        ".ndpi",
        ".vms",
        ".vmu",
        ".scn",
        ".mrxs",
        ".svslide",
        ".bif",
        ".dcm",
        ".ome.tif",
        ".ome.tiff",
        ".png",
        ".jpg",
        ".jpeg",
    }
)
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_WHITE = (255, 255, 255)

ReaderChoice = Literal["auto", "openslide"]


def slide_name(path: Path) -> str:
    """File name without its slide extension (``a.ome.tif`` -> ``a``, folder -> folder name)."""
    name = path.name
    lower = name.lower()
    for suffix in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _member_files(path: Path) -> tuple[Path, ...]:
    if path.is_dir():
        return tuple(sorted(p for p in path.iterdir() if p.is_file()))
    return (path,)


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a slide's file bytes (of each file of a DICOM folder, names included).

    The fingerprint of a slide that cannot be opened (so no quickhash is known); an opened
    :class:`Slide` has its own (:attr:`Slide.fingerprint`).
    """
    return sha256_of_files(_member_files(Path(path).expanduser()))


def open_slide(
    path: str | Path,
    *,
    mpp: float | None = None,
    reader: ReaderChoice = "auto",
    require_mpp: bool = True,
    tile_cache_bytes: int | None = None,
) -> Slide:
    """Open a whole-slide image (context manager).

    Order: PNG/JPEG by suffix -> the image reader; otherwise OpenSlide (SVS, NDPI, generic TIFF,
    DICOM file or folder, Philips, Leica, MIRAX, Ventana, ...), where Aperio and generic-tiff
    pyramids of plain JPEG/JPEG 2000/deflate/LZW/raw tiles are served by the fast TIFF reader;
    a TIFF OpenSlide refuses (OME-TIFF, plain TIFF) -> the tifffile reader.

    Parameters
    ----------
    path
        Slide file, or a folder holding one DICOM WSI series.
    mpp
        µm/px at level 0; overrides what the file says (the first link of the resolution chain).
    reader
        ``"auto"`` (default) or ``"openslide"`` to force OpenSlide pixels (the reference).
    require_mpp
        Raise :class:`MissingResolutionError` when no µm/px is known (default). With ``False``
        the slide opens with its µm/px unknown (:attr:`Slide.has_mpp` is ``False`` and the
        ``mpp`` properties raise), e.g. to show its metadata.
    tile_cache_bytes
        Capacity of the fast TIFF readers' decoded-tile cache (default 64 MiB); a server with
        many open slides passes less.

    Returns
    -------
    Slide
        Open slide; close it or use ``with open_slide(p) as slide:``.

    Raises
    ------
    SlideOpenError
        The path is missing or no reader can open it.
    MissingResolutionError
        No µm/px in the file, ``mpp`` not given and ``require_mpp`` true.
    ConfigError
        ``mpp`` is not a positive number, or ``reader`` is unknown.

    Examples
    --------
    >>> # with open_slide("CMU-1-Small-Region.svs") as slide:
    >>> #     slide.dimensions, slide.mpp     # ((2220, 2967), 0.499)
    """
    if reader not in ("auto", "openslide"):
        raise ConfigError(f"reader={reader!r} is unknown; use 'auto' or 'openslide'")
    slide_path = Path(path).expanduser()
    if not slide_path.exists():
        raise SlideOpenError(f"{slide_path}: no such file or folder; check the slide path")
    if slide_path.suffix.lower() in _IMAGE_SUFFIXES and reader == "auto":
        return _open_image(slide_path, mpp, require_mpp)
    cache = DEFAULT_CACHE_BYTES if tile_cache_bytes is None else int(tile_cache_bytes)
    try:
        return _open_with_openslide(slide_path, mpp, reader, require_mpp, cache)
    except SlideOpenError as exc:
        if reader == "openslide" or slide_path.is_dir():
            raise
        return _open_with_tifffile(
            slide_path, mpp, require_mpp, reason=str(exc.__cause__ or exc), cache=cache
        )


def _mpp_pair(
    path: Path,
    mpp: float | None,
    candidates: tuple[tuple[str, tuple[float, float] | None], ...],
    required: bool,
) -> tuple[float | None, float | None]:
    found = resolve_mpp(path, explicit=mpp, candidates=candidates, required=required)
    return (None, None) if found is None else found


def _open_with_openslide(
    path: Path,
    mpp: float | None,
    reader: ReaderChoice,
    require_mpp: bool,
    cache: int = DEFAULT_CACHE_BYTES,
) -> Slide:
    handle = open_openslide(path)
    try:
        properties = dict(handle.properties)
        vendor = properties.get("openslide.vendor", "unknown")
        background = background_from_properties(properties)
        mpp_x, mpp_y = _mpp_pair(path, mpp, mpp_candidates(properties), require_mpp)
        level_dimensions = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
        info = SlideInfo(
            path=path,
            name=slide_name(path),
            vendor=vendor,
            level_dimensions=level_dimensions,
            level_downsamples=tuple(float(d) for d in handle.level_downsamples),
            mpp_x=mpp_x,
            mpp_y=mpp_y,
            objective_power=objective_power(properties),
            background_rgb=background,
            associated_images=tuple(sorted(handle.associated_images)),
            properties=properties,
            quickhash=properties.get("openslide.quickhash-1"),
            files=_member_files(path),
        )
        levels = fast_levels(path, vendor, level_dimensions) if reader == "auto" else None
    except BaseException:
        handle.close()
        raise
    if levels is not None:
        handle.close()
        fast = TiffTileReader(
            path, levels, info.level_downsamples, background, name="fast-tiff", cache_bytes=cache
        )
        logger.debug("%s: %s slide on the fast TIFF reader", path.name, vendor)
        return Slide(info, fast, fingerprint_fn=sha256_of_files)
    return Slide(info, OpenSlideReader(path, handle, background), fingerprint_fn=sha256_of_files)


def _open_with_tifffile(
    path: Path,
    mpp: float | None,
    require_mpp: bool,
    *,
    reason: str,
    cache: int = DEFAULT_CACHE_BYTES,
) -> Slide:
    found = open_fallback_tiff(path, reason)
    mpp_x, mpp_y = _mpp_pair(path, mpp, found.mpp_candidates, require_mpp)
    info = SlideInfo(
        path=path,
        name=slide_name(path),
        vendor=found.vendor,
        level_dimensions=found.level_dimensions,
        level_downsamples=found.level_downsamples,
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        objective_power=found.objective_power,
        background_rgb=_WHITE,
        associated_images=(),
        properties=found.properties,
        files=(path,),
    )
    tiff = TiffTileReader(
        path, found.levels, found.level_downsamples, _WHITE, name="tifffile", cache_bytes=cache
    )
    logger.debug("%s: opened with tifffile as %s (OpenSlide: %s)", path.name, found.vendor, reason)
    return Slide(info, tiff, fingerprint_fn=sha256_of_files)


def _open_image(path: Path, mpp: float | None, require_mpp: bool) -> Slide:
    mpp_x, mpp_y = _mpp_pair(path, mpp, (), require_mpp)
    pixels = load_image_rgb(path, _WHITE)
    height, width = pixels.shape[:2]
    info = SlideInfo(
        path=path,
        name=slide_name(path),
        vendor="image",
        level_dimensions=((width, height),),
        level_downsamples=(1.0,),
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        objective_power=None,
        background_rgb=_WHITE,
        associated_images=(),
        properties={"image.format": path.suffix.lower().lstrip(".")},
        files=(path,),
    )
    return Slide(info, ImageReader(pixels, _WHITE), fingerprint_fn=sha256_of_files)
