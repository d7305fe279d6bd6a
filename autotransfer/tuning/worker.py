"""Joining a study from another process or machine: ``autotransfer worker``.

A worker reads everything from the study itself: the spec saved when
``autotransfer search`` created it (study attribute ``spec``) and the artifacts
directory (attribute ``artifacts``, overridable because another machine may mount
it elsewhere). It then runs trials with the same loop as ``search``
(:func:`autotransfer.tuning.search.run_trials`).
"""

from __future__ import annotations

import os
import socket
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from autotransfer.exceptions import DataError, StorageError
from autotransfer.spec.model import StudySpec, validate_spec
from autotransfer.store.opening import open_for_trials
from autotransfer.store.records import ARTIFACTS_ATTR, CLASSES_ATTR
from autotransfer.store.storage import open_storage, require_existing
from autotransfer.store.studies import load_study, stored_spec
from autotransfer.tuning.gpus import plan_gpus
from autotransfer.tuning.progress import Progress
from autotransfer.tuning.sampling import make_pruner, make_sampler
from autotransfer.tuning.search import load_worker_inputs, run_on_gpus, run_trials


@dataclass
class WorkerOutcome:
    study: optuna.Study
    ran: int
    dead_workers: list[str] = field(default_factory=list)


def worker_salt() -> int:
    """A number that differs between worker processes (host and pid), so that
    workers started together do not draw the same random parameters."""
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 1_000_003


def joined_spec(study: optuna.Study, data: str | None) -> StudySpec:
    """The spec saved with ``study``; ``data`` replaces its ``data.path`` (the
    same data set, mounted elsewhere on this machine).

    Raises:
        StorageError: the study was not made by autotransfer.
    """
    spec = stored_spec(study)
    if data is None:
        return spec
    raw = spec.model_dump(mode="json")
    raw["data"]["path"] = data
    return validate_spec(raw, source=f"the spec saved with study '{study.study_name}'")


def joined_artifacts(study: optuna.Study, artifacts: Path | None) -> Path:
    """The shared artifacts directory: ``artifacts`` or the one saved with the study.

    Raises:
        StorageError: the directory does not exist here (a worker never starts a
            new one: its checkpoints would be out of reach of the others).
    """
    if artifacts is None:
        saved = study.user_attrs.get(ARTIFACTS_ATTR)
        if not saved:
            raise StorageError(
                f"study '{study.study_name}' has no artifacts directory saved; give --artifacts"
            )
        path, origin = Path(saved), "saved with the study"
    else:
        path, origin = artifacts.expanduser().resolve(), "from --artifacts"
    if not path.is_dir():
        raise StorageError(
            f"artifacts directory '{path}' ({origin}) does not exist on this machine; "
            "mount the study's shared artifacts directory and give its path with --artifacts"
        )
    return path


def wait_for_study(storage_url: str, study_name: str | None, wait: float) -> optuna.Study:
    """The study, once it exists and has its saved spec; polls for up to ``wait``
    seconds (a worker started at the same time as the search that creates it).

    Raises:
        StorageError: a bad storage URL (at once); no such study, or not made by
            autotransfer, after ``wait`` seconds.
    """
    try:
        require_existing(storage_url)
    except StorageError:
        pass  # a SQLite file the search has not created yet: poll for it
    else:
        open_storage(storage_url)  # a bad URL fails at once, not after the wait
    deadline = time.monotonic() + wait
    while True:
        try:
            study = load_study(storage_url, study_name)
            stored_spec(study)
            return study
        except StorageError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def run_worker(
    storage_url: str,
    study_name: str | None,
    artifacts: Path | None = None,
    data: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: Progress | None = None,
    wait: float = 0.0,
    debug: bool = False,
    gpus: str | None = None,
    trials_per_gpu: int = 1,
) -> WorkerOutcome:
    """Join the existing study ``study_name`` and run trials until the study's
    target is met (:mod:`autotransfer.store.budget`) or this worker's own limits
    (``n_trials``, ``timeout``) are reached. ``wait``: seconds to wait for the
    study to be created. ``debug``: show Optuna's own traceback of a failed trial.
    ``gpus`` / ``trials_per_gpu``: more than one worker slot starts one worker
    process per slot instead
    (:mod:`autotransfer.tuning.gpus`; ``n_trials`` is then each one's limit).

    Raises:
        UserInputError: no such study, not an autotransfer study, artifacts
            directory or data not reachable here, bad backbone.
    """
    study = wait_for_study(storage_url, study_name, wait)
    spec = joined_spec(study, data)
    path = joined_artifacts(study, artifacts)
    progress = progress or Progress(epochs=spec.train.epochs, debug=debug)
    plan = plan_gpus(gpus, trials_per_gpu, spec.train.device)
    if plan.spawn:
        before = len(study.trials)
        trials = open_for_trials(
            storage_url, study.study_name, spec.recovery, make_sampler(spec), make_pruner(spec)
        )
        dead = run_on_gpus(
            trials, storage_url, spec, path, progress, plan, data=data, n_trials=n_trials
        )
        return WorkerOutcome(study, len(study.trials) - before, dead)
    inputs = load_worker_inputs(spec, path)
    stored_classes = study.user_attrs.get(CLASSES_ATTR)
    if stored_classes is not None and list(stored_classes) != list(inputs.splits.classes):
        raise DataError(
            f"data '{spec.data.path}' has classes {list(inputs.splits.classes)} but study "
            f"'{study.study_name}' was made with {list(stored_classes)}; give --data the "
            "study's data set"
        )
    sampler = make_sampler(spec, offset=len(study.trials) + worker_salt())
    trials = open_for_trials(
        storage_url, study.study_name, spec.recovery, sampler, make_pruner(spec)
    )
    target = trials.target()
    progress.message(
        f"worker on study '{study.study_name}': {len(study.trials)} trial(s) stored; "
        f"running until the study has {target if target is not None else 'unlimited'} "
        f"trial(s)" + (f" or this worker has run {n_trials}" if n_trials else "")
        + (f" (timeout {timeout:g}s)" if timeout else "")
    )
    ran = run_trials(trials, spec, inputs, path, progress, n_trials, timeout)
    return WorkerOutcome(study, ran)
