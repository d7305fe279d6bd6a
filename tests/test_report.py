"""``autotransfer report``: the HTML page, checked in a real browser.

The browser test starts Debian's Chromium headless itself and drives it over the
DevTools protocol (websocket-client): it loads the page from a file:// URL and
checks that it loads, that every figure is drawn by plotly.js, that nothing was
fetched from the network and that nothing was logged as an error.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _browser import Browser, browser_or_skip, page_errors, requests_made
from _report_helpers import make_study
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.report.page import render_report

PLOT_IDS = ["plot-confusion", "plot-history", "plot-importances", "plot-backbones",
            "plot-curves", "plot-parallel"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{root / 'study.db'}"
    full = make_study(url, "synthetic", n_trials=12)
    one = make_study(url, "one-trial", n_trials=1, test_metrics=False)
    empty = make_study(url, "empty", n_trials=0)
    return {"root": root, "url": url, "full": full, "one": one, "empty": empty}


@pytest.fixture(scope="module")
def pages(studies: dict[str, Any]) -> dict[str, Path]:
    out = {}
    for key in ("full", "one", "empty"):
        path = studies["root"] / f"{key}.html"
        path.write_text(render_report(studies[key]), encoding="utf-8")
        out[key] = path
    return out


# --------------------------------------------------------------------------- HTML


def test_full_report_has_every_section(pages: dict[str, Path]) -> None:
    page = pages["full"].read_text(encoding="utf-8")
    for section in ("summary", "test", "history", "importances", "backbones", "curves",
                    "parallel", "trials"):
        assert f'<section id="{section}">' in page
    for div in PLOT_IDS:
        assert f'id="{div}"' in page
    # plotly.js is inline, exactly once, and nothing is loaded from elsewhere.
    # (plotly.js mentions CDN URLs for map tiles; the browser test checks none is fetched.)
    assert page.count("* plotly.js v") == 1
    assert re.search(r"<script[^>]*\ssrc=", page) is None
    # The study summary: spec name, counts by state, best trial and its test metrics.
    assert "synthetic" in page and "12 (8 complete, 1 fail, 3 pruned)" in page
    assert "test accuracy</dt><dd>0.9126" in page  # 982 of 1,076
    # The test set per class: a row per class, and the confusion matrix.
    table = page.split('id="per-class-table"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 11  # the header and 10 classes
    # class 1: 99 of its 108 right; predicted 1 109 times (99 right, 10 of class 0).
    assert '<td class="l">1</td><td>0.9083</td><td>0.9167</td><td>0.9124</td><td>108</td>' in (
        table)
    assert "Confusion matrix of trial" in page
    # The table: one row per trial; the pruned ones say when.
    assert page.count("<tr class=") == 12
    assert "Pruned: trial 3 at epoch 2, trial 7 at epoch 2, trial 11 at epoch 2." in page


def test_report_says_why_a_plot_is_missing(pages: dict[str, Path]) -> None:
    one = pages["one"].read_text(encoding="utf-8")
    assert "Parameter importances need at least 2 completed trials; this study has 1." in one
    assert "test metrics</dt><dd>not computed yet" in one
    empty = pages["empty"].read_text(encoding="utf-8")
    assert "No trial has completed yet: there is no best trial." in empty
    assert "plotly" not in empty.lower()  # nothing to draw, no 4 MB of JavaScript


def test_render_report_only_reads_the_storage(studies: dict[str, Any]) -> None:
    db = studies["root"] / "study.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    render_report(studies["one"])
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_cli_report(studies: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", "--storage", studies["url"], "--study-name", "one-trial",
                              str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote report of study 'one-trial' (1 trials)" in res.output
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left

    # Bad input: one line, exit 2.
    for args, msg in [
        ([str(out)], "give --study-name: the storage holds 3 studies"),
        (["--study-name", "nope", str(out)], "no study 'nope' in the storage"),
        (["--study-name", "empty", str(tmp_path / "missing" / "r.html")], "does not exist"),
        (["--study-name", "empty", str(tmp_path)], "is a directory"),
    ]:
        res = runner.invoke(app, ["report", "--storage", studies["url"], *args])
        assert res.exit_code == 2, res.output
        assert msg in res.output and len(res.output.strip().splitlines()) == 1, res.output


# ------------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    b = browser_or_skip(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def test_report_renders_in_a_browser(browser: Browser, pages: dict[str, Path]) -> None:
    events = browser.load(pages["full"].as_uri())
    assert page_errors(events) == []
    # Offline: the page itself is the only thing fetched (data:/blob: are in-page).
    remote = [u for u in requests_made(events) if not u.startswith(("file:", "data:", "blob:"))]
    assert remote == []
    assert browser.eval("document.title") == "autotransfer report: synthetic"
    assert browser.eval("typeof Plotly") == "object"
    drawn = browser.eval(
        """Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => ({
            id: d.id,
            plotted: d.classList.contains('js-plotly-plot') && !!d._fullLayout,
            svgs: d.querySelectorAll('svg.main-svg').length,
            traces: (d._fullData || []).length,
            height: d.getBoundingClientRect().height,
        }))"""
    )
    assert [d["id"] for d in drawn] == PLOT_IDS
    for d in drawn:
        assert d["plotted"] and d["svgs"] >= 1 and d["traces"] >= 1 and d["height"] > 100, d
    # Marks really drawn: points of the history, boxes per backbone, one line per trial.
    counts = browser.eval(
        """({
            history: document.querySelectorAll('#plot-history .scatterlayer .point').length,
            boxes: document.querySelectorAll('#plot-backbones .boxlayer .trace').length,
            curves: document.querySelectorAll('#plot-curves .scatterlayer .trace').length,
            bars: document.querySelectorAll('#plot-importances .barlayer .point').length,
            parallel: document.querySelectorAll('#plot-parallel .scatterlayer .trace').length,
            axes: document.querySelectorAll('#plot-parallel .annotation-text').length,
            rows: document.querySelectorAll('#trials-table tbody tr').length,
            heatmap: document.querySelectorAll('#plot-confusion .hm image').length,
            cells: (document.getElementById('plot-confusion')._fullData[0].z || []).length,
            classes: document.querySelectorAll('#per-class-table tbody tr').length,
        })"""
    )
    assert counts["history"] >= 8  # 8 complete trials (plus best-value markers, if any)
    assert counts["boxes"] == 2  # complete, pruned
    assert counts["curves"] == 11  # every trial that reported an epoch (the failed one did not)
    assert counts["bars"] >= 4
    assert counts["parallel"] >= 8  # a line per completed trial (optuna draws them as scatter)
    assert counts["axes"] >= 5  # backbone, freeze, lr, alpha and the objective
    assert counts["rows"] == 12
    assert counts["heatmap"] == 1 and counts["cells"] == 10 and counts["classes"] == 10


def test_sparse_reports_render_in_a_browser(browser: Browser, pages: dict[str, Path]) -> None:
    for key, n_plots in (("one", 4), ("empty", 0)):
        events = browser.load(pages[key].as_uri())
        assert page_errors(events) == [], key
        assert browser.eval("document.querySelectorAll('.js-plotly-plot').length") == n_plots
        assert browser.eval("document.querySelectorAll('p.note').length") >= 1
