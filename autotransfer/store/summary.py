"""Trial records for tables, JSON and the report: one flat dict per trial."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from autotransfer.store.records import (
    BEST_EPOCH_ATTR,
    CHECKPOINT_ATTR,
    DEVICE_ATTR,
    EPOCHS_RUN_ATTR,
    FAIL_MESSAGE_ATTR,
    FAIL_REASON_ATTR,
    FEATURE_VIEWS_ATTR,
    FEATURES_CACHED_ATTR,
    FROZEN_BLOCKS_ATTR,
    N_BLOCKS_ATTR,
    PREFIX_BLOCKS_ATTR,
    PROBE_EPOCHS_ATTR,
    PRUNED_AT_EPOCH_ATTR,
    RESUMED_FROM_EPOCH_ATTR,
    RETRY_OF_ATTR,
    SECONDS_ATTR,
    VAL_ACCURACY_ATTR,
    VAL_F1_ATTR,
    VAL_LOSS_ATTR,
)

ROW_ATTRS = (
    FROZEN_BLOCKS_ATTR, N_BLOCKS_ATTR, VAL_ACCURACY_ATTR, VAL_F1_ATTR, BEST_EPOCH_ATTR,
    EPOCHS_RUN_ATTR, PRUNED_AT_EPOCH_ATTR, FAIL_REASON_ATTR, FAIL_MESSAGE_ATTR, RETRY_OF_ATTR,
    RESUMED_FROM_EPOCH_ATTR, SECONDS_ATTR, CHECKPOINT_ATTR, DEVICE_ATTR, FEATURES_CACHED_ATTR,
    FEATURE_VIEWS_ATTR, PREFIX_BLOCKS_ATTR, PROBE_EPOCHS_ATTR, VAL_LOSS_ATTR,
)
"""The trial attributes each row carries, under their own names (``trials --json``)."""


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The study's best COMPLETE trial, or None: the highest value (validation
    accuracy); among equal values the lowest validation loss (``val_loss``; trials
    stored before it was recorded come after those with one), then the earliest.
    Every reader of "the best trial" (search, export, trials, report) uses this,
    not ``study.best_trial``, which takes the first of a tie: with a validation set
    of a few dozen examples, ties are common and the loss separates them."""
    complete = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None
    ]
    if not complete:
        return None

    def rank(t: optuna.trial.FrozenTrial) -> tuple[float, float, int]:
        loss = t.user_attrs.get(VAL_LOSS_ATTR)
        return (-float(t.value), float("inf") if loss is None else float(loss), t.number)

    return min(complete, key=rank)


def trial_records(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {
            "number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params)
        }
        row.update((name, t.user_attrs.get(name)) for name in ROW_ATTRS)
        rows.append(row)
    return rows


def device_label(device: dict[str, Any] | None) -> str:
    """``cuda:0 (GPU 2, NVIDIA H100, bf16)`` or ``cpu (fp32)``: a trial's
    ``device`` attribute in words."""
    if not device:
        return ""
    parts = []
    if device.get("gpu_id") is not None:
        parts.append(f"GPU {device['gpu_id']}")
    if device.get("gpu"):
        parts.append(str(device["gpu"]))
    parts.append(str(device.get("precision", "?")))
    if device.get("channels_last"):
        parts.append("channels_last")
    return f"{device.get('device', '?')} ({', '.join(parts)})"


def best_per_backbone(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Best validation accuracy reached by each backbone (pruned trials included)."""
    best: dict[str, float] = {}
    for r in rows:
        b, v = r["params"].get("backbone"), r[VAL_ACCURACY_ATTR]
        if b is not None and v is not None:
            best[b] = max(best.get(b, 0.0), v)
    return best
