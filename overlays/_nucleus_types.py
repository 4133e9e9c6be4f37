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

A model fine-tuned on the user's annotations (``slidestream train nuclei-types``) has the user's
own class names: they are written verbatim as the classification, in the colours the annotation
file gave them (:func:`nucleus_type_colors`), else in a fixed palette by position.

Type probabilities are written as numeric measurements named ``Type probability: <Class>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

__all__ = [
    "NUCLEUS_TYPE_CLASSES",
    "NUCLEUS_TYPE_COLORS",
    "nucleus_type_colors",
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

_PALETTE: Final[tuple[tuple[int, int, int], ...]] = (
    (220, 50, 50),
    (40, 110, 255),
    (40, 170, 60),
    (255, 190, 0),
    (150, 60, 200),
    (0, 190, 190),
    (240, 110, 20),
    (200, 60, 150),
    (120, 90, 40),
    (90, 90, 90),
)
"""Colours of types the model gives none for, by position (then repeating)."""


def type_classification(type_name: str) -> str:
    """QuPath classification of a nucleus type (``"epithelial"`` -> ``"Epithelial"``).

    Examples
    --------
    >>> type_classification("inflammatory")
    'Inflammatory'
    """
    return NUCLEUS_TYPE_CLASSES.get(type_name, type_name)


def nucleus_type_colors(
    type_names: Sequence[str], given: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, int, int]]:
    """QuPath classification -> RGB colour of each of a model's nucleus types.

    Parameters
    ----------
    type_names : sequence of str
        The model's type names, in channel order.
    given : mapping of str to (r, g, b), optional
        Colours the model carries (from the user's annotation file), by type name.

    Returns
    -------
    dict of str to (int, int, int)
        A given colour first, else the fixed colour of a shipped type name, else the palette
        colour of the type's position.

    Examples
    --------
    >>> nucleus_type_colors(["inflammatory", "Tumor"], {"Tumor": (200, 0, 0)})
    {'Inflammatory': (40, 110, 255), 'Tumor': (200, 0, 0)}
    """
    out: dict[str, tuple[int, int, int]] = {}
    for i, name in enumerate(type_names):
        q = type_classification(name)
        colour = (given or {}).get(name)
        if colour is not None:
            r, g, b = (int(c) for c in colour)
            out[q] = (r, g, b)
        else:
            out[q] = NUCLEUS_TYPE_COLORS.get(q, _PALETTE[i % len(_PALETTE)])
    return out


def type_probability_key(type_name: str) -> str:
    """Measurement key of a type's probability (``p_<type>``, as the parquet column).

    Examples
    --------
    >>> type_probability_key("spindle")
    'p_spindle'
    """
    return f"p_{type_name}"
