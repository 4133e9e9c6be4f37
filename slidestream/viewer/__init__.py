"""slidestream.viewer: a local web viewer of ``slidestream run`` results (``slidestream view``).

An ASGI app (Starlette, served by uvicorn) with a slide list, a deep-zoom slide page
(OpenSeadragon, vendored) with tissue-class and nucleus overlays, a cohort page from the
statistics database, and the JSON API under ``/api/`` that those pages use. It reads only the
result files of an output folder and the database (read-only). See the README section
"Viewing results" for the routes.
"""

from ._app import create_app
from ._catalog import RESULT_FILES, ResultCatalog, SlideEntry
from ._config import ViewerConfig
from ._dzi import DeepZoomGrid, TileNotFoundError, TileRegion
from ._nuclei_index import NucleusIndex
from ._server import LOOPBACK_HOSTS, is_loopback, serve
from ._service import TYPE_COLOURS, NotFoundError, ViewerService

__all__ = [
    "LOOPBACK_HOSTS",
    "RESULT_FILES",
    "TYPE_COLOURS",
    "DeepZoomGrid",
    "NotFoundError",
    "NucleusIndex",
    "ResultCatalog",
    "SlideEntry",
    "TileNotFoundError",
    "TileRegion",
    "ViewerConfig",
    "ViewerService",
    "create_app",
    "is_loopback",
    "serve",
]
