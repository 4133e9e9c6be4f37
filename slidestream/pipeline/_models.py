"""The models of a run: loaded once per batch (per Dask worker), described by Protocols.

Also decides how many tile-reading and post-processing processes a run uses on this machine.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from slidestream._device import resolve_device
from slidestream.config import RunConfig
from slidestream.summary import ModelRecord

__all__ = [
    "LoadedModels",
    "NucleusModelLike",
    "TissueModelLike",
    "load_models",
    "worker_counts",
]

logger = logging.getLogger(__name__)

PostprocessFn = Callable[[npt.NDArray[Any]], npt.NDArray[np.int32]]
"""Model maps of one tile (C, H, W) -> instance labels (H*u, W*u); picklable."""


class NucleusModelLike(Protocol):
    """What the pipeline needs of a nucleus model (``slidestream.models.NucleusModel``)."""

    name: str
    mpp: float
    """Working µm/px."""
    weights_sha256: str

    @property
    def type_names(self) -> tuple[str, ...]:
        """Nucleus types of the type head, in channel order (empty: no type head)."""
        ...

    @property
    def postprocess_config(self) -> Any:
        """Post-processing thresholds (with ``to_dict()``), or ``None``."""
        ...

    def predict(self, batch: Any) -> npt.NDArray[Any]:
        """uint8 tiles (N, 3, H, W) -> maps (N, C, H, W) on the CPU."""
        ...

    def postprocess_for(self, input_mpp: float) -> PostprocessFn:
        """The post-processing function for slides of ``input_mpp`` µm/px."""
        ...


class TissueSpecLike(Protocol):
    """The parts of a tissue model's spec the pipeline reads."""

    class_names: Sequence[str]
    colors: Sequence[tuple[int, int, int]]
    spacing_um_px: float
    patch_size_pixels: int


class TissueModelLike(Protocol):
    """What the pipeline needs of a tissue classifier (``slidestream.models.PatchClassifier``)."""

    name: str
    weights_sha256: str
    spec: Any
    """A :class:`TissueSpecLike` (``ModelSpec``)."""

    @property
    def stain_reference(self) -> Any:
        """The stain-normalisation reference, or ``None``."""
        ...

    def stain_gains(self, patches: Any) -> Any:
        """One pair of H and E gains for ``patches`` (uint8 (P, 3, S, S)), or ``None``."""
        ...

    def predict_proba(self, batch: Any, *, stain_gains: Any = None) -> npt.NDArray[np.float32]:
        """uint8 patches (N, 3, S, S) -> class probabilities (N, K)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedModels:
    """The models of a run, loaded once for the whole batch."""

    nuclei: Any
    """The nucleus model (a :class:`NucleusModelLike`)."""
    tissue: Any
    """The tissue classifier (a :class:`TissueModelLike`)."""
    device: str
    """Torch device string the models run on."""

    def hashes(self) -> dict[str, str]:
        """Model name -> weights sha256 (and the nucleus post-processing), for the parameters hash.

        A preset's post-processing thresholds can change while its weights stay the same, so
        they are part of what makes a stored result current.
        """
        out = {
            "nuclei": str(self.nuclei.weights_sha256),
            "tissue": str(self.tissue.weights_sha256),
        }
        if self.nuclei.postprocess_config is not None:
            pp = self.nuclei.postprocess_config.to_dict()
            out["nuclei_postprocess"] = json.dumps(pp, sort_keys=True)
        return out

    def type_colors(self) -> dict[str, tuple[int, int, int]]:
        """QuPath type classification -> colour of the nucleus model's types (the colours the
        model carries, else :func:`slidestream.overlays.nucleus_type_colors`' defaults)."""
        from slidestream.overlays import nucleus_type_colors

        given = getattr(self.nuclei, "type_colors", None)
        return nucleus_type_colors(tuple(self.nuclei.type_names), given)

    def records(self) -> dict[str, ModelRecord]:
        """The ``provenance.models`` block of ``summary.json`` (and of every outcome)."""
        pp = self.nuclei.postprocess_config
        details: dict[str, Any] = {
            "postprocess": None if pp is None else pp.to_dict(),
            "types": list(self.nuclei.type_names),
        }
        if getattr(self.nuclei, "type_colors", None):
            from slidestream.overlays import type_classification

            colours = self.type_colors()
            details["type_colors"] = {
                t: list(colours[type_classification(t)]) for t in self.nuclei.type_names
            }
        return {
            "nuclei": ModelRecord(
                name=str(self.nuclei.name),
                sha256=str(self.nuclei.weights_sha256),
                mpp=float(self.nuclei.mpp),
                details=details,
            ),
            "tissue": ModelRecord(
                name=str(self.tissue.name),
                sha256=str(self.tissue.weights_sha256),
                mpp=float(self.tissue.spec.spacing_um_px),
                details={"classes": list(self.tissue.spec.class_names)},
            ),
        }


