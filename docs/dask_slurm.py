"""Run ``slidestream run`` on a SLURM cluster with dask-jobqueue (``pip install dask-jobqueue``).

Each SLURM job runs ``--processes`` Dask worker processes of one thread each (one slide per
worker process at a time; the models load once per worker process). Slides and ``OUT`` must be
on storage every node mounts at the same path (the batch checks this before any slide).

    python docs/dask_slurm.py /shared/slides --out /shared/results --jobs 4 \\
        --queue cpu --account mylab --cores 8 --memory 64GB --walltime 04:00:00

``--print-job`` prints the job script instead of submitting anything. The same batch on one
machine needs no SLURM: ``slidestream run SLIDES --out OUT --dask local:8``; on an existing
scheduler: ``--dask tcp://HOST:8786``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def make_cluster(
    *,
    queue: str | None,
    account: str | None,
    cores: int,
    memory: str,
    walltime: str,
    python: str = sys.executable,
    dashboard_address: str | None = ":8787",
) -> Any:
    """A ``SLURMCluster`` whose jobs each run ``cores`` one-thread worker processes.

    ``memory`` is per job (split evenly between its worker processes: each needs about 1.5 GB
    for a slide of 50,000 x 50,000 px with the default models).
    """
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        queue=queue,
        account=account,
        cores=cores,
        processes=cores,  # one thread per worker process
        memory=memory,
        walltime=walltime,
        python=python,  # the same environment (with slidestream) on every node
        job_name="slidestream",
        scheduler_options={"dashboard_address": dashboard_address},
        # The worker processes are daemonic (run by a nanny): slidestream reads tiles and
        # post-processes with threads inside them, so nothing needs configuring for that.
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--queue", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--cores", type=int, default=4)
    parser.add_argument("--memory", default="16GB")
    parser.add_argument("--walltime", default="02:00:00")
    parser.add_argument("--print-job", action="store_true", help="print the job script only")
    args = parser.parse_args(argv)

    cluster = make_cluster(
        queue=args.queue,
        account=args.account,
        cores=args.cores,
        memory=args.memory,
        walltime=args.walltime,
    )
    if args.print_job:
        print(cluster.job_script())
        cluster.close()
        return 0

    from distributed import Client

    from slidestream.commands import run_slides
    from slidestream.config import RunConfig

    with cluster, Client(cluster) as client:
        cluster.scale(jobs=args.jobs)
        client.wait_for_workers(1, timeout=3600)  # the queue may take a while
        config = RunConfig(out_dir=args.out, db_url=f"sqlite:///{args.out / 'slidestream.db'}")
        report = run_slides(args.inputs, config, dask_scheduler=client)
    for line in report.lines:
        print(line, file=sys.stderr)
    return report.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
