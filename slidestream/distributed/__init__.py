"""Batch analysis beyond one machine, on a Dask distributed cluster (``run --dask``).

Each slide is one Dask task: a worker loads the models once (cached per worker process and
model/device choice), analyses the slide with :func:`slidestream.pipeline.analyse_guarded` — the
same function as the local batch, so a slide gets the same :class:`SlideOutcome` on either path
— and publishes its outputs under ``out_dir``, which must therefore be storage every worker and
this process share. Only this (the client) process records outcomes
(:class:`~slidestream.pipeline.Recorder`: ``failures.csv`` and the statistics database), as
everywhere else.

Inside a worker, tile reading and post-processing use what the worker process may have: a worker
run by a nanny (the default of ``dask worker`` and ``LocalCluster``) is daemonic and may not start
processes, so they run as threads there (:func:`slidestream.pipeline.plan_execution`; recorded in
``summary.json`` under ``provenance.execution``). Results are the same as a local run's.

Before any slide, every worker is checked (:func:`check_cluster`): it sees OUT (a token file
the client wrote), can write there, sees every slide path and loads the models.

Example::

    dask scheduler --port 8786 &                     # or an existing cluster
    dask worker tcp://127.0.0.1:8786 --nworkers 2 --nthreads 1 &
    slidestream run /shared/slides --out /shared/results --dask tcp://127.0.0.1:8786

    slidestream run slides/ --out results --dask local:4   # one machine, 4 worker processes

On SLURM, see ``docs/dask_slurm.py`` (dask-jobqueue's ``SLURMCluster``).
"""

from ._batch import run_batch_dask
from ._cluster import DaskTarget, check_cluster, connect, parse_dask_target
from ._tasks import SlideTaskResult, TaskCancelled, WorkerReport, analyse_on_worker, worker_models

__all__ = [
    "DaskTarget",
    "SlideTaskResult",
    "TaskCancelled",
    "WorkerReport",
    "analyse_on_worker",
    "check_cluster",
    "connect",
    "parse_dask_target",
    "run_batch_dask",
    "worker_models",
]
