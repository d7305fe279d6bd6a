"""Trials of lost or interrupted workers: fail them, and queue them again.

The study that runs trials has Optuna heartbeats (:func:`heartbeat`, given to
:func:`autotransfer.store.opening.open_for_trials`): while a trial runs, a thread
records its heartbeat every ``heartbeat_interval`` seconds. A trial whose
heartbeat is older than ``grace_period`` belongs to a worker that died
(SIGKILL, a lost machine). :func:`recover_lost_trials` fails such trials, with
``fail_reason`` ``worker_lost``, and :class:`RetryStaleTrial` queues each one
again (once, by default) with the same parameters. A worker calls it before
its first trial and after each trial, so a resumed search retries the lost
trials before it starts new ones; Optuna's own check, before each trial, uses
the same callback.

A trial on *this* machine whose worker process no longer exists is failed at
once, without waiting for the grace period: each trial records its worker
(machine, process id and start time) in the user attribute ``worker``.

An interrupted trial (SIGTERM, Ctrl-C) is queued again by the interrupted worker
itself (:func:`requeue_interrupted`), before the trial is marked failed: one
step, in one process, so several workers resuming at once cannot queue it
twice. Optuna's retry callback skips interrupted trials; interruptions do not
count against ``max_retry``.

The queued copy carries the trial's last epoch state (``resume_state``, see
:mod:`autotransfer.store.resume`), so it continues from there.
"""

from __future__ import annotations

import copy
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from autotransfer.spec.model import RecoverySpec
from autotransfer.store.optuna_internals import (
    grace_period,
    heartbeat_enabled,
    stale_trial_ids,
    storage_of,
    trial_id,
)
from autotransfer.store.records import (
    CARRIED_ATTRS,
    FAIL_MESSAGE_ATTR,
    FAIL_REASON_ATTR,
    FAILED_TRIAL_ATTR,
    INTERRUPTED_ATTR,
    LOST_REASON,
    REQUEUED_ATTR,
    RESUME_STATE_ATTR,
    RETRY_HISTORY_ATTR,
    RETRY_OF_ATTR,
    WORKER_ATTR,
)
from autotransfer.store.resume import drop_artifact
from autotransfer.store.storage import ArtifactStore, Heartbeat


def _quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an Optuna API marked experimental without its warning on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return fn(*args, **kwargs)


def _queue_copy(study: optuna.Study, trial: FrozenTrial, system_attrs: dict[str, Any]) -> None:
    """Add a WAITING trial with ``trial``'s parameters and its epoch state,
    unless a copy of it exists already (two workers that both saw it lost)."""
    trials = study.get_trials(deepcopy=False)
    if any(t.user_attrs.get(RETRY_OF_ATTR) == trial.number for t in trials):
        return
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k in CARRIED_ATTRS}
    user_attrs[RETRY_OF_ATTR] = trial.number
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
        )
    )


class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of heartbeat-stale trials, carrying the epoch state.

    Like :class:`optuna.storages.RetryHeartbeatStaleTrialCallback` (same system
    attributes ``failed_trial`` and ``retry_history``, so its
    ``retried_trial_number`` works), except that the copy gets only the user
    attributes that say where to resume (not the lost trial's ``fail_reason``
    and the like), and a trial already queued by :func:`requeue_interrupted` is
    not queued twice.

    Args:
        max_retry: how many times one trial is retried.
    """

    def __init__(self, max_retry: int = 1) -> None:
        _quiet(super().__init__, max_retry=max_retry)
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(REQUEUED_ATTR):
            return
        system_attrs: dict[str, Any] = {
            FAILED_TRIAL_ATTR: trial.number,
            RETRY_HISTORY_ATTR: [],
            **copy.deepcopy(trial.system_attrs),
        }
        system_attrs[RETRY_HISTORY_ATTR].append(trial.number)
        if self.max_retry is not None and self.max_retry < len(system_attrs[RETRY_HISTORY_ATTR]):
            return
        _queue_copy(study, trial, system_attrs)


def heartbeat(recovery: RecoverySpec) -> Heartbeat:
    """The heartbeat of a study that runs trials, as ``recovery`` says: a lost
    trial is failed after ``grace_period`` and queued again by
    :class:`RetryStaleTrial` (at most ``max_retry`` times)."""
    return Heartbeat(
        interval=recovery.heartbeat_interval,
        grace_period=recovery.grace_period,
        stale_trial_callback=RetryStaleTrial(recovery.max_retry),
    )


def requeue_interrupted(trial: optuna.Trial, signame: str) -> None:
    """Mark the running ``trial`` as interrupted by ``signame`` and queue it again.

    Called by the interrupted worker while the trial is still RUNNING: the copy
    is added, then the trial is marked ``requeued`` (the heartbeat retry skips
    it). Interruptions keep the trial's retry history as it was.
    """
    trial.set_user_attr(INTERRUPTED_ATTR, signame)
    frozen = trial.storage.get_trial(trial_id(trial))
    carried = (FAILED_TRIAL_ATTR, RETRY_HISTORY_ATTR)
    keep = {k: v for k, v in frozen.system_attrs.items() if k in carried}
    # The copy stands in for the trial in the study's budget (autotransfer.store.budget).
    keep.setdefault(FAILED_TRIAL_ATTR, frozen.number)
    _queue_copy(trial.study, frozen, copy.deepcopy(keep))
    trial.set_user_attr(REQUEUED_ATTR, True)


# --------------------------------------------------------------- worker identity


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii").strip()
    except OSError:
        return ""


def machine_id() -> str:
    """This machine (and PID namespace): host name, boot id, PID namespace."""
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = ""
    return f"{socket.gethostname()}/{_read('/proc/sys/kernel/random/boot_id')}/{pid_ns}"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), else None."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else None


def worker_identity() -> dict[str, Any]:
    """What a trial records as its ``worker`` user attribute."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "machine": machine_id(),
        "started": _process_start(os.getpid()),
    }


