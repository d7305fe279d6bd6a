"""Whole searches through the API: pruning, resuming, spec changes."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autotransfer.exceptions import SpecError
from autotransfer.store.studies import create_or_resume, load_study
from autotransfer.store.summary import trial_records
from autotransfer.tuning.progress import Progress
from autotransfer.tuning.search import run_search

GOOD = {"backbone": "timm:test_resnet@none", "freeze": 0.0, "lr": 1e-2,
        "weight_decay": 1e-4, "batch_size": 8, "alpha": 0.0}
# All blocks frozen and a learning rate of 1e-7: the model stays at its random init.
BAD = dict(GOOD, freeze=1.0, lr=1e-7)


def _quiet() -> Progress:
    from rich.console import Console

    return Progress(console=Console(file=open("/dev/null", "w"), highlight=False))  # noqa: SIM115


def test_a_trial_that_falls_behind_is_pruned(tiny_spec, storage_url: str, tmp_path: Path) -> None:
    spec = tiny_spec(**{
        "name": "prune", "n_trials": 3, "train.epochs": 2,
        "pruner": {"type": "median", "warmup_epochs": 1, "patience": None},
        "sampler.portfolio": False,
        "search.freeze": {"low": 0.0, "high": 1.0},
        "search.lr": {"low": 1e-7, "high": 1e-2, "log": True},
    })
    artifacts = tmp_path / "artifacts"
    study = create_or_resume(spec, storage_url, artifacts)
    for params in (GOOD, GOOD, BAD):  # the median pruner needs 2 finished trials first
        study.enqueue_trial(params)
    outcome = run_search(spec, storage_url, artifacts, _quiet())

    trials = load_study(storage_url, "prune").trials
    states = [t.state for t in trials]
    good_epoch1 = trials[0].intermediate_values[1]
    bad = trials[2]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2
    assert bad.intermediate_values[1] < good_epoch1, "the bad trial did not fall behind"
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert bad.user_attrs["pruned_at_epoch"] == 1
    assert bad.user_attrs["epochs_run"] == 1
    assert sorted(bad.intermediate_values) == [1]
    assert "checkpoint" not in bad.user_attrs
    assert bad.user_attrs["val_accuracy"] == bad.intermediate_values[1]
    record = trial_records(outcome.study)[2]
    assert record["state"] == "PRUNED" and record["pruned_at_epoch"] == 1
    assert outcome.best.number in (0, 1) and outcome.test["n"] == 9


def test_running_the_same_search_again_resumes_it(
    tiny_spec, storage_url: str, tmp_path: Path
) -> None:
    spec = tiny_spec(**{"name": "resume", "n_trials": 2, "train.epochs": 1})
    artifacts = tmp_path / "artifacts"
    first = run_search(spec, storage_url, artifacts, _quiet())
    assert first.new_trials == 2
    before = [(t.number, t.params, t.value, t.state) for t in first.study.trials]

    again = run_search(spec, storage_url, artifacts, _quiet())  # same spec, same storage
    assert again.new_trials == 2
    assert again.study.study_name == "resume"
    after = [(t.number, t.params, t.value, t.state) for t in again.study.trials]
    assert len(after) == 4
    assert after[:2] == before, "resuming changed or lost stored trials"
    assert [n for n, *_ in after] == [0, 1, 2, 3]
    # The sampler is re-seeded with an offset: the new trials are new points.
    assert {str(p) for _, p, *_ in after[2:]}.isdisjoint({str(p) for _, p, *_ in before})
    storage = optuna.storages.RDBStorage(storage_url)
    assert [s.study_name for s in storage.get_all_studies()] == ["resume"]

    # n_trials may change between runs; the search space may not.
    run_search(spec.model_copy(update={"n_trials": 1}), storage_url, artifacts, _quiet())
    assert len(load_study(storage_url, None).trials) == 5
    changed = tiny_spec(**{"name": "resume", "train.epochs": 1, "search.batch_size": 4})
    with pytest.raises(SpecError, match=r"changed: search\.batch_size"):
        run_search(changed, storage_url, artifacts, _quiet())
    assert len(load_study(storage_url, None).trials) == 5


def test_best_trial_breaks_accuracy_ties_by_validation_loss() -> None:
    """Equal validation accuracy: the lower ``val_loss`` wins, then the earlier
    trial; a trial without a recorded loss (an older study) comes after one with it."""
    from optuna.distributions import FloatDistribution

    from autotransfer.store.summary import best_trial

    study = optuna.create_study(direction="maximize")
    assert best_trial(study) is None
    dist = {"lr": FloatDistribution(1e-5, 1.0, log=True)}

    def add(value: float, loss: float | None) -> None:
        attrs = {} if loss is None else {"val_loss": loss}
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"lr": 0.01}, distributions=dist, user_attrs=attrs))

    add(0.80, 0.30)  # 0: lower accuracy, lowest loss
    add(0.90, None)  # 1: tied, no loss recorded
    add(0.90, 0.55)  # 2: tied
    add(0.90, 0.45)  # 3: tied, lowest loss among the tied: the best
    add(0.90, 0.45)  # 4: same loss as 3, later
    assert study.best_trial.number == 1  # Optuna's own pick: the first of the tie
    assert best_trial(study).number == 3
    assert [r["val_loss"] for r in trial_records(study)][:3] == [0.30, None, 0.55]
