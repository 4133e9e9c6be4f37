"""Nucleus instance segmentation: network, post-processing, metrics, measurements, training.

Public API::

    load_nuclei_model(name_or_path="default", device="cpu") -> NucleusModel | ClassicalSegmenter
    list_nuclei_models() -> list[dict]
    NucleusModel.predict / .postprocess / .segment
    ClassicalSegmenter().segment(image, mpp)
    measure_nuclei(labels, rgb, mpp) -> dict[str, NDArray]
    score_instances(true, pred) -> NucleusScores  (AJI, PQ, DQ, SQ, F1@0.5, Dice)
    train_nuclei(data_dirs, out, config=TrainConfig(...)) -> TrainResult
"""

from __future__ import annotations

from slidestream.models.nuclei._classical import ClassicalSegmenter
from slidestream.models.nuclei._data import DataSource, make_targets, parse_data_arg
from slidestream.models.nuclei._measure import MEASUREMENT_KEYS, measure_nuclei
from slidestream.models.nuclei._metrics import NucleusScores, overlap_matrix, score_instances
from slidestream.models.nuclei._model import NucleusModel
from slidestream.models.nuclei._network import NetworkConfig, NucleusNet, build_network
from slidestream.models.nuclei._postprocess import PostprocessConfig, postprocess_maps
from slidestream.models.nuclei._registry import (
    SHIPPED_WEIGHTS,
    list_nuclei_models,
    load_nuclei_model,
)
from slidestream.models.nuclei._train import TrainConfig, TrainResult, train_nuclei
from slidestream.models.nuclei._types import InstanceTypes, instance_types

__all__ = [
    "MEASUREMENT_KEYS",
    "SHIPPED_WEIGHTS",
    "ClassicalSegmenter",
    "DataSource",
    "InstanceTypes",
    "NetworkConfig",
    "NucleusModel",
    "NucleusNet",
    "NucleusScores",
    "PostprocessConfig",
    "TrainConfig",
    "TrainResult",
    "build_network",
    "instance_types",
    "list_nuclei_models",
    "load_nuclei_model",
    "make_targets",
    "measure_nuclei",
    "overlap_matrix",
    "parse_data_arg",
    "postprocess_maps",
    "score_instances",
    "train_nuclei",
]
