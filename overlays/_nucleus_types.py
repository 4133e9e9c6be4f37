"""How nucleus types appear in QuPath: classification names, fixed colours, measurement names.

The type head's names (``other``, ``inflammatory``, ``epithelial``, ``spindle``) become QuPath
classifications with one fixed colour each, so that every slide and every image of a cohort
shows a type in the same colour:

============  ==============  ===============
type          classification  colour (R, G, B)
============  ==============  ===============
epithelial    Epithelial      (220, 50, 50)   red
inflammatory  Inflammatory    (40, 110, 255)  blue
spindle       Spindle         (40, 170, 60)   green
other         Other           (255, 190, 0)   amber
============  ==============  ===============

Type probabilities are written as numeric measurements named ``Type probability: <Class>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = [
    "NUCLEUS_TYPE_CLASSES",
    "NUCLEUS_TYPE_COLORS",
    "type_classification",
    "type_probability_key",
]

NUCLEUS_TYPE_CLASSES: Final[Mapping[str, str]] = {
    "other": "Other",
    "inflammatory": "Inflammatory",
    "epithelial": "Epithelial",
    "spindle": "Spindle",
}
"""Type name -> QuPath classification name."""

NUCLEUS_TYPE_COLORS: Final[Mapping[str, tuple[int, int, int]]] = {
    "Epithelial": (220, 50, 50),
    "Inflammatory": (40, 110, 255),
    "Spindle": (40, 170, 60),
    "Other": (255, 190, 0),
}
"""QuPath classification name -> fixed RGB colour."""


def type_classification(type_name: str) -> str:
    """QuPath classification of a nucleus type (``"epithelial"`` -> ``"Epithelial"``).

    Examples
    --------
    >>> type_classification("inflammatory")
    'Inflammatory'
    """
    return NUCLEUS_TYPE_CLASSES.get(type_name, type_name.capitalize())


def type_probability_key(type_name: str) -> str:
    """Measurement key of a type's probability (``p_<type>``, as the parquet column).

    Examples
    --------
    >>> type_probability_key("spindle")
    'p_spindle'
    """
    return f"p_{type_name}"
