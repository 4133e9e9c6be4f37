"""``slidestream evaluate tissue --slides ... --annotations ...``: a tissue map against annotations.

The map is either computed here with exactly the tissue pass of ``slidestream run``
(tissue mask, patch grid at the model's µm/px, probabilities smoothed and vectorised, clipped
to the tissue mask: :func:`slide_tissue_map`), or read from a previous run's
``RESULTS/<slide>/tissue.geojson`` (``--results``). The annotated regions are read with the
annotation readers; :mod:`slidestream.models.tissue._region_metrics` does the area arithmetic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from slidestream.errors import ConfigError

__all__ = ["SlideEvaluation", "evaluate_tissue_on_annotations", "slide_tissue_map"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideEvaluation:
    """One slide's figures.

    Attributes
    ----------
    slide : str
    confusion_um2 : ndarray, float64, (K, K + 1)
    """

    slide: str
    confusion_um2: npt.NDArray[np.float64]


def slide_tissue_map(path: Path, model: Any, *, config: Any) -> tuple[dict[str, Any], float]:
    """The tissue-class polygons ``slidestream run`` writes to ``tissue.geojson`` for a slide.

    Parameters
    ----------
    path : Path
        The slide.
    model : PatchClassifier
        The tissue model (on its device).
    config : RunConfig
        Tissue-pass settings (mask µm/px, smoothing, minimum island area, µm/px override).

    Returns
    -------
    (class polygons in level-0 px, slide µm/px)
    """
    from slidestream.errors import NoTissueError
    from slidestream.pipeline import LoadedModels
    from slidestream.pipeline.inference import tissue_pass
    from slidestream.pipeline.stitching import clip_to_tissue
    from slidestream.tiling import detect_tissue
    from slidestream.wsi import open_slide

    models = LoadedModels(nuclei=None, tissue=model, device=str(model.device))
    with open_slide(path, mpp=config.mpp_override) as slide:
        mask = detect_tissue(
            slide, mask_mpp=config.tissue_mask_mpp, min_tissue_area_um2=config.min_tissue_area_um2
        )
        if not mask.mask.any():
            raise NoTissueError(f"{path}: no tissue detected; check the slide")
        regions = tissue_pass(slide, mask, models, config, 1).regions
        return clip_to_tissue(regions.polygons(), mask), float(slide.mpp)


def evaluate_tissue_on_annotations(
    pairs: Sequence[tuple[Path, Path]],
    *,
    class_names: Sequence[str],
    model: Any = None,
    results_dir: Path | None = None,
    class_map: Mapping[str, str] | None = None,
    config: Any,
) -> list[SlideEvaluation]:
    """Area confusion of each slide's tissue map against its annotated regions.

    Parameters
    ----------
    pairs : sequence of (slide, annotation file)
    class_names : sequence of str
        The model's classes (rows / columns).
    model : PatchClassifier, optional
        Computes the map (:func:`slide_tissue_map`); else ``results_dir`` must be given.
    results_dir : Path, optional
        Output folder of ``slidestream run``: ``<slide name>/tissue.geojson`` is the map.
    class_map : mapping, optional
        Annotation class -> model class.
    config : RunConfig
        Tissue-pass settings and the µm/px override.

    Returns
    -------
    list of SlideEvaluation
    """
    from slidestream.models.tissue import region_confusion
    from slidestream.tiling import read_annotations
    from slidestream.wsi import open_slide, slide_name

    if (model is None) == (results_dir is None):
        raise ConfigError("give either --model or --results (not both)")
    out = []
    for slide_path, ann_path in pairs:
        with open_slide(slide_path, mpp=config.mpp_override) as slide:
            dims, mpp = slide.dimensions, float(slide.mpp)
        annotated = read_annotations(ann_path, dimensions=dims, class_map=class_map).regions()
        if model is not None:
            predicted, _ = slide_tissue_map(slide_path, model, config=config)
        elif results_dir is not None:
            geo = results_dir / slide_name(slide_path) / "tissue.geojson"
            if not geo.is_file():
                raise ConfigError(
                    f"{geo}: no tissue.geojson for {slide_path.name}; run `slidestream run` on "
                    "the slide first or pass --model"
                )
            predicted = read_annotations(geo, dimensions=dims).regions()
        cm = region_confusion(annotated, predicted, class_names=class_names, mpp=mpp)
        out.append(SlideEvaluation(slide=slide_path.name, confusion_um2=cm))
    return out
