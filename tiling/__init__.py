"""Tissue detection, tile-grid geometry and tile streaming (``slidestream.tiling``).

Also the user's annotations (QuPath GeoJSON, ImageScope / ASAP XML) as classed level-0
geometries and the patch sampler that draws training patches from them.

Upstream: :mod:`slidestream.wsi` (slides are read through :class:`SlideLike`). Frames: ``l0_``
level-0 px, ``t_`` target px at ``tile_mpp``, ``m_`` tissue-mask px.
"""

from ._annotation_formats import AnnotationFormat
from ._annotations import (
    ANNOTATION_SUFFIXES,
    AnnotatedNuclei,
    AnnotatedObject,
    AnnotationSet,
    pair_annotations,
    read_annotations,
)
from ._dataset import ReaderKind, SlideOpener, TileBatch, TileDataset, TileLoader, make_loader
from ._grid import (
    SlideExtent,
    SlideGeometry,
    TileGrid,
    TileSpec,
    TilingConfig,
    plan_tiles,
    tissue_fractions,
)
from ._patch_sampler import PatchLocations, PatchSamplingConfig, plan_patches, read_patches
from ._protocols import SlideLike
from ._tissue import TissueDetectionConfig, TissueMask, detect_tissue, tissue_mask_from_rgb

__all__ = [
    "ANNOTATION_SUFFIXES",
    "AnnotatedNuclei",
    "AnnotatedObject",
    "AnnotationFormat",
    "AnnotationSet",
    "PatchLocations",
    "PatchSamplingConfig",
    "ReaderKind",
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
    "pair_annotations",
    "plan_patches",
    "plan_tiles",
    "read_annotations",
    "read_patches",
    "tissue_fractions",
    "tissue_mask_from_rgb",
]
