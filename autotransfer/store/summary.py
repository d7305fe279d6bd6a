"""Trial records for tables and JSON: one flat dict per trial."""

from __future__ import annotations

from typing import Any

import optuna
from rich.table import Table

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
    PRUNED_AT_EPOCH_ATTR,
    RESUMED_FROM_EPOCH_ATTR,
    RETRY_OF_ATTR,
    SECONDS_ATTR,
    VAL_ACCURACY_ATTR,
    VAL_F1_ATTR,
)

ROW_ATTRS = (
    FROZEN_BLOCKS_ATTR, N_BLOCKS_ATTR, VAL_ACCURACY_ATTR, VAL_F1_ATTR, BEST_EPOCH_ATTR,
    EPOCHS_RUN_ATTR, PRUNED_AT_EPOCH_ATTR, FAIL_REASON_ATTR, FAIL_MESSAGE_ATTR, RETRY_OF_ATTR,
    RESUMED_FROM_EPOCH_ATTR, SECONDS_ATTR, CHECKPOINT_ATTR, DEVICE_ATTR, FEATURES_CACHED_ATTR,
    FEATURE_VIEWS_ATTR, PREFIX_BLOCKS_ATTR,
)
"""The trial attributes each row carries, under their own names (``trials --json``)."""


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


def _f(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


FAIL_MESSAGE_WIDTH = 48
"""A failed trial's message is cut to this many characters in the table (JSON: whole)."""


def _short(text: str | None, width: int = FAIL_MESSAGE_WIDTH) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def trials_table(rows: list[dict[str, Any]], best: int | None = None, title: str = "") -> Table:
    """The trials as a table; a ``failure`` column (shortened ``fail_message``)
    when a trial failed."""
    table = Table(title=title or None, title_justify="left")
    failures = any(r.get(FAIL_MESSAGE_ATTR) for r in rows)
    for col, justify in [
        ("#", "right"), ("state", "left"), ("backbone", "left"), ("freeze", "right"),
        ("lr", "right"), ("α", "right"), ("batch", "right"), ("val acc", "right"),
        ("val F1", "right"), ("best ep", "right"), ("pruned at", "right"), ("time", "right"),
        *([("failure", "left")] if failures else []),
    ]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        p = r["params"]
        k, n = r[FROZEN_BLOCKS_ATTR], r[N_BLOCKS_ATTR]
        state = r["state"] if r["state"] != "FAIL" else f"FAIL ({r[FAIL_REASON_ATTR] or '?'})"
        mark = " ◀ best" if r["number"] == best else ""
        table.add_row(
            str(r["number"]),
            state + mark,
            str(p.get("backbone", "")),
            f"{k}/{n}" if k is not None else "",
            _f(p.get("lr"), ".1e"),
            _f(p.get("alpha"), ".2f"),
            str(p.get("batch_size", "")),
            _f(r[VAL_ACCURACY_ATTR], ".3f"),
            _f(r[VAL_F1_ATTR], ".3f"),
            str(r[BEST_EPOCH_ATTR] or ""),
            str(r[PRUNED_AT_EPOCH_ATTR] or ""),
            f"{r[SECONDS_ATTR]:.0f}s" if r[SECONDS_ATTR] is not None else "",
            *([_short(r.get(FAIL_MESSAGE_ATTR))] if failures else []),
        )
    return table


def best_per_backbone(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Best validation accuracy reached by each backbone (pruned trials included)."""
    best: dict[str, float] = {}
    for r in rows:
        b, v = r["params"].get("backbone"), r[VAL_ACCURACY_ATTR]
        if b is not None and v is not None:
            best[b] = max(best.get(b, 0.0), v)
    return best
