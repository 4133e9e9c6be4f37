"""Per-nucleus measurements from an instance map, the RGB image and its µm/px (vectorised)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from slidestream.errors import ConfigError

__all__ = ["MEASUREMENT_KEYS", "measure_nuclei"]

MEASUREMENT_KEYS: tuple[str, ...] = (
    "label",
    "centroid_x",
    "centroid_y",
    "bbox_x0",
    "bbox_y0",
    "bbox_x1",
    "bbox_y1",
    "area_um2",
    "perimeter_um",
    "equivalent_diameter_um",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "solidity",
    "circularity",
    "mean_r",
    "mean_g",
    "mean_b",
    "hematoxylin_od",
    "eosin_od",
)
"""Keys of :func:`measure_nuclei`, in order."""


_RGB2HED_TO_OD10 = 6.0
"""Factor from scikit-image's ``rgb2hed`` output to decadic optical density."""


def measure_nuclei(
    labels: npt.NDArray[np.integer[Any]], rgb: npt.NDArray[np.uint8], mpp: float
) -> dict[str, npt.NDArray[Any]]:
    """Measure every nucleus of an instance map.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Instance ids (0 background), same pixel frame as ``rgb``.
    rgb : ndarray, uint8, shape (H, W, 3)
        The image.
    mpp : float
        µm per pixel of both arrays.

    Returns
    -------
    dict of str to ndarray, each of shape (n,)
        One entry per key of :data:`MEASUREMENT_KEYS`, aligned by position and sorted by
        ``label``. ``centroid_x/y`` (float) and ``bbox_x0, bbox_y0, bbox_x1, bbox_y1`` (int,
        half-open ``[x0, x1)``) are in pixels of the image frame; lengths in µm, areas in µm²;
        ``eccentricity`` and ``solidity`` in [0, 1]; ``circularity`` = 4πA/P²;
        ``mean_r/g/b`` in 0..255; ``hematoxylin_od`` and ``eosin_od`` are the mean stain
        optical densities (decadic, OD = -log10(I / I0)) from Ruifrok-Johnston colour
        deconvolution (scikit-image ``rgb2hed``, whose output is OD / 6, rescaled here).

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((20, 20), np.int32); lab[5:15, 5:15] = 7
    >>> m = measure_nuclei(lab, np.full((20, 20, 3), 128, np.uint8), 0.5)
    >>> float(m["area_um2"][0]), int(m["label"][0])
    (25.0, 7)
    """
    if labels.ndim != 2 or rgb.shape[:2] != labels.shape or rgb.ndim != 3:
        raise ConfigError(f"labels {labels.shape} / rgb {rgb.shape}: expected (H, W) and (H, W, 3)")
    if not mpp > 0:
        raise ConfigError(f"mpp={mpp}: expected > 0 µm/px")
    from skimage.color import rgb2hed
    from skimage.measure import regionprops_table

    lab = labels.astype(np.int32, copy=False)
    props = regionprops_table(  # type: ignore[no-untyped-call]
        lab,
        properties=(
            "label",
            "centroid",
            "bbox",
            "area",
            "perimeter",
            "axis_major_length",
            "axis_minor_length",
            "eccentricity",
            "solidity",
        ),
    )
    ids = np.asarray(props["label"], np.int64)
    area_px = np.asarray(props["area"], np.float64)
    perim_px = np.asarray(props["perimeter"], np.float64)
    out: dict[str, npt.NDArray[Any]] = {
        "label": ids,
        "centroid_x": np.asarray(props["centroid-1"], np.float64),
        "centroid_y": np.asarray(props["centroid-0"], np.float64),
        "bbox_x0": np.asarray(props["bbox-1"], np.int64),
        "bbox_y0": np.asarray(props["bbox-0"], np.int64),
        "bbox_x1": np.asarray(props["bbox-3"], np.int64),
        "bbox_y1": np.asarray(props["bbox-2"], np.int64),
        "area_um2": area_px * mpp**2,
        "perimeter_um": perim_px * mpp,
        "equivalent_diameter_um": np.sqrt(4.0 * area_px / np.pi) * mpp,
        "major_axis_um": np.asarray(props["axis_major_length"], np.float64) * mpp,
        "minor_axis_um": np.asarray(props["axis_minor_length"], np.float64) * mpp,
        "eccentricity": np.asarray(props["eccentricity"], np.float64),
        "solidity": np.asarray(props["solidity"], np.float64),
        "circularity": np.where(
            perim_px > 0, 4.0 * np.pi * area_px / np.maximum(perim_px, 1e-9) ** 2, 0.0
        ),
    }
    if ids.size == 0:
        for key in ("mean_r", "mean_g", "mean_b", "hematoxylin_od", "eosin_od"):
            out[key] = np.zeros(0, np.float64)
        return out
    # rgb2hed divides by -log(1e-6) (natural log) instead of ln(10): its values are OD10 / 6.
    hed = rgb2hed(rgb) * _RGB2HED_TO_OD10
    index = ids
    for key, channel in (
        ("mean_r", rgb[..., 0]),
        ("mean_g", rgb[..., 1]),
        ("mean_b", rgb[..., 2]),
        ("hematoxylin_od", hed[..., 0]),
        ("eosin_od", hed[..., 1]),
    ):
        out[key] = np.asarray(ndi.mean(channel.astype(np.float64), lab, index=index), np.float64)
    return out
