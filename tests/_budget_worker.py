"""A worker process with a dummy objective, for the budget tests:
``python _budget_worker.py STORAGE_URL STUDY_NAME PAUSE_S`` joins the study
through ``open_for_trials`` (as ``autotransfer worker`` does, minus the
training and the heartbeat) and prints how many trials it ran."""

from __future__ import annotations

import sys
import time

import optuna

from autotransfer.store.budget import BudgetSpent
from autotransfer.store.opening import open_for_trials


def main(url: str, name: str, pause: float) -> None:
    study = open_for_trials(
        url, name, None, optuna.samplers.RandomSampler(), optuna.pruners.NopPruner()
    )
    ran = []

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        time.sleep(pause)
        trial.report(x, 1)
        return x

    try:
        study.optimize(objective, callbacks=[lambda s, t: ran.append(t.number)])
    except BudgetSpent:
        pass
    print(len(ran))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