class _ClassicalAsModel:
    """Adapts the no-weights classical segmenter to the batched model interface.

    ``predict`` passes the RGB tiles through as the "maps" (channels-last uint8) and
    ``postprocess`` segments one of them, so the classical path streams, stitches and writes
    exactly like the trained model. It has no thresholds to record and never refines.
    """

    postprocess_config = None
    type_names: tuple[str, ...] = ()

    def __init__(self, segmenter: Any) -> None:
        self.segmenter = segmenter
        self.name = str(segmenter.name)
        self.mpp = float(segmenter.mpp)
        self.weights_sha256 = "classical"
        self.postprocess: PostprocessFn = segmenter.segment_working

    def predict(self, batch: Any) -> npt.NDArray[np.uint8]:
        return np.ascontiguousarray(batch.permute(0, 2, 3, 1).cpu().numpy())

    def postprocess_for(self, input_mpp: float) -> PostprocessFn:
        """The same segmentation at any input µm/px."""
        return self.postprocess


def load_models(config: RunConfig) -> LoadedModels:
    """Load the nucleus and tissue models of ``config`` onto its device."""
    from slidestream.models import load_nuclei_model, load_tissue_model

    from ._signals import sigint_ignored
    from .stream import can_start_processes, preload_forkserver

    if can_start_processes():  # (a daemonic Dask worker reads with threads)
        with sigint_ignored():  # the fork server and the readers forked from it ignore Ctrl-C
            preload_forkserver()  # boots the readers' fork server while the models load
    device = resolve_device(config.device)
    nuclei: Any = load_nuclei_model(config.nuclei_model, device=device)
    if not hasattr(nuclei, "predict"):
        nuclei = _ClassicalAsModel(nuclei)
    return LoadedModels(
        nuclei=nuclei,
        tissue=load_tissue_model(config.tissue_model, device=device),
        device=device,
    )


def cpu_count() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Up to this many CPU cores, an fp32 CPU run post-processes nucleus tiles in the main process.
_INLINE_POSTPROCESS_MAX_CPUS = 2


def is_fp32_cpu_model(models: LoadedModels) -> bool:
    """Whether the nucleus model is a torch network computing in fp32 on the CPU."""
    return (
        models.device == "cpu"
        and getattr(models.nuclei, "net", None) is not None
        and getattr(models.nuclei, "precision", None) == "fp32"
    )


def worker_counts(
    config: RunConfig, models: LoadedModels, *, cpus: int | None = None
) -> tuple[int, int]:
    """(tile-reading workers, post-processing workers) for this machine and ``models``.

    A nucleus network computing in fp32 on <= 2 CPU cores (:func:`is_fp32_cpu_model`) gets its
    post-processing in the main process (0 workers). ``cpus`` defaults to :func:`cpu_count`.
    """
    cpus = cpu_count() if cpus is None else cpus
    readers = (
        config.workers if config.workers is not None else (1 if cpus <= 4 else min(4, cpus // 4))
    )
    if config.postprocess_workers is not None:
        post = config.postprocess_workers
    elif models.device.startswith("cuda"):
        post = max(1, cpus - readers - 1)
    elif is_fp32_cpu_model(models) and cpus <= _INLINE_POSTPROCESS_MAX_CPUS:
        # The model's fp32 torch threads already use every core; a post-processing process
        # beside them only steals cycles from (spinning) OpenMP threads: on a 2-core AVX2 CPU the
        # nucleus pass took 9.2-11.3 s inline vs 11.5-17.4 s with one worker (8 alternated pairs).
        # Not applied to bf16 networks (there post-processing costs as much as the model, so the
        # overlap should pay; inline was not measured on such a CPU) nor to the classical model
        # (no torch threads).
        post = 0
    else:
        post = max(1, cpus // 2)
    return readers, post


def model_records_json(records: Mapping[str, ModelRecord]) -> dict[str, dict[str, Any]]:
    """Model records as the plain ``{role: {name, sha256, mpp}}`` the database stores."""
    return {r: {"name": m.name, "sha256": m.sha256, "mpp": m.mpp} for r, m in records.items()}
