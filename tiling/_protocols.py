"""The slide seam of :mod:`slidestream.tiling`.

Tiling only needs a handful of :class:`slidestream.wsi.Slide` members. They are described here as a
:class:`typing.Protocol`, so geometry and tissue detection can be tested with tiny in-memory fakes
and any reader with the same surface works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["SlideLike"]


@runtime_checkable
class SlideLike(Protocol):
    """What tiling reads from a slide (a subset of :class:`slidestream.wsi.Slide`).

    Coordinates are level-0 pixels ``(x, y)``, sizes ``(width, height)``; arrays are RGB uint8
    ``(H, W, 3)``. Reads outside the slide are padded with the slide's background colour.
    """

    @property
    def path(self) -> Path:
        """File the slide was opened from."""
        ...

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in px."""
        ...

    @property
    def mpp(self) -> float:
        """Level-0 resolution in µm/px (mean of x and y)."""
        ...

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of each pyramid level relative to level 0."""
        ...

    def best_level_for_mpp(self, mpp: float) -> int:
        """Coarsest level whose µm/px is not coarser than ``mpp``."""
        ...

    def read_region(
        self, location: tuple[int, int], size: tuple[int, int], *, level: int = 0
    ) -> npt.NDArray[np.uint8]:
        """Read ``size`` px at ``level`` from level-0 ``location``; RGB ``(h, w, 3)``."""
        ...

    def read_at_mpp(
        self, location: tuple[float, float], size: tuple[int, int], mpp: float
    ) -> npt.NDArray[np.uint8]:
        """Read ``size`` px at ``mpp`` µm/px from level-0 ``location``; RGB ``(h, w, 3)``."""
        ...
