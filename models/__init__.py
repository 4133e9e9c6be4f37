"""slidestream.models: nucleus segmentation and tissue classification (networks, weights,
inference, post-processing, measurements, metrics).

Upstream: :mod:`slidestream.tiling` (tile batches) and :mod:`slidestream.wsi`. Nucleus models:
:func:`load_nuclei_model` -> :class:`NucleusModel` (or the weight-free
:class:`ClassicalSegmenter`); tissue models: :func:`load_tissue_model` -> :class:`PatchClassifier`.
"""

# nucleus segmentation
from slidestream.models.nuclei import ClassicalSegmenter as ClassicalSegmenter
from slidestream.models.nuclei import NucleusModel as NucleusModel
from slidestream.models.nuclei import instance_types as instance_types
from slidestream.models.nuclei import list_nuclei_models as list_nuclei_models
from slidestream.models.nuclei import load_nuclei_model as load_nuclei_model
from slidestream.models.nuclei import measure_nuclei as measure_nuclei
from slidestream.models.nuclei import score_instances as score_instances
from slidestream.models.nuclei import train_nuclei as train_nuclei

__all__ = [
    "ClassicalSegmenter",
    "NucleusModel",
    "instance_types",
    "list_nuclei_models",
    "load_nuclei_model",
    "measure_nuclei",
    "score_instances",
    "train_nuclei",
]

# tissue classification
from slidestream.models.tissue import (
    ModelSpec,
    PatchClassifier,
    classify_image,
    list_tissue_models,
    load_tissue_model,
)

__all__ += [
    "ModelSpec",
    "PatchClassifier",
    "classify_image",
    "list_tissue_models",
    "load_tissue_model",
]
