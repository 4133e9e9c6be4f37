"""Configuration of the viewer (``slidestream view``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slidestream.errors import ConfigError

__all__ = ["ViewerConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ViewerConfig:
    """What the viewer serves and how much it keeps in memory.

    Attributes
    ----------
    out_dir
        The output folder of ``slidestream run`` (``OUT/<slide>/summary.json``, ...).
    db_url
        Statistics database (SQLAlchemy URL), opened read-only; ``None``: no cohort page.
    tile_size_px
        DeepZoom tile edge without overlap (px of the DeepZoom level).
    tile_overlap_px
        DeepZoom tile overlap on each inner side (px).
    jpeg_quality
        JPEG quality of slide tiles (1..100).
    tile_cache_bytes
        Encoded slide and overlay tiles kept in memory (bytes, all slides together).
    max_open_slides
        Slides whose readers and nucleus indices stay open (least recently used are closed).
    readers_per_slide
        Concurrent readers (open handles) per slide.
    max_nuclei_per_request
        Most nuclei one ``/api/slides/<name>/nuclei`` answer holds.
    outline_cache_bytes
        Decompressed blocks of ``nuclei.geojson.gz`` kept in memory (all slides together).
    """

    out_dir: Path
    db_url: str | None = None
    tile_size_px: int = 254
    tile_overlap_px: int = 1
    jpeg_quality: int = 80
    tile_cache_bytes: int = 256 * 1024 * 1024
    max_open_slides: int = 16
    readers_per_slide: int = 2
    max_nuclei_per_request: int = 20_000
    outline_cache_bytes: int = 160 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 64 <= self.tile_size_px <= 2048:
            raise ConfigError(f"tile_size_px={self.tile_size_px}: expected 64..2048 px")
        if not 0 <= self.tile_overlap_px <= 8:
            raise ConfigError(f"tile_overlap_px={self.tile_overlap_px}: expected 0..8 px")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality={self.jpeg_quality}: expected 1..100")
        if self.tile_cache_bytes < 0:
            raise ConfigError(f"tile_cache_bytes={self.tile_cache_bytes}: expected >= 0")
        if self.max_open_slides < 1 or self.readers_per_slide < 1:
            raise ConfigError(
                f"max_open_slides={self.max_open_slides}, readers_per_slide="
                f"{self.readers_per_slide}: expected >= 1"
            )
        if self.max_nuclei_per_request < 1:
            raise ConfigError(
                f"max_nuclei_per_request={self.max_nuclei_per_request}: expected >= 1"
            )
