"""Every use of Optuna's private API, in one place, each with its reason.

Optuna has no public way to do these; each was checked against Optuna 5.0.0
(the upper bound of the ``optuna`` range in pyproject.toml), and
tests/test_optuna_api.py fails when one of them is gone or another module of
the package reaches into Optuna's private names. Raise that bound only once
the test passes on the newer Optuna.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial

OPTIMIZE_LOGGER = "optuna.study._optimize"
"""The logger of Optuna's ``optimize`` loop (its module name; Optuna 5.0.0): the
loop logs an interrupted or failed trial there, which
:mod:`autotransfer.tuning.interrupts` and :mod:`autotransfer.tuning.progress`
replace with their own line."""


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage (``Study._storage``; Optuna 5.0.0): trial ids and
    state are set through it for trials this process does not run (lost ones)."""
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in the storage (``_trial_id``; Optuna 5.0.0); the storage
    API takes ids, a trial shows only its number."""
    return trial._trial_id


def heartbeat_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats (Optuna 5.0.0 has
    ``is_heartbeat_enabled`` only in the private ``optuna.storages._heartbeat``)."""
    get_interval = getattr(storage_of(study), "get_heartbeat_interval", None)
    return get_interval is not None and get_interval() is not None


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Ids of the study's running trials whose heartbeat is older than the grace
    period (``_get_stale_trial_ids``; Optuna 5.0.0). The public
    ``optuna.storages.fail_stale_trials`` fails them before we can record why."""
    storage = storage_of(study)
    return list(storage._get_stale_trial_ids(study._study_id))  # type: ignore[attr-defined]


def grace_period(study: optuna.Study) -> Any:
    """The storage's heartbeat grace period in seconds, or None: Optuna 5.0.0
    wraps an ``RDBStorage`` in ``_CachedStorage`` (``_backend``), which does not
    show it."""
    storage = storage_of(study)
    return getattr(getattr(storage, "_backend", storage), "grace_period", None)
