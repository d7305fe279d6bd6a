"""``autotransfer worker``: join an existing study and run its trials."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from autotransfer.cli.options import DEFAULT, Gpus, Storage, StudyName, TrialsPerGpu


def worker(
    storage: Storage = DEFAULT,
    study_name: StudyName = None,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            help="The study's shared checkpoint directory as mounted on this machine; "
            "default: the directory saved with the study by `autotransfer search`.",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="The study's data set as mounted on this machine; default: the path in "
            "the spec saved with the study.",
        ),
    ] = None,
    n_trials: Annotated[
        int | None,
        typer.Option("--n-trials", min=1, help="Run at most this many trials in this worker."),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.001, help="Stop starting trials after this many seconds."),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(
            min=0, help="Wait up to this many seconds for the study to be created (workers "
            "started together with the search that creates it).",
        ),
    ] = 0,
    gpus: Gpus = None,
    trials_per_gpu: TrialsPerGpu = 1,
) -> None:
    """Join a study that `autotransfer search` created and run its trials.

    Start any number of workers, on any machines that reach the storage (use
    PostgreSQL for several machines) and the shared artifacts directory. Each
    worker reads the spec saved with the study, so it needs no spec file, and runs
    trials until the study has the total that `search --n-trials` set (or its own
    --n-trials / --timeout). With several GPUs (--gpus), it starts one worker
    process per GPU. Prints one summary line when it stops. See
    docs/scale-out.md.
    """
    from autotransfer.cli import debug_enabled
    from autotransfer.tuning.worker import run_worker

    outcome = run_worker(
        storage, study_name, artifacts, data, n_trials, timeout, wait=wait,
        debug=debug_enabled(), gpus=gpus, trials_per_gpu=trials_per_gpu,
    )
    states = [t.state.name for t in outcome.study.get_trials(deepcopy=False)]
    counts = ", ".join(
        f"{states.count(s)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
        if s in states
    )
    typer.echo(
        f"worker ran {outcome.ran} trial(s); study '{outcome.study.study_name}' now has "
        f"{len(states)} ({counts or 'none'})"
    )
    if outcome.dead_workers:
        typer.echo(f"error: {'; '.join(outcome.dead_workers)}", err=True)
        raise typer.Exit(1)
