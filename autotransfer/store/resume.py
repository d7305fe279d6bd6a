"""Per-epoch resumable state of a running trial, kept in the artifact store.

After every epoch the trial's whole training state (:meth:`Trainer.state_dict`:
weights, optimiser, scheduler, random generators, epoch, best epoch and its
weights, reference loss, micro-batch size, reported values) is written to the
study's artifact store, the one place every worker can reach, and its id is
recorded in the trial's user attribute ``resume_state`` (``resume_epoch``: the
epoch it holds). The state it replaces is deleted, so one state per running
trial is kept. A trial queued again after a fault (see :mod:`autotransfer.store.recovery`)
inherits these attributes and continues at the next epoch.

When the trial ends (complete, pruned, failed) its state is deleted; its best
checkpoint stays, as before. Only a trial that is interrupted or lost keeps it,
for its retry.

The artifact store writes atomically (:class:`storage.AtomicFileSystemArtifactStore`)
and the attribute moves only once the write is whole, so a crash or a full disk
mid-write leaves the previous state as the recorded one. States are read with
``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts.exceptions import ArtifactNotFound

from autotransfer.store.checkpoints import ARTIFACT_ID, check_artifact_id
from autotransfer.store.records import RESUME_EPOCH_ATTR, RESUME_STATE_ATTR
from autotransfer.store.storage import ArtifactStore


def save_epoch_state(trial: optuna.Trial, state: dict[str, Any], store: ArtifactStore) -> str:
    """Write ``state`` (a :meth:`Trainer.state_dict`) as the trial's resumable
    state, then delete the state it replaces; returns the new artifact id."""
    artifact_id = f"resume-{uuid.uuid4()}"
    with tempfile.TemporaryDirectory(prefix="autotransfer-resume-") as tmp:
        path = Path(tmp) / "state.pt"
        torch.save(state, path)
        with open(path, "rb") as f:
            store.write(artifact_id, f)
    previous = trial.user_attrs.get(RESUME_STATE_ATTR)
    try:
        trial.set_user_attr(RESUME_STATE_ATTR, artifact_id)
        trial.set_user_attr(RESUME_EPOCH_ATTR, int(state["epoch"]))
    except BaseException:  # e.g. SIGTERM right now: do not leave an unrecorded state
        if trial.user_attrs.get(RESUME_STATE_ATTR) != artifact_id:
            drop_artifact(store, artifact_id)
        raise
    if previous and previous != artifact_id:
        check_artifact_id(trial.number, previous)
        drop_artifact(store, previous)
    return artifact_id


def load_epoch_state(trial: optuna.Trial, store: ArtifactStore) -> dict[str, Any] | None:
    """The resumable state the trial inherited (it re-runs an interrupted or
    lost trial), or None: none recorded, or gone from the store."""
    artifact_id = trial.user_attrs.get(RESUME_STATE_ATTR)
    if not artifact_id:
        return None
    check_artifact_id(trial.number, artifact_id)
    try:
        with store.open_reader(artifact_id) as f:
            return read_epoch_state(f)
    except ArtifactNotFound:
        return None


def read_epoch_state(f: Any) -> dict[str, Any]:
    """An epoch state from a file object, wherever it was saved: its tensors
    are mapped to the CPU (a state a GPU worker wrote loads on a machine
    without one; the random generators' states must be CPU tensors anyway),
    and ``Trainer.load_state_dict`` copies them to the trainer's device."""
    return torch.load(f, map_location="cpu", weights_only=True)


def drop_artifact(store: ArtifactStore, artifact_id: Any) -> None:
    """Delete an artifact if it is there (a well-formed id only)."""
    if isinstance(artifact_id, str) and ARTIFACT_ID.fullmatch(artifact_id):
        try:
            store.remove(artifact_id)
        except ArtifactNotFound:
            pass
