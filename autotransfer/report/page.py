"""A study as one static HTML page that works offline.

:func:`render_report` is a pure function of the study (it only reads the
storage): the study summary, the best trial's test metrics per class and its
confusion matrix, the optimisation history, parameter importances,
validation accuracy per backbone, the learning curves (where pruning stopped a
trial), parallel coordinates over the searched parameters and the trials table.
plotly.js is embedded once, inline, so the page needs no network.

Long because the page is one self-contained offline document, assembled here
from its sections.
"""

from __future__ import annotations

import html
import math
import warnings
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.trial import TrialState

from autotransfer._version import __version__
from autotransfer.store.records import (
    BEST_EPOCH_ATTR,
    DEVICE_ATTR,
    EPOCHS_RUN_ATTR,
    FAIL_REASON_ATTR,
    FROZEN_BLOCKS_ATTR,
    N_BLOCKS_ATTR,
    PRUNED_AT_EPOCH_ATTR,
    SECONDS_ATTR,
    SPEC_ATTR,
    VAL_ACCURACY_ATTR,
    VAL_F1_ATTR,
)
from autotransfer.store.studies import test_metrics
from autotransfer.store.summary import (
    best_per_backbone,
    best_trial,
    device_label,
    trial_records,
)

# Parameters shown in the parallel-coordinates plot, in this order, when searched.
PARALLEL_PARAMS = ("backbone", "freeze", "lr", "alpha")
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #666; } .note { background: #fff8e1; border-left: 4px solid #f0b400;
        padding: 0.6em 1em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