def worker_is_gone(worker: Any) -> bool:
    """Whether ``worker`` (a ``worker`` attribute) is a process of this machine
    that has exited. Unknown (another machine, not Linux): False."""
    if not isinstance(worker, dict) or worker.get("machine") != machine_id():
        return False
    pid = worker.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    started = worker.get("started")
    now = _process_start(pid)
    # A zombie, or the process id now belongs to a newer process.
    return started is not None and now != started


# --------------------------------------------------------------- lost trials


def recover_lost_trials(
    study: optuna.Study,
    store: ArtifactStore | None = None,
    message: Callable[[str], None] | None = None,
) -> list[int]:
    """Fail the running trials whose worker is lost and queue them again.

    Lost: no heartbeat for ``grace_period`` seconds, or (on this machine) the
    worker process is gone. Each one gets ``fail_reason`` ``worker_lost`` and is
    passed to the storage's stale-trial callback (:class:`RetryStaleTrial`).
    A trial that is not queued again (retries used up) has its epoch state
    deleted from ``store``. Needs a storage opened with heartbeats; returns the
    failed trials' numbers.
    """
    if not heartbeat_enabled(study):
        return []
    storage = storage_of(study)
    stale = set(stale_trial_ids(study))
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    why = {trial_id(t): "no heartbeat" for t in running if trial_id(t) in stale}
    for t in running:
        if trial_id(t) not in why and worker_is_gone(t.user_attrs.get(WORKER_ATTR)):
            why[trial_id(t)] = f"its worker process {t.user_attrs[WORKER_ATTR]['pid']} is gone"
    grace = grace_period(study) or 2 * (storage.get_heartbeat_interval() or 0)
    failed = []
    for lost_id, reason in why.items():
        detail = reason if reason != "no heartbeat" else f"no heartbeat for over {grace}s"
        try:
            storage.set_trial_user_attr(lost_id, FAIL_REASON_ATTR, LOST_REASON)
            storage.set_trial_user_attr(lost_id, FAIL_MESSAGE_ATTR, f"worker lost: {detail}")
            if storage.set_trial_state_values(lost_id, state=TrialState.FAIL):
                failed.append((lost_id, detail))
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker (or the trial itself) finished it first
    callback = storage.get_heartbeat_stale_trial_callback()
    numbers = []
    for lost_id, detail in failed:
        frozen = copy.deepcopy(storage.get_trial(lost_id))
        numbers.append(frozen.number)
        if callback is not None:
            callback(study, frozen)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        again = any(t.user_attrs.get(RETRY_OF_ATTR) == frozen.number for t in waiting)
        if not again and store is not None:
            drop_artifact(store, frozen.user_attrs.get(RESUME_STATE_ATTR))
        if message is not None:
            message(
                f"trial {frozen.number}: worker lost ({detail}): marked FAIL ({LOST_REASON})"
                + ("; queued to run again" if again else "; not retried (retries used up)")
            )
    return numbers


def after_trial(
    store: ArtifactStore | None = None, message: Callable[[str], None] | None = None
) -> Callable[[optuna.Study, FrozenTrial], None]:
    """A ``study.optimize`` callback: recover lost trials before the next trial."""

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        recover_lost_trials(study, store, message)

    return callback
