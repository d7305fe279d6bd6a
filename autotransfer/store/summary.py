"""Trial records for tables and JSON: one flat dict per trial."""

from __future__ import annotations

from typing import Any

import optuna
from rich.table import Table


def trial_records(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": dict(t.params),
                "frozen_blocks": a.get("frozen_blocks"),
                "n_blocks": a.get("n_blocks"),
                "val_accuracy": a.get("val_accuracy"),
                "val_f1": a.get("val_f1"),
                "best_epoch": a.get("best_epoch"),
                "epochs_run": a.get("epochs_run"),
                "pruned_at_epoch": a.get("pruned_at_epoch"),
                "fail_reason": a.get("fail_reason"),
                "retry_of": a.get("retry_of"),
                "resumed_from_epoch": a.get("resumed_from_epoch"),
                "seconds": a.get("seconds"),
                "checkpoint": a.get("checkpoint"),
            }
        )
    return rows


def _f(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def trials_table(rows: list[dict[str, Any]], best: int | None = None, title: str = "") -> Table:
    table = Table(title=title or None, title_justify="left")
    for col, justify in [
        ("#", "right"), ("state", "left"), ("backbone", "left"), ("freeze", "right"),
        ("lr", "right"), ("α", "right"), ("batch", "right"), ("val acc", "right"),
        ("val F1", "right"), ("best ep", "right"), ("pruned at", "right"), ("time", "right"),
    ]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        p = r["params"]
        k, n = r["frozen_blocks"], r["n_blocks"]
        state = r["state"] if r["state"] != "FAIL" else f"FAIL ({r['fail_reason'] or '?'})"
        mark = " ◀ best" if r["number"] == best else ""
        table.add_row(
            str(r["number"]),
            state + mark,
            str(p.get("backbone", "")),
            f"{k}/{n}" if k is not None else "",
            _f(p.get("lr"), ".1e"),
            _f(p.get("alpha"), ".2f"),
            str(p.get("batch_size", "")),
            _f(r["val_accuracy"], ".3f"),
            _f(r["val_f1"], ".3f"),
            str(r["best_epoch"] or ""),
            str(r["pruned_at_epoch"] or ""),
            f"{r['seconds']:.0f}s" if r["seconds"] is not None else "",
        )
    return table


def best_per_backbone(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Best validation accuracy reached by each backbone (pruned trials included)."""
    best: dict[str, float] = {}
    for r in rows:
        b, v = r["params"].get("backbone"), r["val_accuracy"]
        if b is not None and v is not None:
            best[b] = max(best.get(b, 0.0), v)
    return best
