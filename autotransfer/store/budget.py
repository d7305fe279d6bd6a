"""An exact total trial budget shared by every process that works on one study.

Optuna counts ``n_trials`` per process, and ``MaxTrialsCallback`` overshoots
when workers run at once: each one counts, then asks, and several asks slip in
between. Here a process *claims* before it asks: it takes a lock that every
process on the study shares (:func:`autotransfer.store.database.shared_lock`: a
PostgreSQL advisory lock, or a file lock beside a SQLite file), counts the
trials that use the budget, and asks Optuna for its trial (creating it, or
taking a waiting one) before it lets go. The count and
the new trial are one step for every other process.

What the budget counts (:func:`used_slots`):

- every trial that is ``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING`` or
  ``WAITING``;
- a retry (a trial with Optuna's system attribute ``failed_trial``, the number
  of the trial it retries, as ``RetryHeartbeatStaleTrialCallback`` writes it)
  *replaces* the trial it retries: a chain of retries counts once.

``WAITING`` trials (enqueued ones and retries) are taken before new ones and
are always run, even when the budget is met: they were counted when they were
made. A new trial is created only while the count is under the study's target,
the study user attribute ``target_trials`` (absent or null: no target).

``search --n-trials N`` creates a study with target N; resuming one sets it to
N more than the trials *settled* then (every counted chain but those with a
waiting trial): the waiting retries of a killed or interrupted run are the first
of the N, as with Optuna's own ``n_trials``, while trials running on live
workers keep their slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from autotransfer.exceptions import StorageError
from autotransfer.store.database import Lock, lockable, shared_lock
from autotransfer.store.records import FAILED_TRIAL_ATTR, TARGET_ATTR
from autotransfer.store.storage import redact

COUNTED_STATES = (
    TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
    TrialState.WAITING,
)


class BudgetSpent(Exception):
    """Raised by :meth:`BudgetedStudy.ask` when the study's target is met and no
    trial is waiting: this process should stop starting trials."""


def used_slots(trials: Sequence[FrozenTrial]) -> int:
    """How much of the budget ``trials`` use: one per trial, a retry replacing
    the trial it retries (see the module docstring)."""
    return len({_slot(t) for t in trials if t.state in COUNTED_STATES})


def _slot(trial: FrozenTrial) -> int:
    """The number of the first trial of ``trial``'s chain of retries."""
    return int(trial.system_attrs.get(FAILED_TRIAL_ATTR, trial.number))


def budget_lock(storage_url: str, study_name: str) -> Lock:
    """The lock every process on study ``study_name`` in ``storage_url`` shares
    for its claims (:func:`autotransfer.store.database.shared_lock`).

    Raises:
        StorageError: a database other than SQLite or PostgreSQL.
    """
    if not lockable(storage_url):
        raise StorageError(
            f"storage '{redact(storage_url)}': a trial budget shared by several workers needs "
            "SQLite or PostgreSQL; use sqlite:///FILE.db or postgresql+psycopg://..."
        )
    return shared_lock(storage_url, f"budget:{study_name}")


class BudgetedStudy(optuna.Study):
    """A study whose :meth:`ask` first claims a slot of the budget.

    Made only by :func:`autotransfer.store.opening.open_for_trials`, the one
    way to open a study for the trial loop (with its heartbeat and the retry of
    lost trials); the loop (:func:`autotransfer.tuning.search.run_trials`)
    refuses any other study. ``study.optimize`` calls ``ask`` once per trial
    (after failing stale trials, before starting the heartbeat), so Optuna's
    loop, heartbeats and callbacks stay as they are; :class:`BudgetSpent` from
    ``ask`` ends the loop before any trial is created.
    """

    def __init__(
        self,
        study_name: str,
        storage: optuna.storages.BaseStorage,
        sampler: optuna.samplers.BaseSampler,
        pruner: optuna.pruners.BasePruner,
        lock: Lock,
    ) -> None:
        super().__init__(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        self._budget_lock = lock

    def target(self) -> int | None:
        """The study's target total (``target_trials``), or None for no target."""
        value = self.user_attrs.get(TARGET_ATTR)
        return None if value is None else int(value)

    def set_target(self, n_more: int | None) -> int | None:
        """Set the target to ``n_more`` trials more than the study has settled
        now (None: no target); returns the new target. Waiting trials (retries,
        enqueued ones) are not settled: they are the first of the ``n_more``."""
        with self._budget_lock():
            trials = self.get_trials(deepcopy=False)
            owed = {_slot(t) for t in trials if t.state == TrialState.WAITING}
            settled = {_slot(t) for t in trials if t.state in COUNTED_STATES} - owed
            target = None if n_more is None else len(settled) + n_more
            self.set_user_attr(TARGET_ATTR, target)
        return target

    def ask(self, fixed_distributions: dict[str, BaseDistribution] | None = None) -> optuna.Trial:
        with self._budget_lock():
            trials = self.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            target = self.target()
            if not waiting and target is not None and used_slots(trials) >= target:
                raise BudgetSpent(f"study '{self.study_name}' has its {target} trials")
            return super().ask(fixed_distributions)
