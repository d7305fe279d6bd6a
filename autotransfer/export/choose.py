"""Which trial an export holds: the chosen (or best) COMPLETE trial, its class
names and its test metrics."""

from __future__ import annotations

from typing import Any

import optuna

from autotransfer.exceptions import DataError, StorageError
from autotransfer.spec.model import StudySpec
from autotransfer.store.records import CLASSES_ATTR
from autotransfer.store.studies import test_metrics
from autotransfer.store.summary import best_trial
from autotransfer.tuning.search import evaluate_best_on_test, prepare_data


def choose_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """The trial ``number``, or the best one; it must be COMPLETE.

    Raises:
        StorageError: no such trial, it did not complete, or no trial completed.
    """
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if number is None:
        if not complete:
            raise StorageError(
                f"study '{study.study_name}' has no completed trial to export "
                f"({len(trials)} trials); run `autotransfer search` first"
            )
        best = best_trial(study)
        assert best is not None  # complete is not empty
        return best
    found = [t for t in trials if t.number == number]
    if not found:
        raise StorageError(
            f"study '{study.study_name}' has no trial {number} (trials 0..{len(trials) - 1}); "
            "see `autotransfer trials`"
        )
    trial = found[0]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        shown = ", ".join(str(t.number) for t in complete) or "none"
        raise StorageError(
            f"trial {number} is {trial.state.name}, it has no model to export; "
            f"completed trials: {shown}"
        )
    return trial


def refit_data(spec: StudySpec) -> tuple[Any, Any]:
    """The splits (and source set) a refit trains on.

    Raises:
        DataError: the data set cannot be read.
    """
    try:
        return prepare_data(spec)
    except DataError as exc:
        raise DataError(
            f"a refit trains on the study's data, which cannot be read: {exc}; restore the "
            "data set, or export the trial's own weights (--no-refit)"
        ) from None


def classes_and_test(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    spec: StudySpec,
    host: Any,
    store: Any,
    say: Any,
    splits: Any = None,
) -> tuple[list[str], dict[str, float] | None]:
    """Class names (stored at search time, else re-read from the data set) and the
    trial's test metrics (computed once and stored, when the data can be read);
    ``splits``: the data, if already loaded."""
    classes = study.user_attrs.get(CLASSES_ATTR)
    test = test_metrics(study).get(str(trial.number))
    if classes and test is not None and splits is None:
        return list(classes), test
    try:
        if splits is None:
            splits, _ = prepare_data(spec)
    except DataError as exc:
        if classes:
            say(f"export: no test metrics for trial {trial.number} (data set unreadable: {exc})")
            return list(classes), None
        raise DataError(
            f"study '{study.study_name}' has no stored class names and its data set "
            f"cannot be read to recover them: {exc}"
        ) from None
    if classes and list(classes) != list(splits.classes):
        raise DataError(
            f"the data set '{spec.data.path}' now has classes {splits.classes}, the study was "
            f"trained on {list(classes)}; restore the data set or export without it"
        )
    if test is None:
        say(f"export: computing test metrics of trial {trial.number}")
        test = evaluate_best_on_test(study, trial, host, store, splits, spec)
    return list(splits.classes), test
