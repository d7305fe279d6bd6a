"""Running a search: validate everything, then let Optuna run the trials.

All input is checked before the first trial: the spec (pydantic), the storage
URL, the data (loaded, decoded and split once) and every candidate backbone
(built once, so an unknown model or unreachable weights fail at once).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from autotransfer.data.datasets import Dataset, Splits, load_dataset, load_splits
from autotransfer.data.decoded import decoded_dir
from autotransfer.engine.device import WorkerDevice
from autotransfer.engine.trainer import TrialError, evaluate
from autotransfer.exceptions import AutotransferError, BackboneError, NoSuccessfulTrialsError
from autotransfer.plugins.host import PluginHost, get_plugin_host
from autotransfer.spec.model import StudySpec
from autotransfer.store.budget import BudgetedStudy, BudgetSpent
from autotransfer.store.checkpoints import load_trial_backbone
from autotransfer.store.opening import open_for_trials
from autotransfer.store.records import CLASSES_ATTR, FAIL_REASON_ATTR, TEST_METRICS_ATTR
from autotransfer.store.recovery import after_trial, recover_lost_trials
from autotransfer.store.storage import artifact_store, default_artifacts_dir, open_storage
from autotransfer.store.studies import create_or_resume, test_metrics
from autotransfer.store.summary import best_trial as best_stored_trial
from autotransfer.tuning.gpus import GpuPlan, launch
from autotransfer.tuning.interrupts import handle_signals
from autotransfer.tuning.objective import Objective, plugin_label
from autotransfer.tuning.progress import Progress, quiet_failed_trials
from autotransfer.tuning.sampling import make_pruner, make_sampler


@dataclass
class SearchOutcome:
    study: optuna.Study
    best: optuna.trial.FrozenTrial
    test: dict[str, Any]
    new_trials: int
    dead_workers: list[str] = dataclasses.field(default_factory=list)


def prepare_data(
    spec: StudySpec, artifacts: Path | None = None
) -> tuple[Splits, Dataset | None]:
    """Load and split the target set, with any given validation and test sets
    (and load the source set, if any). With the study's ``artifacts`` directory,
    images are decoded once per machine into a file there that every worker
    maps (:mod:`autotransfer.data.decoded`)."""
    shared = decoded_dir(artifacts) if artifacts is not None else None
    splits = load_splits(spec.data, shared)
    source = load_dataset(spec.source, shared) if spec.source is not None else None
    return splits, source


def preflight(spec: StudySpec, host: PluginHost, num_classes: int) -> None:
    """Build each candidate once so bad names or weights, or a backbone for the
    wrong modality (an image model for text data), fail before any trial."""
    modality = spec.data.modality
    for ref in spec.search.backbones:
        family = host.family(ref.family)
        if modality not in family.modality.split("+"):
            raise BackboneError(_modality_mismatch(ref.key, family.modality, spec))
        try:
            backbone = host.build(ref, num_classes=num_classes, image_size=spec.data.image_size)
        except AutotransferError:
            raise
        except Exception as exc:  # a plugin's own bug: name it, no traceback
            raise BackboneError(
                f"{plugin_label(host, ref.family)} failed to build {ref.key}: "
                f"{type(exc).__name__}: {exc}; fix or uninstall the plugin, or drop "
                f"{ref.key} from search.backbones"
            ) from exc
        if backbone.modality != modality:
            raise BackboneError(_modality_mismatch(ref.key, backbone.modality, spec))


def _modality_mismatch(key: str, modality: str, spec: StudySpec) -> str:
    wanted = spec.data.modality
    example = (
        "hf:sentence-transformers/all-MiniLM-L6-v2@packaged" if wanted == "text"
        else "timm:tf_efficientnet_lite0@packaged"
    )
    return (
        f"backbone {key} is a{'n' if modality[0] == 'i' else ''} {modality} model but the "
        f"data '{spec.data.path}' is {wanted}; choose {wanted} backbones (e.g. {example}) "
        "or other data"
    )


@dataclass
class WorkerInputs:
    """What every trial of one process needs, loaded and checked once."""

    splits: Splits
    source: Dataset | None
    host: PluginHost
    device: WorkerDevice


def load_worker_inputs(spec: StudySpec, artifacts: Path | None = None) -> WorkerInputs:
    """Resolve the device, set the thread count, load and split the data
    (decoded images shared through ``artifacts``, :func:`prepare_data`), build
    every candidate once.

    Raises:
        UserInputError: a device or precision this machine lacks, bad data or
            backbone.
    """
    device = WorkerDevice(spec.train)
    torch.set_num_threads(spec.train.threads or os.cpu_count() or 1)
    splits, source = prepare_data(spec, artifacts)
    host = get_plugin_host()
    preflight(spec, host, len(splits.classes))
    return WorkerInputs(splits, source, host, device)


def _require_opened_for_trials(study: optuna.Study) -> None:
    if not isinstance(study, BudgetedStudy):
        raise TypeError(
            "the trial loop needs the study open_for_trials returns (heartbeat, retries "
            f"and the shared budget in place), not {type(study).__name__}"
        )


def run_trials(
    study: BudgetedStudy,
    spec: StudySpec,
    inputs: WorkerInputs,
    artifacts: Path,
    progress: Progress,
    n_trials: int | None,
    timeout: float | None,
    add_to_target: int | None | bool = False,
) -> int:
    """The trial loop that ``search`` and ``worker`` share: Optuna's
    ``study.optimize`` with our objective, the trial errors it catches and the
    callbacks run after each trial. It ends when the study's shared budget is
    spent (:mod:`autotransfer.store.budget`), after ``n_trials`` trials of this process
    or after ``timeout`` seconds, whichever comes first. ``add_to_target`` (a
    resumed search): once lost trials are queued again, set the study's target
    to this many more than it has settled (None: no target; False: leave it).
    Returns how many trials this process ran.

    Raises:
        TypeError: ``study`` is not from :func:`autotransfer.store.opening.open_for_trials`
            (its heartbeat or its budget would be missing).
    """
    _require_opened_for_trials(study)
    ran: list[int] = []

    def count(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        ran.append(trial.number)

    store = artifact_store(artifacts)
    objective = Objective(
        spec, inputs.splits, inputs.host, store, progress, inputs.source, inputs.device
    )
    # SIGTERM / Ctrl-C: mark and re-queue the running trial; a failed trial: one line
    with handle_signals(), quiet_failed_trials(progress):
        recover_lost_trials(study, store, progress.message)  # retried before new trials
        if add_to_target is not False:
            study.set_target(add_to_target)
        try:
            study.optimize(
                objective,
                n_trials=n_trials,
                timeout=timeout,
                catch=(TrialError,),
                gc_after_trial=True,
                callbacks=[release_cached_memory, after_trial(store, progress.message), count],
            )
        except BudgetSpent as spent:
            progress.message(f"stopping: {spent}")
    return len(ran)


def run_search(
    spec: StudySpec,
    storage_url: str,
    artifacts: Path | None = None,
    progress: Progress | None = None,
    gpus: GpuPlan | None = None,
) -> SearchOutcome:
    """Run (or resume) the study described by ``spec``; with a ``gpus`` plan
    that spawns workers (:mod:`autotransfer.tuning.gpus`), they run the trials
    and this process waits, then evaluates the best one.

    Raises:
        UserInputError: bad storage, data or backbone (before any trial runs).
        NoSuccessfulTrialsError: the study has no completed trial at the end.
    """
    progress = progress or Progress(epochs=spec.train.epochs)
    storage = open_storage(storage_url)  # fail on a bad URL before loading anything heavy
    resumed = spec.name in {s.study_name for s in storage.get_all_studies()}
    artifacts = artifacts or default_artifacts_dir(storage_url)
    new_artifacts = not artifacts.exists()
    try:
        inputs = load_worker_inputs(spec, artifacts)  # may write the decoded data there
    except AutotransferError:
        if new_artifacts:  # bad input leaves nothing behind
            shutil.rmtree(artifacts, ignore_errors=True)
        raise
    splits = inputs.splits
    study = create_or_resume(spec, storage_url, artifacts)
    # A resumed run draws on from where it was, not the same random start-up draws.
    sampler = make_sampler(spec, offset=len(study.trials) if resumed else 0)
    # Only now, with all input checked: bad input gets one error line and nothing else.
    shape = (
        f"texts (at most {spec.data.max_length} tokens)" if splits.modality == "text"
        else f"images at {spec.data.image_size}px"
    )
    given = spec.data.given
    sizes = " / ".join(
        f"{len(getattr(splits, part))} {part}" + (f" (from {given[part]})" if part in given else "")
        for part in ("train", "val", "test")
    )
    progress.message(f"data: {spec.data.path}: {len(splits.classes)} classes, {sizes} {shape}")
    study.set_user_attr(CLASSES_ATTR, list(splits.classes))  # for export: label names
    before = _started(study)
    queued = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    progress.message(
        f"study '{spec.name}': {before} trial(s) stored; running "
        f"{spec.n_trials or 'unlimited'} more"
        + (f", {queued} of them queued first" if queued else "")
        + (f" (timeout {spec.timeout:g}s)" if spec.timeout else "")
    )
    # This process has no count of its own: it runs until the study's target
    # (``n_trials`` more than it had settled) is met, by it or by workers.
    add = spec.n_trials if resumed else False
    dead: list[str] = []
    trials = open_for_trials(storage_url, spec.name, spec.recovery, sampler, make_pruner(spec))
    if gpus is not None and gpus.spawn:
        dead = run_on_gpus(trials, storage_url, spec, artifacts, progress, gpus, add)
    else:
        run_trials(
            trials, spec, inputs, artifacts, progress, None, spec.timeout, add_to_target=add
        )
    best = best_trial(study)
    test = evaluate_best_on_test(
        study, best, inputs.host, artifact_store(artifacts), splits, spec, inputs.device
    )
    return SearchOutcome(study, best, test, _started(study) - before, dead)


def run_on_gpus(
    study: BudgetedStudy,
    storage_url: str,
    spec: StudySpec,
    artifacts: Path,
    progress: Progress,
    plan: GpuPlan,
    add_to_target: int | None | bool = False,
    data: str | None = None,
    n_trials: int | None = None,
) -> list[str]:
    """Run the study's trials in one worker process per slot of ``plan``, as
    :func:`run_trials` would in this one (lost trials queued first, the target
    set); returns the workers that died, described. ``study``: as for :func:`run_trials`.

    Raises:
        TypeError: ``study`` is not from :func:`autotransfer.store.opening.open_for_trials`.
    """
    _require_opened_for_trials(study)
    store = artifact_store(artifacts)
    recover_lost_trials(study, store, progress.message)
    if add_to_target is not False:
        study.set_target(add_to_target)
    dead = launch(
        plan, storage_url, study.study_name, str(artifacts), progress.line,
        lambda: recover_lost_trials(study, store, progress.message), data, spec.timeout,
        n_trials,
    )
    return [e.describe() for e in dead]


def _started(study: optuna.Study) -> int:
    """Trials that ran or run now; queued ones (``WAITING``) are still to come."""
    return sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))


def release_cached_memory(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """After each trial (Optuna has run ``gc.collect()`` by then): hand the CUDA
    allocator's cached blocks back, so an out-of-memory trial does not leave the
    next one short."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        reasons = sorted(
            {t.user_attrs.get(FAIL_REASON_ATTR, t.state.name.lower()) for t in study.trials}
        )
        raise NoSuccessfulTrialsError(
            f"no successful trials in study '{study.study_name}' "
            f"({len(study.trials)} trials: {', '.join(reasons) or 'none run'}); "
            "see `autotransfer trials` for each trial's reason"
        )
    best = best_stored_trial(study)
    assert best is not None
    return best


def evaluate_best_on_test(
    study: optuna.Study,
    best: optuna.trial.FrozenTrial,
    host: PluginHost,
    store: object,
    splits: Splits,
    spec: StudySpec,
    device: WorkerDevice | None = None,
) -> dict[str, Any]:
    """Test-set metrics of the best trial, from its checkpoint (computed once),
    on ``device`` (the GPU when there is one): accuracy, macro-F1, per-class
    precision/recall/F1 and the confusion matrix
    (:meth:`~autotransfer.engine.trainer.Metrics.record`)."""
    known = test_metrics(study)
    if str(best.number) in known:
        return known[str(best.number)]
    backbone = load_trial_backbone(
        best, host, store, num_classes=len(splits.classes), image_size=spec.data.image_size,
        listed=spec.search.backbones,
    )
    device = device or WorkerDevice.for_evaluation(spec.train)
    placement = device.placement(backbone)
    placement.place_model(backbone.model)
    m = evaluate(
        backbone, device.data(splits.test), spec.train.eval_batch_size, placement=placement
    )
    result = m.record(list(splits.classes))
    known[str(best.number)] = result
    study.set_user_attr(TEST_METRICS_ATTR, known)
    return result
