"""The orchestration: one slide through the stages, and a batch of slides through one slide.

``plan`` (:mod:`.plan`) -> ``read`` (:mod:`.stream`) -> ``inference`` (:mod:`.inference`) ->
``stitching`` (:mod:`.stitching`) -> ``writing/publishing`` (:mod:`.write`) -> ``recording``
(:mod:`.record`). Progress bars are created here only.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slidestream.config import RunConfig
from slidestream.errors import SlidestreamError
from slidestream.inputs import discover_slides

from ._execution import Execution, plan_execution, postprocess_executor
from ._models import LoadedModels, load_models
from ._signals import sigint_ignored
from .claim import SlideClaim, claim_folder, lock_path
from .inference import nucleus_stream, nucleus_tables, tissue_pass
from .outcome import SlideOutcome
from .plan import SlidePlan, plan_slide, shared_names
from .record import Recorder
from .stitching import ClassifiedNuclei, class_areas_on_mask, clip_to_tissue
from .write import (
    build_summary,
    publish,
    staging_dir,
    write_nuclei,
    write_overlay,
    write_summary,
    write_tissue,
)

if TYPE_CHECKING:
    from slidestream.summary import Summary
    from slidestream.tiling import TissueMask
    from slidestream.wsi import Slide

__all__ = ["analyse_guarded", "analyse_slide", "run_batch", "stop_workers"]

logger = logging.getLogger(__name__)

#: Errors that fail one slide, not the batch (anything else is a bug or an interrupt).
_SLIDE_ERRORS = (SlidestreamError, OSError, ValueError, RuntimeError, MemoryError)


@dataclass(slots=True)
class _Identity:
    """What is known of a slide so far (filled in as soon as it is open)."""

    name: str
    fingerprint: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat()


def analyse_slide(
    path: Path,
    config: RunConfig,
    models: LoadedModels,
    *,
    pool: Executor | None = None,
    shared_name: bool = False,
    execution: Execution | None = None,
) -> SlideOutcome:
    """Analyse one slide and publish its outputs in its output folder.

    Parameters
    ----------
    path
        Slide file (or DICOM folder).
    config
        Run configuration.
    models
        Loaded models (see :func:`load_models`).
    pool
        Post-processing pool (processes or threads, see :func:`postprocess_executor`); ``None``
        post-processes in this thread.
    shared_name
        Another slide of the batch has the same name (see :func:`output_folder`).
    execution
        How tile reading and post-processing run here (default: :func:`plan_execution`).

    Returns
    -------
    SlideOutcome
        ``done``, or ``skipped`` (up to date, or no tissue); failures raise.

    Raises
    ------
    SlidestreamError
        Unreadable slide, missing µm/px, ...
    """
    from slidestream.wsi import slide_name

    execution = execution if execution is not None else plan_execution(config, models)
    ident = _Identity(slide_name(path))
    return _analyse(path, config, models, pool, shared_name, execution, ident)


def analyse_guarded(
    path: Path,
    config: RunConfig,
    models: LoadedModels,
    *,
    pool: Executor | None = None,
    shared_name: bool = False,
    execution: Execution | None = None,
) -> SlideOutcome:
    """:func:`analyse_slide`, with a failure turned into a ``failed`` outcome (one-line reason).

    Library errors (unreadable slide, no µm/px, ...) and I/O errors fail the slide, not the
    batch; the traceback goes to the debug log. The failed outcome carries the slide's
    fingerprint (of its bytes when it cannot be opened; ``None`` when the path does not exist)
    and the parameters hash of the loaded models, as a success would.
    """
    from slidestream.wsi import file_fingerprint, slide_name

    started_at, t0 = _now(), time.perf_counter()
    ident = _Identity(slide_name(path))
    execution = execution if execution is not None else plan_execution(config, models)
    try:
        return _analyse(path, config, models, pool, shared_name, execution, ident)
    except _SLIDE_ERRORS as exc:
        if isinstance(exc, SlidestreamError):
            logger.error("%s", exc)
            logger.debug("traceback of the failure", exc_info=True)
            reason = str(exc)
        else:
            logger.exception("%s: unexpected failure", path)
            reason = f"{path}: {type(exc).__name__}: {exc}"
        reason = " ".join(reason.split())  # one line
        error_class = type(exc).__name__
    fingerprint = ident.fingerprint
    if fingerprint is None and Path(path).exists():
        try:
            fingerprint = file_fingerprint(path)
        except OSError:
            fingerprint = None
    return SlideOutcome(
        path=path,
        slide_name=ident.name,
        status="failed",
        fingerprint=fingerprint,
        parameters_hash=config.parameters_hash(models.hashes()),
        models=models.records(),
        reason=reason,
        error_class=error_class,
        started_at=started_at,
        seconds=time.perf_counter() - t0,
    )


def _analyse(
    path: Path,
    config: RunConfig,
    models: LoadedModels,
    pool: Executor | None,
    shared_name: bool,
    execution: Execution,
    ident: _Identity,
) -> SlideOutcome:
    from slidestream.wsi import open_slide

    started_at, t_start = _now(), time.perf_counter()
    timings: dict[str, float] = {}
    with open_slide(path, mpp=config.mpp_override, require_mpp=False) as slide:
        ident.name, ident.fingerprint = slide.name, slide.fingerprint
        _ = slide.mpp  # MissingResolutionError (with the --mpp fix) when unknown
        plan = plan_slide(
            path, slide.name, slide.fingerprint, config, models, shared_name=shared_name
        )
        identity: dict[str, Any] = {
            "path": path,
            "slide_name": plan.name,
            "fingerprint": plan.fingerprint,
            "parameters_hash": plan.parameters_hash,
            "models": models.records(),
            "started_at": started_at,
        }
        if plan.up_to_date:
            return _up_to_date(plan, identity, t_start)
        claim = claim_folder(plan.output_dir)
        if not isinstance(claim, SlideClaim):
            reason = (
                f"{path}: being analysed by another run ({claim.describe()}); skipped. If no "
                f"run is active there, remove {lock_path(plan.output_dir)} and rerun"
            )
            logger.warning("%s", reason)
            return SlideOutcome(
                status="skipped",
                skip_reason="locked",
                reason=reason,
                seconds=time.perf_counter() - t_start,
                **identity,
            )
        with claim:
            # Planned again under the lock: another run may have published it meanwhile.
            plan = plan_slide(
                path, slide.name, slide.fingerprint, config, models, shared_name=shared_name
            )
            if plan.up_to_date:
                return _up_to_date(plan, identity, t_start)
            return _analyse_claimed(
                path, slide, plan, config, models, pool, execution, identity, timings,
                started_at, t_start,
            )  # fmt: skip


def _up_to_date(plan: SlidePlan, identity: dict[str, Any], t_start: float) -> SlideOutcome:
    logger.info("%s: results up to date, skipped (use --force to redo)", plan.path)
    return SlideOutcome(
        status="skipped",
        skip_reason="up_to_date",
        reason=f"results in {plan.output_dir} are up to date",
        output_dir=plan.output_dir,
        summary=plan.previous,
        seconds=time.perf_counter() - t_start,
        **identity,
    )


def _analyse_claimed(
    path: Path,
    slide: Slide,
    plan: SlidePlan,
    config: RunConfig,
    models: LoadedModels,
    pool: Executor | None,
    execution: Execution,
    identity: dict[str, Any],
    timings: dict[str, float],
    started_at: str,
    t_start: float,
) -> SlideOutcome:
    """The stages after planning, for a slide whose folder this run holds the lock of."""
    from slidestream.tiling import detect_tissue

    # plan -> read: tissue mask
    t0 = time.perf_counter()
    mask = detect_tissue(
        slide,
        mask_mpp=config.tissue_mask_mpp,
        min_tissue_area_um2=config.min_tissue_area_um2,
    )
    timings["tissue_detection"] = time.perf_counter() - t0
    if not mask.mask.any():
        reason = (
            f"{path}: no tissue detected (mask at {mask.mpp:.1f} µm/px is empty; pieces "
            f"under {config.min_tissue_area_um2:g} µm² are ignored); skipped as a QC result"
        )
        logger.warning("%s", reason)
        return SlideOutcome(
            status="skipped",
            skip_reason="no_tissue",
            reason=reason,
            seconds=time.perf_counter() - t_start,
            **identity,
        )
    stage = staging_dir(plan.output_dir)
    try:
        summary = _stage_outputs(
            path, slide, mask, plan, config, models, pool, stage, execution,
            timings, started_at, t_start,
        )  # fmt: skip
        publish(stage, plan.output_dir)
    finally:
        # A failed or interrupted slide leaves no staging folder behind.
        shutil.rmtree(stage, ignore_errors=True)
    return SlideOutcome(
        status="done",
        output_dir=plan.output_dir,
        summary=summary,
        seconds=time.perf_counter() - t_start,
        **identity,
    )


def _stage_outputs(
    path: Path,
    slide: Slide,
    mask: TissueMask,
    plan: SlidePlan,
    config: RunConfig,
    models: LoadedModels,
    pool: Executor | None,
    stage: Path,
    execution: Execution,
    timings: dict[str, float],
    started_at: str,
    t_start: float,
) -> Summary:
    """Every output of a slide into its staging folder, ``summary.json`` last."""
    readers, post_workers = execution.readers, execution.postprocess
    reader_kind = execution.kind  # (no readers: read in this thread either way)
    # read -> inference. The nucleus readers start now and read ahead during the tissue pass.
    nuclei_stream = nucleus_stream(slide, mask, models, config, readers, reader_kind=reader_kind)
    nuclei_stream.loader.start()
    t0 = time.perf_counter()
    tissue = tissue_pass(slide, mask, models, config, readers, reader_kind=reader_kind)
    class_area_mm2 = class_areas_on_mask(tissue.regions, mask, tissue.class_names)
    timings["tissue_classification"] = time.perf_counter() - t0
    # stitching + writing
    class_polygons = clip_to_tissue(tissue.regions.polygons(), mask)
    write_tissue(stage, slide, mask, class_polygons, tissue.class_colors)
    t0 = time.perf_counter()
    type_names = tuple(models.nuclei.type_names)
    type_colors = models.type_colors()
    nuclei = ClassifiedNuclei(tissue, type_names=type_names)
    tile_tables = nucleus_tables(
        slide,
        nuclei_stream,
        models,
        pool,
        max_pending=4 * max(1, post_workers),
        show_progress=config.show_progress,
        batch_size=config.batch_size,
    )
    n_written = write_nuclei(
        stage,
        slide,
        nuclei.stream(tile_tables),
        as_points=config.nuclei_as == "points",
        class_colors=tissue.class_colors,
        classify_by=config.nuclei_classification,
        type_colors=type_colors,
    )
    timings["nuclei"] = time.perf_counter() - t0
    if nuclei.truncated:
        logger.warning(
            "%s: %d nuclei touched a tile border (halo %.1f µm may be too small)",
            path,
            nuclei.truncated,
            config.nucleus_halo_um,
        )
    t0 = time.perf_counter()
    write_overlay(
        stage,
        slide,
        class_polygons,
        tissue.class_colors,
        nuclei.centroids,
        type_index=nuclei.type_index,
        type_names=type_names,
        overlay_type=config.overlay_type,
        type_colors=type_colors,
    )
    timings["overlay"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    statistics = nuclei.statistics(
        tissue_area_mm2=float(mask.tissue_area_mm2), class_area_mm2=class_area_mm2
    )
    if statistics.nucleus_count != n_written:
        raise SlidestreamError(
            f"{path}: internal error, {n_written} nuclei written but "
            f"{statistics.nucleus_count} measured; please report this"
        )
    summary = build_summary(
        plan=plan,
        slide=slide,
        statistics=statistics,
        models=models.records(),
        device=models.device,
        config=config,
        workers={"readers": readers, "postprocess": post_workers},
        timings_s=timings,
        tissue_mask_mpp=float(mask.mpp),
        stain_gains=tissue.stain_gains,
        truncated=nuclei.truncated,
        started_at=started_at,
    )
    summary = dataclasses.replace(
        summary,
        provenance=dataclasses.replace(summary.provenance, execution=execution.record()),
    )
    logger.debug("%s: %.2f µm/px, %d nuclei", path, slide.mpp, n_written)
    # publishing: summary.json last
    write_summary(stage, summary)
    return summary


def _started_pool(execution: Execution) -> Executor | None:
    """The post-processing pool of ``execution``; a process pool has all its processes started
    now, ignoring Ctrl-C (see :mod:`._signals`; the pool would otherwise start them at the first
    tiles, with SIGINT)."""
    if execution.kind != "processes":
        return postprocess_executor(execution)
    with sigint_ignored():
        pool = postprocess_executor(execution)
        if pool is not None:
            for _ in range(execution.postprocess):
                pool.submit(os.getpid)  # each submit to a busy pool starts one process
    return pool


def stop_workers(pool: Executor | None, *, grace_s: float = 2.0) -> int:
    """Stop every child process of this one (post-processing pool, tile readers) at once.

    Used when a batch is interrupted: pending post-processing is cancelled, each child gets
    SIGTERM, then SIGKILL after ``grace_s`` seconds. Returns the number of children stopped.
    """
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(1.0)
    if children:
        logger.info("stopped %d worker process(es)", len(children))
    return len(children)


def run_batch(
    inputs: Sequence[Path], config: RunConfig, *, recorder: Recorder | None = None
) -> list[SlideOutcome]:
    """Analyse every slide of ``inputs``; a failing slide is recorded and the batch goes on.

    Parameters
    ----------
    inputs
        Slide files, folders and manifest CSVs (see :func:`slidestream.inputs.discover_slides`).
    config
        Run configuration.
    recorder
        Records every outcome (default: a new :class:`Recorder` of ``config``).

    Returns
    -------
    list of SlideOutcome
        One per slide, in input order. Failures are also written to ``out_dir/failures.csv``.
    """
    from slidestream.wsi import slide_name

    slides = discover_slides(inputs)
    rec = recorder if recorder is not None else Recorder(config)
    rec.open()  # output folder and database checked before any work
    models = load_models(config)
    execution = plan_execution(config, models)
    logger.info(
        "%d slide(s); device %s, %d reader(s), %d post-processing worker(s) (%s)",
        len(slides),
        models.device,
        execution.readers,
        execution.postprocess,
        execution.kind,
    )
    shared = shared_names(slides)
    pool = _started_pool(execution)
    outcomes: list[SlideOutcome] = []
    bar: Any = None
    if config.show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(slides), desc="slides", unit="slide", position=0)
    interrupted = True
    try:
        for path in slides:
            # Analysed by its absolute path (as a Dask worker does), reported as given.
            outcome = analyse_guarded(
                Path(path).resolve(),
                config,
                models,
                pool=pool,
                shared_name=slide_name(Path(path)) in shared,
                execution=execution,
            )
            outcome = dataclasses.replace(outcome, path=path)
            outcomes.append(outcome)
            rec.record(outcome)
            if bar is not None:
                bar.update(1)
        interrupted = False
    finally:
        if bar is not None:
            bar.close()
        if interrupted:  # Ctrl-C, SIGTERM or a bug: stop every worker now
            stop_workers(pool)
        elif pool is not None:
            pool.shutdown(cancel_futures=True)
        if recorder is None:
            rec.close()
        else:
            rec.write_failures()
    return outcomes
