"""Tissue classification: patch classifiers with a WSInfer-compatible declarative spec.

Public API: :func:`load_tissue_model` -> :class:`PatchClassifier` (``.spec``,
``.predict_proba(uint8 (N, 3, H, W)) -> (N, K)``), :func:`classify_image` (whole or tiled image
-> class probabilities), :func:`train_tissue`, :func:`cross_validate_tissue`,
:func:`evaluate_tissue`, training and CV on patches of annotated slides
(:func:`train_on_slides`, :func:`cross_validate_slides`) and area-weighted whole-slide metrics
(:func:`region_confusion`, :class:`RegionReport`), the fast device-side trainer (:func:`fit_fast`,
:func:`upload_images`, :func:`augment_batch`), the :class:`ModelSpec` reader/writer and the
model registry.
"""

from __future__ import annotations

from ._combine import combine_models
from ._data import LUNG_CLASS_MAP, TissueDataset, discover_dataset
from ._ensemble import ENSEMBLE_ARCHITECTURE, TissueEnsemble
from ._fast_train import FastTrainConfig, fit_fast
from ._gpu_augment import AugmentConfig, DeviceImages, augment_batch, upload_images
from ._metrics import ClassificationReport, classification_report, evaluate_tissue
from ._network import ARCHITECTURE, TissueNet
from ._region_metrics import RegionReport, region_confusion, region_report
from ._registry import (
    DEFAULT_TISSUE_MODEL,
    TissueModelInfo,
    list_tissue_models,
    load_tissue_model,
    register_tissue_model,
)
from ._runner import PatchClassifier, classify_image, image_patches, load_model_dir
from ._slide_train import (
    SlidePatches,
    SlideTrainResult,
    config_from_init,
    cross_validate_slides,
    normalise_slides,
    train_on_slides,
)
from ._spec import ModelSpec, TransformStep, read_spec, write_spec
from ._train import (
    CVResult,
    DataSource,
    OutOfFold,
    TrainConfig,
    TrainResult,
    cross_validate_tissue,
    out_of_fold_probabilities,
    train_tissue,
)

__all__ = [
    "ARCHITECTURE",
    "DEFAULT_TISSUE_MODEL",
    "ENSEMBLE_ARCHITECTURE",
    "LUNG_CLASS_MAP",
    "AugmentConfig",
    "CVResult",
    "ClassificationReport",
    "DataSource",
    "DeviceImages",
    "FastTrainConfig",
    "ModelSpec",
    "OutOfFold",
    "PatchClassifier",
    "RegionReport",
    "SlidePatches",
    "SlideTrainResult",
    "TissueDataset",
    "TissueEnsemble",
    "TissueModelInfo",
    "TissueNet",
    "TrainConfig",
    "TrainResult",
    "TransformStep",
    "augment_batch",
    "classification_report",
    "classify_image",
    "combine_models",
    "config_from_init",
    "cross_validate_slides",
    "cross_validate_tissue",
    "discover_dataset",
    "evaluate_tissue",
    "fit_fast",
    "image_patches",
    "list_tissue_models",
    "load_model_dir",
    "load_tissue_model",
    "normalise_slides",
    "out_of_fold_probabilities",
    "read_spec",
    "region_confusion",
    "region_report",
    "register_tissue_model",
    "train_on_slides",
    "train_tissue",
    "upload_images",
    "write_spec",
]
