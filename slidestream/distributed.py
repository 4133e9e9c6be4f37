"""Batch analysis beyond one machine, on a Dask distributed cluster.

Each slide is one Dask task: a worker loads the models once (cached per worker process and
model/device choice), analyses the slide with :func:`slidestream.pipeline.analyse_guarded` — the
same function as the local batch, so a slide gets the same :class:`SlideOutcome` on either path
— and publishes its outputs under ``out_dir``, which must therefore be storage every worker and
this process share. Only this (the client) process records outcomes
(:class:`~slidestream.pipeline.Recorder`: ``failures.csv`` and the statistics database), as
everywhere else.

Example::

    dask scheduler &                      # or an existing cluster
    dask worker tcp://scheduler:8786 --nthreads 1 --nworkers 4 &
    slidestream run /shared/slides --out /shared/results --dask tcp://scheduler:8786
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slidestream.config import RunConfig
from slidestream.inputs import discover_slides
from slidestream.pipeline import (
    LoadedModels,
    Recorder,
    SlideOutcome,
    analyse_guarded,
    load_models,
    shared_names,
)

__all__ = ["run_batch_dask"]

logger = logging.getLogger(__name__)

_MODELS: dict[tuple[str, str, str], LoadedModels] = {}
"""Models loaded in this worker process, by (nuclei model, tissue model, device)."""


def _worker_models(config: RunConfig) -> LoadedModels:
    key = (config.nuclei_model, config.tissue_model, config.device)
    if key not in _MODELS:
        _MODELS[key] = load_models(config)
    return _MODELS[key]


def _analyse_on_worker(path: Path, config: RunConfig, shared_name: bool) -> SlideOutcome:
    """Dask task: analyse one slide on a worker; never raises for a bad slide."""
    return analyse_guarded(path, config, _worker_models(config), pool=None, shared_name=shared_name)


def run_batch_dask(
    inputs: Sequence[Path],
    config: RunConfig,
    *,
    scheduler: str | Any,
    recorder: Recorder | None = None,
) -> list[SlideOutcome]:
    """Analyse every slide of ``inputs`` as Dask tasks; record outcomes here as they finish.

    Parameters
    ----------
    inputs
        Slide files, folders and manifest CSVs, with paths valid on the workers.
    config
        Run configuration; ``out_dir`` must be shared by the workers and this process.
    scheduler
        Scheduler address (``tcp://host:8786``) or an existing ``distributed.Client``.
    recorder
        Records every outcome (default: a new :class:`Recorder` of ``config``).

    Returns
    -------
    list of SlideOutcome
        One per slide, in input order (each with the path as given).
    """
    from distributed import Client, as_completed

    from slidestream.wsi import slide_name

    slides = discover_slides(inputs)
    shared = shared_names(slides)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    own_client = not isinstance(scheduler, Client)
    client: Any = Client(scheduler) if own_client else scheduler  # type: ignore[no-untyped-call]
    rec = recorder if recorder is not None else Recorder(config)
    results: dict[int, SlideOutcome] = {}
    try:
        futures = [
            client.submit(
                _analyse_on_worker,
                Path(p).resolve(),
                config,
                slide_name(Path(p)) in shared,
                pure=False,
            )
            for p in slides
        ]
        index = {f.key: i for i, f in enumerate(futures)}
        for future in as_completed(futures):  # type: ignore[no-untyped-call]
            i = index[future.key]
            outcome = dataclasses.replace(future.result(), path=slides[i])
            results[i] = outcome
            rec.record(outcome)
    finally:
        if own_client:
            client.close()
        if recorder is None:
            rec.close()
        else:
            rec.write_failures()
    return [results[i] for i in sorted(results)]
