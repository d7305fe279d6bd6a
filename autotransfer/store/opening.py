"""Opening a study to run trials: one call, :func:`open_for_trials`.

The trial loop needs three things on the study object it runs, and each one
lives in another module: the heartbeat of each running trial and the retry of
lost ones (:mod:`autotransfer.store.recovery`), and the study's shared trial
budget on every ``ask`` (:mod:`autotransfer.store.budget`). Opening the study
again after wrapping it would silently drop the budget, so nothing else makes
such a study: :func:`open_for_trials` returns a
:class:`~autotransfer.store.budget.BudgetedStudy` with all three in place, and
the trial loop (:func:`autotransfer.tuning.search.run_trials`) takes nothing
else. Readers (``trials``, ``report``, ``export``) open studies with
:func:`autotransfer.store.studies.load_study`: no heartbeat, no budget.
"""

from __future__ import annotations

import optuna

from autotransfer.spec.model import RecoverySpec
from autotransfer.store.budget import BudgetedStudy, budget_lock
from autotransfer.store.recovery import heartbeat
from autotransfer.store.storage import open_storage


def open_for_trials(
    storage_url: str,
    study_name: str,
    recovery: RecoverySpec | None,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> BudgetedStudy:
    """The existing study ``study_name``, ready to run trials: heartbeats and
    the retry of lost trials as ``recovery`` says (None: neither, for tests and
    benchmarks of the budget alone), and the shared budget claimed before each
    trial. ``sampler`` and ``pruner`` come from the tuning layer
    (:mod:`autotransfer.tuning.sampling`).

    Raises:
        StorageError: a database the shared budget cannot lock, or that cannot
            be opened.
    """
    lock = budget_lock(storage_url, study_name)
    storage = open_storage(storage_url, None if recovery is None else heartbeat(recovery))
    return BudgetedStudy(study_name, storage, sampler, pruner, lock)
