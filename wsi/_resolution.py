"""The µm/px resolution chain: explicit value > OpenSlide mpp > TIFF resolution tags > error.

µm/px is never guessed from the objective power: a wrong physical scale silently corrupts every
measurement downstream, so a slide without a trustworthy resolution is an error that names the fix
(``--mpp``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

from slidestream.errors import ConfigError, MissingResolutionError

__all__ = ["check_mpp", "mpp_from_properties", "mpp_from_tiff_resolution", "resolve_mpp"]

logger = logging.getLogger(__name__)

#: µm per resolution unit, keyed by the TIFF ResolutionUnit value (2 inch, 3 centimetre) and by
#: the names OpenSlide writes into ``tiff.ResolutionUnit``.
_UM_PER_UNIT: dict[int | str, float] = {
    2: 25_400.0,
    3: 10_000.0,
    "inch": 25_400.0,
    "centimeter": 10_000.0,
    "centimetre": 10_000.0,
}


def check_mpp(mpp: float, *, what: str = "mpp") -> float:
    """Return ``mpp`` as float after checking it is finite and positive.

    Parameters
    ----------
    mpp
        Resolution in µm/px.
    what
        Name used in the error message.

    Raises
    ------
    ConfigError
        If the value is not a finite positive number.
    """
    value = float(mpp)
    if not math.isfinite(value) or value <= 0.0:
        raise ConfigError(f"{what}={mpp!r} is not a positive µm/px value; pass e.g. --mpp 0.25")
    return value


def _positive(value: str | float | None) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0.0 else None


def mpp_from_properties(properties: Mapping[str, str]) -> tuple[float, float] | None:
    """µm/px from OpenSlide's ``openslide.mpp-x``/``-y`` properties, or None.

    A missing axis takes the value of the other one.
    """
    mpp_x = _positive(properties.get("openslide.mpp-x"))
    mpp_y = _positive(properties.get("openslide.mpp-y"))
    if mpp_x is None and mpp_y is None:
        return None
    return (mpp_x or mpp_y or 0.0), (mpp_y or mpp_x or 0.0)


def mpp_from_tiff_resolution(
    x_resolution: float | None, y_resolution: float | None, unit: int | str | None
) -> tuple[float, float] | None:
    """µm/px from TIFF XResolution/YResolution (px per unit) and a real ResolutionUnit.

    Parameters
    ----------
    x_resolution, y_resolution
        Pixels per resolution unit.
    unit
        TIFF ResolutionUnit: 2/"inch" or 3/"centimeter". Unit 1/"none" (aspect ratio only) or
        anything else gives None.

    Returns
    -------
    tuple of float or None
        ``(mpp_x, mpp_y)`` in µm/px.
    """
    key: int | str | None = unit.lower() if isinstance(unit, str) else unit
    if key is None or key not in _UM_PER_UNIT:
        return None
    um_per_unit = _UM_PER_UNIT[key]
    res_x = _positive(x_resolution)
    res_y = _positive(y_resolution)
    if res_x is None and res_y is None:
        return None
    res_x = res_x or res_y
    res_y = res_y or res_x
    if res_x is None or res_y is None:  # pragma: no cover - narrowed above
        return None
    return um_per_unit / res_x, um_per_unit / res_y


def resolve_mpp(
    path: Path,
    *,
    explicit: float | None,
    candidates: tuple[tuple[str, tuple[float, float] | None], ...],
    required: bool = True,
) -> tuple[float, float] | None:
    """Apply the resolution chain and return ``(mpp_x, mpp_y)`` in µm/px at level 0.

    Parameters
    ----------
    path
        The slide, for the error message.
    explicit
        The caller's ``mpp`` (wins when given).
    candidates
        ``(source name, value or None)`` in priority order, e.g. OpenSlide properties, then TIFF
        resolution tags.
    required
        Raise when no source has a value (else return ``None``: µm/px unknown).

    Raises
    ------
    MissingResolutionError
        If no source has a value.
    ConfigError
        If ``explicit`` is not a positive number.
    """
    if explicit is not None:
        value = check_mpp(explicit)
        return value, value
    for source, found in candidates:
        if found is not None:
            logger.debug("%s: µm/px %.6g x %.6g from %s", path.name, found[0], found[1], source)
            return found
    if not required:
        return None
    raise MissingResolutionError(
        f"{path.name}: slide has no µm/px (no openslide.mpp-x, no TIFF resolution unit); "
        "pass --mpp 0.25 (or open_slide(..., mpp=0.25)) with the scanner's real value"
    )
