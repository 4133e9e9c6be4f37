"""Tissue detection, tile-grid geometry and tile streaming (``slidestream.tiling``).

Upstream: :mod:`slidestream.wsi` (slides are read through :class:`SlideLike`). Frames: ``l0_``
level-0 px, ``t_`` target px at ``tile_mpp``, ``m_`` tissue-mask px.
"""

from ._dataset import SlideOpener, TileBatch, TileDataset, TileLoader, make_loader
from ._grid import (
    SlideExtent,
    SlideGeometry,
    TileGrid,
    TileSpec,
    TilingConfig,
    plan_tiles,
    tissue_fractions,
)
from ._protocols import SlideLike
from ._tissue import TissueDetectionConfig, TissueMask, detect_tissue, tissue_mask_from_rgb

__all__ = [
    "SlideExtent",
    "SlideGeometry",
    "SlideLike",
    "SlideOpener",
    "TileBatch",
    "TileDataset",
    "TileGrid",
    "TileLoader",
    "TileSpec",
    "TilingConfig",
    "TissueDetectionConfig",
    "TissueMask",
    "detect_tissue",
    "make_loader",
    "plan_tiles",
    "tissue_fractions",
    "tissue_mask_from_rgb",
]
