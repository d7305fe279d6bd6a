"""The exact trial budget shared by processes (:mod:`autotransfer.store.budget`):
what it counts, waiting trials first, and many processes with a dummy
objective on SQLite and PostgreSQL ending with exactly the target."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.pruners import NopPruner
from optuna.samplers import RandomSampler
from optuna.trial import TrialState

from autotransfer.exceptions import StorageError
from autotransfer.store.budget import BudgetSpent, budget_lock, used_slots
from autotransfer.store.opening import open_for_trials
from autotransfer.store.records import TARGET_ATTR
from autotransfer.store.storage import open_storage

TESTS = Path(__file__).resolve().parent
X = {"x": FloatDistribution(0, 1)}


def _trial(state: TrialState, x: float, **system_attrs) -> optuna.trial.FrozenTrial:
    return optuna.create_trial(
        state=state, params={"x": x}, distributions=X, system_attrs=system_attrs,
        value=x if state == TrialState.COMPLETE else None,
    )


def test_a_retry_replaces_the_trial_it_retries(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="b")
    study.add_trial(_trial(TrialState.COMPLETE, 0.1))  # 0
    study.add_trial(_trial(TrialState.FAIL, 0.2))  # 1: its worker died
    study.add_trial(_trial(TrialState.FAIL, 0.2, failed_trial=1, retry_history=[1]))  # 2: died too
    study.add_trial(_trial(TrialState.PRUNED, 0.3))  # 3
    study.add_trial(_trial(TrialState.WAITING, 0.2, failed_trial=1, retry_history=[1, 2]))  # 4
    assert used_slots(study.get_trials()) == 3  # 0, the chain 1 -> 2 -> 4, 3
    budgeted = open_for_trials(storage_url, "b", None, RandomSampler(), NopPruner())
    # A resumed search: the waiting retry is the first of its trials.
    assert budgeted.set_target(1) == 3 == budgeted.target()
    # The budget is met, but the waiting retry is taken (it was counted) ...
    retry = budgeted.ask()
    assert retry.number == 4 and retry.params == {"x": 0.2}
    budgeted.tell(retry, 0.2)
    # ... and then nothing more.
    with pytest.raises(BudgetSpent, match="'b' has its 3 trials"):
        budgeted.ask()
    assert len(study.trials) == 5
    # Resuming with 2 more: the target counts from what is settled now.
    assert budgeted.set_target(2) == 5
    assert budgeted.ask().number == 5


def test_no_target_means_no_limit_and_other_databases_are_refused(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="free")
    budgeted = open_for_trials(storage_url, "free", None, RandomSampler(), NopPruner())
    assert budgeted.target() is None
    budgeted.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert len(study.trials) == 3
    with pytest.raises(StorageError, match="needs SQLite or PostgreSQL"):
        budget_lock("mysql+pymysql://u@localhost/db", "free")


def _run_processes(url: str, name: str, n_processes: int, target: int) -> list[int]:
    study = optuna.create_study(storage=open_storage(url), study_name=name)
    study.set_user_attr(TARGET_ATTR, target)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
    procs = [
        subprocess.Popen([sys.executable, str(TESTS / "_budget_worker.py"), url, name, "0.01"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(n_processes)
    ]
    ran = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        ran.append(int(out))
    return ran


def _assert_exact(url: str, name: str, target: int) -> None:
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert sorted(t.number for t in trials) == list(range(target))
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_processes_on_sqlite_end_with_exactly_the_target(storage_url: str) -> None:
    ran = _run_processes(storage_url, "shared", n_processes=6, target=40)
    assert sum(ran) == 40 and sum(r > 0 for r in ran) >= 2, ran
    _assert_exact(storage_url, "shared", 40)


def test_processes_on_postgres_end_with_exactly_the_target(postgres_url: str) -> None:
    ran = _run_processes(postgres_url, "shared", n_processes=6, target=40)
    assert sum(ran) == 40 and sum(r > 0 for r in ran) >= 2, ran
    _assert_exact(postgres_url, "shared", 40)
