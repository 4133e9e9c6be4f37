"""The one exception hierarchy of slidestream.

Every error the library raises on purpose derives from :class:`SlidestreamError`; where a
builtin fits, the subclass inherits it too (``SlideOpenError`` is an ``OSError``, ``ConfigError``
a ``ValueError``), so callers can catch either. Each message says what failed, the offending
value, what was expected and the fix, on one line, e.g.
``"slide.svs: slide has no µm/px; pass --mpp 0.25"``.

This module is the bottom layer: every other subpackage may import it, it imports nothing of ours.
"""

from __future__ import annotations

__all__ = [
    "AnnotationError",
    "ClusterError",
    "ConfigError",
    "DatabaseError",
    "GeometryError",
    "Interrupted",
    "MissingResolutionError",
    "NoTissueError",
    "SchemaVersionError",
    "SlideOpenError",
    "SlideReadError",
    "SlidestreamError",
    "WeightsError",
]


class SlidestreamError(Exception):
    """Base class of every error slidestream raises on purpose."""


class SlideOpenError(SlidestreamError, OSError):
    """A slide file cannot be opened (missing, unsupported format, not a slide)."""


class MissingResolutionError(SlidestreamError, ValueError):
    """A slide has no usable µm/px; the fix is to pass ``--mpp``."""


class SlideReadError(SlidestreamError, OSError):
    """A region of an opened slide cannot be read (corrupt tile data)."""


class NoTissueError(SlidestreamError, ValueError):
    """Tissue detection found no tissue on a slide."""


class ConfigError(SlidestreamError, ValueError):
    """An option, config file or model spec is invalid."""


class AnnotationError(ConfigError):
    """An annotation file (QuPath GeoJSON, ImageScope or ASAP XML) cannot be used."""


class GeometryError(SlidestreamError, ValueError):
    """A geometry about to be written is invalid (QuPath would reject the whole file)."""


class WeightsError(SlidestreamError, ValueError):
    """A weights file is missing, corrupt or does not fit its model."""


class ClusterError(SlidestreamError, ConnectionError):
    """A Dask cluster cannot be reached or used (scheduler, workers, shared storage, models)."""


class DatabaseError(SlidestreamError):
    """The statistics database cannot be reached or written."""


class SchemaVersionError(DatabaseError):
    """The database schema is not at the revision this software needs."""


class Interrupted(KeyboardInterrupt):
    """A batch was stopped by a signal (Ctrl-C: ``SIGINT``, or ``SIGTERM``).

    A ``KeyboardInterrupt`` (not a :class:`SlidestreamError`): it stops the batch, not one
    slide. The CLI turns it into one line and exit code ``128 + signum``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
