"""slidestream: whole-slide image analysis for digital pathology.

Subpackages (data flows one way, wired only by the application modules of this package):
``slidestream.wsi`` -> ``slidestream.tiling`` -> ``slidestream.models`` ->
``slidestream.overlays`` -> ``slidestream.db``.

Importing this package is cheap: it imports neither torch nor OpenSlide.
"""

from slidestream._version import __version__

__all__ = ["__version__"]
