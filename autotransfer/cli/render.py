"""What commands print on stdout: tables for people, JSON for programs."""

from __future__ import annotations

import json
import sys
from typing import Any

import optuna
from rich.console import Console
from rich.table import Table

from autotransfer.store.records import (
    BEST_EPOCH_ATTR,
    FAIL_MESSAGE_ATTR,
    FAIL_REASON_ATTR,
    FROZEN_BLOCKS_ATTR,
    N_BLOCKS_ATTR,
    PRUNED_AT_EPOCH_ATTR,
    SECONDS_ATTR,
    VAL_ACCURACY_ATTR,
    VAL_F1_ATTR,
)
from autotransfer.store.studies import test_metrics
from autotransfer.store.summary import best_per_backbone, best_trial, trial_records
from autotransfer.tuning.search import SearchOutcome

MAX_CLASSES_SHOWN = 20
"""The search's summary lists the test figures of at most this many classes."""


def _stdout() -> Console:
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False, soft_wrap=False)


def _best(study: optuna.Study) -> int | None:
    best = best_trial(study)
    return None if best is None else best.number


def _f(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


FAIL_MESSAGE_WIDTH = 48
"""A failed trial's message is cut to this many characters in the table (JSON: whole)."""


def _short(text: str | None, width: int = FAIL_MESSAGE_WIDTH) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def trials_table(rows: list[dict[str, Any]], best: int | None = None, title: str = "") -> Table:
    """The trials as a table; a ``failure`` column (shortened ``fail_message``)
    when a trial failed, a ``probe`` column (``probe_fraction``, LP-FT) when a
    trial trained the head alone first."""
    table = Table(title=title or None, title_justify="left")
    failures = any(r.get(FAIL_MESSAGE_ATTR) for r in rows)
    probes = any(r["params"].get("probe_fraction") for r in rows)
    for col, justify in [
        ("#", "right"), ("state", "left"), ("backbone", "left"), ("freeze", "right"),
        *([("probe", "right")] if probes else []),
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
            *([_f(p.get("probe_fraction", 0.0), ".2f")] if probes else []),
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


def print_trials(study: optuna.Study, as_json: bool) -> None:
    rows = trial_records(study)
    if as_json:
        out = {"study": study.study_name, "best_trial": _best(study),
               "test_metrics": test_metrics(study), "trials": rows}
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
        return
    _stdout().print(trials_table(rows, _best(study), title=f"study {study.study_name}"))


def print_search_outcome(outcome: SearchOutcome, as_json: bool) -> None:
    study, best = outcome.study, outcome.best
    rows = trial_records(study)
    per_backbone = best_per_backbone(rows)
    if as_json:
        out = {
            "study": study.study_name,
            "new_trials": outcome.new_trials,
            "best_trial": best.number,
            "best_params": best.params,
            "val_accuracy": best.value,
            "val_f1": best.user_attrs.get(VAL_F1_ATTR),
            "test": outcome.test,
            "best_val_accuracy_per_backbone": per_backbone,
            "trials": rows,
        }
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
        return
    console = _stdout()
    console.print(trials_table(rows, best.number, title=f"study {study.study_name}"))
    p = best.params
    k, n = best.user_attrs.get(FROZEN_BLOCKS_ATTR), best.user_attrs.get(N_BLOCKS_ATTR)
    probe = f"  probe_fraction {p['probe_fraction']:.2f}" if p.get("probe_fraction") else ""
    console.print(
        f"best: trial {best.number}  {p['backbone']}  freeze {k}/{n}{probe}  lr {p['lr']:.2e}  "
        f"α {p['alpha']:.2f}  batch {p['batch_size']}"
    )
    console.print(
        f"  val_acc {best.value:.3f}  val_f1 {best.user_attrs.get(VAL_F1_ATTR, float('nan')):.3f}  "
        f"test_acc {outcome.test['accuracy']:.3f}  test_f1 {outcome.test['macro_f1']:.3f}  "
        f"(test n={outcome.test['n']})"
    )
    per_class = outcome.test.get("per_class") or {}
    if per_class:
        console.print("  test precision / recall / F1 per class:")
        for name, m in list(per_class.items())[:MAX_CLASSES_SHOWN]:
            console.print(
                f"    {name:<24} {m['precision']:.3f} / {m['recall']:.3f} / {m['f1']:.3f}  "
                f"(n={m['support']})"
            )
        if len(per_class) > MAX_CLASSES_SHOWN:
            console.print(
                f"    ... {len(per_class) - MAX_CLASSES_SHOWN} more classes: see "
                "`autotransfer trials --json` or `autotransfer report`"
            )
    console.print("best val_acc per backbone:")
    for name, acc in sorted(per_backbone.items(), key=lambda kv: -kv[1]):
        console.print(f"  {name:<48} {acc:.3f}")
