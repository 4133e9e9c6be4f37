"""slidestream.models (being built)."""

# tissue classification (issue #4)
from slidestream.models.tissue import (
    ModelSpec,
    PatchClassifier,
    classify_image,
    list_tissue_models,
    load_tissue_model,
)

__all__ = [
    "ModelSpec",
    "PatchClassifier",
    "classify_image",
    "list_tissue_models",
    "load_tissue_model",
]
