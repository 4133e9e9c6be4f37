"""Whole-slide analysis: the stages one slide flows through, shared by local and Dask runs.

A slide flows through, in order:

1. **plan** (:mod:`.plan`): open it, fingerprint it, choose its output folder (never shared by
   two slides), decide whether its stored results are up to date;
2. **read** (:mod:`.stream`): the tissue mask, then tile grids at each model's resolution,
   streamed in batches by DataLoader workers;
3. **inference** (:mod:`.inference`): the tissue classifier's pass, then the nucleus model's
   pass with post-processing in a process pool;
4. **stitching** (:mod:`.stitching`): class regions clipped to the tissue, per-class areas,
   nuclei classified and counted as they stream by;
5. **writing / publishing** (:mod:`.write`): outputs staged, ``summary.json``
   (:mod:`slidestream.summary`) written last, then moved into place;
6. **recording** (:mod:`.record`): the one :class:`Recorder` turns each
   :class:`SlideOutcome` into database rows, ``failures.csv`` and the console summary.

Each stage takes and returns typed values (:class:`SlidePlan`, :class:`TileStream`,
:class:`TissuePass`, :class:`ClassifiedNuclei`, :class:`~slidestream.summary.Summary`,
:class:`SlideOutcome`). This package is the only place the subpackages meet.
"""

from ._execution import Execution, WorkerKind, plan_execution, postprocess_executor
from ._models import (
    LoadedModels,
    NucleusModelLike,
    TissueModelLike,
    cpu_count,
    is_fp32_cpu_model,
    load_models,
    worker_counts,
)
from ._signals import terminate_children
from .claim import LockOwner, SlideClaim, claim_folder, lock_path
from .inference import (
    TissuePass,
    nucleus_tile_result,
    postprocess_pool,
    process_nucleus_tile,
    submit_nucleus_tile,
)
from .outcome import OutcomeStatus, SkipReason, SlideOutcome
from .plan import SlidePlan, output_folder, read_summary, shared_names
from .record import (
    FAILURE_COLUMNS,
    FAILURES_NAME,
    Recorder,
    SyncReport,
    merge_failures,
    sync_results,
)
from .run import analyse_guarded, analyse_slide, run_batch, stop_workers
from .stitching import ClassifiedNuclei
from .stream import TileStream

__all__ = [
    "FAILURES_NAME",
    "FAILURE_COLUMNS",
    "ClassifiedNuclei",
    "Execution",
    "LoadedModels",
    "LockOwner",
    "NucleusModelLike",
    "OutcomeStatus",
    "Recorder",
    "SkipReason",
    "SlideClaim",
    "SlideOutcome",
    "SlidePlan",
    "SyncReport",
    "TileStream",
    "TissueModelLike",
    "TissuePass",
    "WorkerKind",
    "analyse_guarded",
    "analyse_slide",
    "claim_folder",
    "cpu_count",
    "is_fp32_cpu_model",
    "load_models",
    "lock_path",
    "merge_failures",
    "nucleus_tile_result",
    "output_folder",
    "plan_execution",
    "postprocess_executor",
    "postprocess_pool",
    "process_nucleus_tile",
    "read_summary",
    "run_batch",
    "shared_names",
    "stop_workers",
    "submit_nucleus_tile",
    "sync_results",
    "terminate_children",
    "worker_counts",
]
