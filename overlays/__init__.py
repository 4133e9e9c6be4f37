"""slidestream.overlays: stitching, tissue polygons, QuPath GeoJSON, parquet and overlay PNG.

Everything here works on plain arrays and level-0 pixel coordinates (QuPath's frame); every file
is written atomically (:mod:`slidestream._atomic`: ``<name>.tmp`` beside the target, fsync,
rename).
"""

from ._geojson import RGB, write_nuclei_geojson, write_tissue_geojson
from ._ids import NUCLEUS_ID_NAMESPACE, nucleus_ids
from ._nucleus_types import (
    NUCLEUS_TYPE_CLASSES,
    NUCLEUS_TYPE_COLORS,
    nucleus_type_colors,
    type_classification,
    type_probability_key,
)
from ._overlay_png import density_colormap, render_overlay_png
from ._parquet import ParquetStream, write_nuclei_parquet
from ._stitch import MeasureFn, extract_tile_nuclei
from ._table import MEASUREMENT_DISPLAY_NAMES, UNCLASSIFIED, NucleusTable, rebatch_tables
from ._tissue_polygons import (
    ClassRaster,
    TissueRegions,
    assign_classes,
    class_map_to_polygons,
    class_map_to_raster,
    raster_to_polygons,
    tissue_class_regions,
)

__all__ = [
    "MEASUREMENT_DISPLAY_NAMES",
    "NUCLEUS_ID_NAMESPACE",
    "NUCLEUS_TYPE_CLASSES",
    "NUCLEUS_TYPE_COLORS",
    "RGB",
    "UNCLASSIFIED",
    "ClassRaster",
    "MeasureFn",
    "NucleusTable",
    "ParquetStream",
    "TissueRegions",
    "assign_classes",
    "class_map_to_polygons",
    "class_map_to_raster",
    "density_colormap",
    "extract_tile_nuclei",
    "nucleus_ids",
    "nucleus_type_colors",
    "raster_to_polygons",
    "rebatch_tables",
    "render_overlay_png",
    "tissue_class_regions",
    "type_classification",
    "type_probability_key",
    "write_nuclei_geojson",
    "write_nuclei_parquet",
    "write_tissue_geojson",
]
