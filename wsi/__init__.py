"""slidestream.wsi: open whole-slide images and read pixels at a physical resolution.

The only package that imports OpenSlide/tifffile for slides. :func:`open_slide` returns a
:class:`Slide` whatever the format (OpenSlide formats, a fast TIFF tile reader for Aperio/generic
TIFF, tifffile for OME-TIFF, plain PNG/JPEG). Coordinates are level-0 ``(x, y)`` px, sizes
``(width, height)``, pixels RGB uint8 ``(H, W, 3)``, resolutions µm/px.
"""

from __future__ import annotations

from ._open import SLIDE_EXTENSIONS, ReaderChoice, file_fingerprint, open_slide, slide_name
from ._openslide_reader import reader_versions
from ._slide import RegionReader, Slide, SlideInfo

__all__ = [
    "SLIDE_EXTENSIONS",
    "ReaderChoice",
    "RegionReader",
    "Slide",
    "SlideInfo",
    "file_fingerprint",
    "open_slide",
    "reader_versions",
    "slide_name",
]
