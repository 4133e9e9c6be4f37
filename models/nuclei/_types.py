"""Nucleus types per instance: the mean of the type head's pixel probabilities over each nucleus.

HoVer-Net types an instance by the majority of its pixels' types; the mean probability is the
soft version of that vote and also gives each nucleus a probability per type (what QuPath
measurements and the slide statistics need).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from slidestream.errors import ConfigError

__all__ = ["InstanceTypes", "instance_types"]


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceTypes:
    """Types of the instances ``1..n`` of a label map.

    Attributes
    ----------
    names : tuple of str
        Type names, in column order of :attr:`probabilities`.
    ids : ndarray, int32, shape (n,)
        Instance ids (label values), ascending.
    index : ndarray, int8, shape (n,)
        Index into :attr:`names` of each instance's type (argmax of its probabilities).
    probabilities : ndarray, float32, shape (n, len(names))
        Mean type probability over each instance's pixels (rows sum to 1).
    """

    names: tuple[str, ...]
    ids: npt.NDArray[np.int32]
    index: npt.NDArray[np.int8]
    probabilities: npt.NDArray[np.float32]

    def type_of(self) -> list[str]:
        """Type name of each instance, in :attr:`ids` order."""
        return [self.names[int(i)] for i in self.index]


def instance_types(
    labels: npt.NDArray[np.integer[Any]],
    type_probs: npt.NDArray[np.floating[Any]],
    names: tuple[str, ...],
) -> InstanceTypes:
    """Type every instance of ``labels`` from per-pixel type probabilities.

    Parameters
    ----------
    labels : ndarray of int, shape (H * u, W * u)
        Instance ids (0 background), in the frame of ``type_probs`` or ``u`` (integer) times
        finer (a refined watershed); each label pixel takes the probabilities of the map pixel it
        lies in.
    type_probs : ndarray of float, shape (T, H, W)
        Per-pixel type probabilities (softmax over ``T = len(names)``).
    names : tuple of str
        Type names.

    Returns
    -------
    InstanceTypes
        One row per instance id present in ``labels``.

    Examples
    --------
    >>> import numpy as np
    >>> labels = np.array([[1, 1, 0, 2]], np.int32)
    >>> probs = np.array([[[0.9, 0.7, 0.5, 0.2]], [[0.1, 0.3, 0.5, 0.8]]], np.float32)
    >>> t = instance_types(labels, probs, ("a", "b"))
    >>> t.type_of(), t.probabilities.round(2).tolist()
    (['a', 'b'], [[0.8, 0.2], [0.2, 0.8]])
    """
    if type_probs.ndim != 3 or type_probs.shape[0] != len(names):
        raise ConfigError(
            f"type maps of shape {type_probs.shape}: expected ({len(names)}, H, W) probabilities"
        )
    h, w = type_probs.shape[1:]
    if labels.shape[0] % h or labels.shape[1] % w or labels.shape[0] // h != labels.shape[1] // w:
        raise ConfigError(
            f"labels {labels.shape} and type maps {type_probs.shape[1:]}: expected the same "
            "frame or an integer refinement of it"
        )
    u = labels.shape[0] // h
    lab = np.asarray(labels, np.int64)
    if u > 1:
        # Each map pixel's u x u block of labels: count label pixels per (instance, map pixel).
        lab = lab.reshape(h, u, w, u).transpose(0, 2, 1, 3).reshape(h * w, u * u)
        pix = np.repeat(np.arange(h * w), u * u)
        lab = lab.ravel()
    else:
        lab = lab.ravel()
        pix = np.arange(h * w)
    fg = lab > 0
    lab, pix = lab[fg], pix[fg]
    ids = np.unique(lab)
    if ids.size == 0:
        return InstanceTypes(
            names=names,
            ids=np.zeros(0, np.int32),
            index=np.zeros(0, np.int8),
            probabilities=np.zeros((0, len(names)), np.float32),
        )
    compact = np.searchsorted(ids, lab)
    counts = np.bincount(compact, minlength=ids.size).astype(np.float64)
    flat = np.asarray(type_probs, np.float64).reshape(len(names), h * w)
    probs = (
        np.stack(
            [
                np.bincount(compact, weights=flat[t][pix], minlength=ids.size)
                for t in range(len(names))
            ],
            axis=1,
        )
        / np.maximum(counts, 1.0)[:, None]
    )
    probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    return InstanceTypes(
        names=names,
        ids=ids.astype(np.int32),
        index=probs.argmax(axis=1).astype(np.int8),
        probabilities=probs.astype(np.float32),
    )