.scroll { overflow-x: auto; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.best td { background: #e8f5e9; font-weight: 600; }
tr.PRUNED td { color: #8a6d00; } tr.FAIL td { color: #b00020; }
dl.kv { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.kv dt { font-weight: 600; } dl.kv dd { margin: 0; }
"""


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return _esc(v)


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


class _Figures:
    """Turns figures into HTML divs; the first one carries plotly.js inline."""

    def __init__(self) -> None:
        self._js_done = False

    def html(self, fig: Any, div_id: str) -> str:
        fig.update_layout(template="plotly_white", margin={"t": 50, "l": 60, "r": 30, "b": 50})
        out = fig.to_html(
            full_html=False,
            include_plotlyjs=not self._js_done,
            include_mathjax=False,
            div_id=div_id,
            config=_PLOT_CONFIG,
        )
        self._js_done = True
        return out


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call an optuna.visualization function without its experimental/user warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _backbone_key(b: Any) -> str:
    """``family:model@weights`` from a stored spec's backbone entry (the ``backbone`` param)."""
    if isinstance(b, dict) and "name" in b:
        return f"{b['name']}@{b['weights']}" if b.get("weights") else str(b["name"])
    return str(b)


def _summary(
    study: optuna.Study,
    trials: list[optuna.trial.FrozenTrial],
    best: optuna.trial.FrozenTrial | None,
) -> str:
    raw_spec = study.user_attrs.get(SPEC_ATTR) or {}
    counts = Counter(t.state.name for t in trials)
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none"
    rows = [
        ("study", study.study_name),
        ("spec", raw_spec.get("name", "(not an autotransfer study: no spec stored)")),
        ("data", (raw_spec.get("data") or {}).get("path") if raw_spec else None),
        ("backbones searched", ", ".join(
            _backbone_key(b)
            for b in ((raw_spec.get("search") or {}).get("backbones") or [])
        )),
        ("trials", f"{len(trials)} ({states})"),
    ]
    parts = ['<dl class="kv">']
    parts += [f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in rows if v not in (None, "")]
    parts.append("</dl>")

    if best is None:
        parts.append(_note("No trial has completed yet: there is no best trial."))
        return "\n".join(parts)
    a = best.user_attrs
    p = best.params
    best_rows = [
        ("best trial", f"#{best.number}"),
        ("val accuracy", _num(best.value, ".4f")),
        ("val macro F1", _num(a.get(VAL_F1_ATTR), ".4f")),
        ("backbone", p.get("backbone")),
        ("freeze", f"{a.get(FROZEN_BLOCKS_ATTR)}/{a.get(N_BLOCKS_ATTR)} blocks "
                   f"(fraction {_num(p.get('freeze'), '.2f')})"
         if a.get(FROZEN_BLOCKS_ATTR) is not None else _num(p.get("freeze"), ".2f")),
        ("lr", _num(p.get("lr"), ".2e")),
        ("trunk lr scale", _num(p.get("trunk_lr_scale", 1.0), ".2g")),
        ("weight decay", _num(p.get("weight_decay"), ".1e")),
        ("batch size", p.get("batch_size")),
        ("α", _num(p.get("alpha"), ".3f")),
        ("probe fraction", _num(p.get("probe_fraction", 0.0), ".2f")),
        ("best epoch", a.get(BEST_EPOCH_ATTR)),
    ]
    test = test_metrics(study).get(str(best.number))
    if test:
        best_rows += [
            ("test accuracy", _num(test.get("accuracy"), ".4f")),
            ("test macro F1", _num(test.get("macro_f1"), ".4f")),
            ("test set size", test.get("n")),
        ]
    else:
        best_rows.append(("test metrics", "not computed yet (the search computes them at its end)"))
    parts.append("<h3>Best trial</h3>")
    parts.append('<dl class="kv">')
    parts += [f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in best_rows if v not in (None, "")]
    parts.append("</dl>")
    return "\n".join(parts)


def _test_set(study: optuna.Study, best: optuna.trial.FrozenTrial | None, figs: _Figures) -> str:
    """The best trial's test metrics per class, and its confusion matrix."""
    if best is None:
        return _note("No completed trial yet: there is no best trial to test.")
    test = test_metrics(study).get(str(best.number))
    if not test:
        return _note("Test metrics are not computed yet (the search computes them at its end).")
    classes, per_class, confusion = test.get("classes"), test.get("per_class"), test.get(
        "confusion")
    if not classes or not per_class or not confusion:
        return _note(
            "This study's test metrics were stored before per-class figures existed: "
            "accuracy and macro F1 only (see the summary)."
        )
    import plotly.graph_objects as go

    rows = ['<div class="scroll"><table id="per-class-table"><thead><tr>'
            '<th class="l">class</th><th>precision</th><th>recall</th><th>F1</th>'
            "<th>support</th></tr></thead><tbody>"]
    for name in classes:
        m = per_class.get(name, {})
        rows.append(
            f'<tr><td class="l">{_esc(name)}</td><td>{_num(m.get("precision"), ".4f")}</td>'
            f'<td>{_num(m.get("recall"), ".4f")}</td><td>{_num(m.get("f1"), ".4f")}</td>'
            f'<td>{_esc(m.get("support"))}</td></tr>'
        )
    rows.append("</tbody></table></div>")
    labels = [str(c) for c in classes]
    totals = [max(1, sum(row)) for row in confusion]
    share = [[v / t for v in row] for row, t in zip(confusion, totals, strict=True)]
    fig = go.Figure(
        go.Heatmap(
            z=confusion,
            x=labels,
            y=labels,
            customdata=share,
            colorscale="Blues",
            texttemplate="%{z}" if len(labels) <= 25 else None,
            hovertemplate="true %{y}, predicted %{x}: %{z} (%{customdata:.1%} of %{y})"
            "<extra></extra>",
            colorbar={"title": {"text": "examples"}},
            xgap=1,
            ygap=1,
        )
    )
    side = min(900, 200 + 40 * len(labels))
    fig.update_layout(
        title=f"Confusion matrix of trial {best.number} on the test set "
        f"({test.get('n')} examples)",
        xaxis={"title": {"text": "predicted class"}, "type": "category"},
        yaxis={"title": {"text": "true class"}, "type": "category", "autorange": "reversed"},
        height=side,
        width=side + 120,
    )
    intro = (
        f"<p>Trial {best.number} (the best) on the held-out test set: accuracy "
        f"{_num(test.get('accuracy'), '.4f')}, macro F1 {_num(test.get('macro_f1'), '.4f')}.</p>"
    )
    return intro + "".join(rows) + figs.html(fig, "plot-confusion")


def _history(study: optuna.Study, complete: list[Any], figs: _Figures) -> str:
    if not complete:
        return _note("No completed trial yet: nothing to plot.")
    from optuna.visualization import plot_optimization_history

    fig = _quiet(plot_optimization_history, study, target_name="val accuracy")
    fig.update_layout(title="Optimisation history")
    return figs.html(fig, "plot-history")


def _importances(study: optuna.Study, complete: list[Any], figs: _Figures) -> str:
    if len(complete) < 2:
        return _note(
            f"Parameter importances need at least 2 completed trials; "
            f"this study has {len(complete)}."
        )
    from optuna.importance import get_param_importances
    from optuna.visualization import plot_param_importances

    try:
        importances = _quiet(get_param_importances, study)
    except (ValueError, RuntimeError) as exc:
        return _note(f"Parameter importances could not be computed: {exc}")
    if not importances:
        return _note(
            "Parameter importances could not be computed: no parameter varies "
            "across the completed trials."
        )
    fig = _quiet(plot_param_importances, study, target_name="val accuracy")
    fig.update_layout(title="Parameter importances (fANOVA, on val accuracy)")
    caveat = (
        _note(f"Based on only {len(complete)} completed trials: indicative at best.")
        if len(complete) < 10 else ""
    )
    return figs.html(fig, "plot-importances") + caveat


def _per_backbone(records: list[dict[str, Any]], figs: _Figures) -> str:
    import plotly.graph_objects as go

    by_backbone: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        b = r["params"].get("backbone")
        if b is not None and r[VAL_ACCURACY_ATTR] is not None:
            by_backbone.setdefault(str(b), []).append(r)
    if not by_backbone:
        return _note("No trial has reported a validation accuracy yet.")
    fig = go.Figure()
    colours = {"COMPLETE": "#1f77b4", "PRUNED": "#b00020", "RUNNING": "#2ca02c"}
    rows_all = [r for rows in by_backbone.values() for r in rows]
    for state in ("COMPLETE", "PRUNED", "RUNNING"):
        rows = sorted((r for r in rows_all if r["state"] == state),
                      key=lambda r: str(r["params"]["backbone"]))
        if not rows:
            continue
        fig.add_trace(
            go.Box(
                name=state.lower(),
                x=[str(r["params"]["backbone"]) for r in rows],
                y=[r[VAL_ACCURACY_ATTR] for r in rows],
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                text=[f"trial {r['number']}" for r in rows],
                hovertemplate="%{text}<br>%{x}<br>val acc %{y:.4f}<extra>" + state.lower()
                + "</extra>",
                marker={"color": colours[state], "size": 7},
                line={"color": colours[state]},
            )
        )
    fig.update_layout(
        title="Best validation accuracy of each trial, by backbone",
        yaxis_title="val accuracy",
        boxmode="group",
        legend_title_text="trial state",
    )
    best = best_per_backbone(records)
    listing = ", ".join(f"{_esc(b)} {v:.4f}" for b, v in sorted(best.items(), key=lambda x: -x[1]))
    return figs.html(fig, "plot-backbones") + f"<p>Best per backbone: {listing}.</p>"


def _curves(trials: list[optuna.trial.FrozenTrial], figs: _Figures) -> str:
    import plotly.graph_objects as go

    with_values = [t for t in trials if t.intermediate_values]
    if not with_values:
        return _note("No trial has reported an epoch yet.")
    colors = {"COMPLETE": "#1f77b4", "PRUNED": "#b00020", "RUNNING": "#2ca02c", "FAIL": "#7f7f7f"}
    fig = go.Figure()
    for t in with_values:
        steps = sorted(t.intermediate_values)
        ys = [t.intermediate_values[s] for s in steps]
        state = t.state.name
        label = f"trial {t.number} ({state.lower()}"
        if state == "PRUNED":
            label += f" at epoch {t.user_attrs.get(PRUNED_AT_EPOCH_ATTR, steps[-1])}"
        label += ")"
        symbols = ["circle"] * (len(steps) - 1) + ["x" if state == "PRUNED" else "circle"]
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=ys,
                mode="lines+markers",
                name=label,
                line={"color": colors.get(state, "#9467bd"), "width": 1.5},
                marker={"symbol": symbols, "size": [6] * (len(steps) - 1) + [11]},
                hovertemplate=f"{_esc(label)}<br>epoch %{{x}}<br>val acc %{{y:.4f}}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Validation accuracy per epoch (red ✕: where the pruner stopped a trial)",
        xaxis_title="epoch",
        yaxis_title="val accuracy",
        xaxis={"dtick": 1},
    )
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    stops = [
        f"trial {t.number} at epoch {t.user_attrs.get(PRUNED_AT_EPOCH_ATTR, t.last_step)}"
        for t in pruned
    ]
    text = f"Pruned: {', '.join(stops)}." if stops else "No trial was pruned."
    return figs.html(fig, "plot-curves") + f"<p>{_esc(text)}</p>"


def _parallel(study: optuna.Study, complete: list[Any], figs: _Figures) -> str:
    if not complete:
        return _note("No completed trial yet: nothing to plot.")
    from optuna.visualization import plot_parallel_coordinate

    searched = set().union(*(t.params for t in complete))
    params = [p for p in PARALLEL_PARAMS if p in searched]
    if not params:
        return _note("None of backbone, freeze, lr, alpha was searched.")
    fig = _quiet(plot_parallel_coordinate, study, params=params, target_name="val accuracy")
    fig.update_layout(title="Parallel coordinates (completed trials)")
    return figs.html(fig, "plot-parallel")


def _table(records: list[dict[str, Any]], best: int | None) -> str:
    cols = [
        ("#", ""), ("state", "l"), ("backbone", "l"), ("freeze", ""), ("lr", ""), ("wd", ""),
        ("α", ""), ("batch", ""), ("val acc", ""), ("val F1", ""), ("best ep", ""),
        ("epochs", ""), ("pruned at", ""), ("time", ""), ("device", "l"), ("fail reason", "l"),
    ]
    out = ['<div class="scroll"><table id="trials-table"><thead><tr>']
    out += [f'<th class="{c}">{_esc(n)}</th>' for n, c in cols]
    out.append("</tr></thead><tbody>")
    for r in records:
        p = r["params"]
        k, n = r[FROZEN_BLOCKS_ATTR], r[N_BLOCKS_ATTR]
        freeze = f"{k}/{n}" if k is not None else _num(p.get("freeze"), ".2f")
        cells = [
            str(r["number"]) + (" ◀ best" if r["number"] == best else ""),
            r["state"].lower(),
            p.get("backbone", ""),
            freeze,
            _num(p.get("lr"), ".2e"),
            _num(p.get("weight_decay"), ".1e"),
            _num(p.get("alpha"), ".3f"),
            p.get("batch_size", ""),
            _num(r[VAL_ACCURACY_ATTR], ".4f"),
            _num(r[VAL_F1_ATTR], ".4f"),
            r[BEST_EPOCH_ATTR],
            r[EPOCHS_RUN_ATTR],
            r[PRUNED_AT_EPOCH_ATTR],
            f"{r[SECONDS_ATTR]:.0f} s" if r[SECONDS_ATTR] is not None else "",
            device_label(r[DEVICE_ATTR]),
            r[FAIL_REASON_ATTR],
        ]
        cls = r["state"] + (" best" if r["number"] == best else "")
        out.append(f'<tr class="{_esc(cls)}">')
        out += [f'<td class="{c}">{_esc(v)}</td>' for v, (_, c) in zip(cells, cols, strict=True)]
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def render_report(study: optuna.Study) -> str:
    """The whole report as one HTML document (plotly.js inline; no network needed)."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    records = trial_records(study)
    top = best_trial(study)
    best = top.number if top is not None else None
    figs = _Figures()
    sections = [
        ("summary", "Summary", _summary(study, trials, top)),
        ("test", "Test set: per class and confusion matrix", _test_set(study, top, figs)),
        ("history", "Optimisation history", _history(study, complete, figs)),
        ("importances", "Parameter importances", _importances(study, complete, figs)),
        ("backbones", "Accuracy per backbone", _per_backbone(records, figs)),
        ("curves", "Learning curves and pruning", _curves(trials, figs)),
        ("parallel", "Parallel coordinates", _parallel(study, complete, figs)),
        ("trials", "Trials", _table(records, best) if records else _note("No trials yet.")),
    ]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>autotransfer report: {_esc(study.study_name)}</h1>",
        f'<p class="meta">Generated {now} by autotransfer {_esc(__version__)}, '
        f"optuna {_esc(optuna.__version__)}.</p>",
    ]
    for sid, title, content in sections:
        body.append(f'<section id="{sid}"><h2>{_esc(title)}</h2>\n{content}\n</section>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>autotransfer report: {_esc(study.study_name)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
