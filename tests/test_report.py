"""``autotransfer report``: the HTML page, checked in a real browser.

The browser test starts Debian's Chromium headless itself and drives it over the
DevTools protocol (websocket-client): it loads the page from a file:// URL and
checks that it loads, that every figure is drawn by plotly.js, that nothing was
fetched from the network and that nothing was logged as an error.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from _report_helpers import make_study
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.report import render_report

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--mute-audio", "--window-size=1280,2000",
]
PLOT_IDS = ["plot-history", "plot-importances", "plot-backbones", "plot-curves", "plot-parallel"]


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
    for section in ("summary", "history", "importances", "backbones", "curves", "parallel",
                    "trials"):
        assert f'<section id="{section}">' in page
    for div in PLOT_IDS:
        assert f'id="{div}"' in page
    # plotly.js is inline, exactly once, and nothing is loaded from elsewhere.
    # (plotly.js mentions CDN URLs for map tiles; the browser test checks none is fetched.)
    assert page.count("* plotly.js v") == 1
    assert re.search(r"<script[^>]*\ssrc=", page) is None
    # The study summary: spec name, counts by state, best trial and its test metrics.
    assert "synthetic" in page and "12 (8 complete, 1 fail, 3 pruned)" in page
    assert "test accuracy</dt><dd>0.9123" in page
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


class Browser:
    """Headless Chromium driven over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        import websocket  # websocket-client

        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True
        )
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            self.call(method)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while time.monotonic() < deadline:
            if any(e.get("method") == method for e in self.events[seen:]):
                return
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)

    def eval(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(res["exceptionDetails"])
        return res["result"].get("value")

    def load(self, url: str) -> list[dict[str, Any]]:
        """Navigate, wait for the load event, and return the events it caused."""
        start = len(self.events)
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        # plotly draws synchronously from inline scripts; give timers a moment anyway.
        self.eval("new Promise(r => setTimeout(r, 300))")
        return self.events[start:]

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not found: the browser test needs Debian's chromium "
                    "(apt-get install chromium)")
    pytest.importorskip("websocket", reason="the browser test needs websocket-client "
                        "(pip install websocket-client, or .[test])")
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def _errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
    return out


def _requests(events: list[dict[str, Any]]) -> list[str]:
    return [e["params"]["request"]["url"] for e in events
            if e.get("method") == "Network.requestWillBeSent"]


def test_report_renders_in_a_browser(browser: Browser, pages: dict[str, Path]) -> None:
    events = browser.load(pages["full"].as_uri())
    assert _errors(events) == []
    # Offline: the page itself is the only thing fetched (data:/blob: are in-page).
    remote = [u for u in _requests(events) if not u.startswith(("file:", "data:", "blob:"))]
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
        })"""
    )
    assert counts["history"] >= 8  # 8 complete trials (plus best-value markers, if any)
    assert counts["boxes"] == 2  # complete, pruned
    assert counts["curves"] == 11  # every trial that reported an epoch (the failed one did not)
    assert counts["bars"] >= 4
    assert counts["parallel"] >= 8  # a line per completed trial (optuna draws them as scatter)
    assert counts["axes"] >= 5  # backbone, freeze, lr, alpha and the objective
    assert counts["rows"] == 12


def test_sparse_reports_render_in_a_browser(browser: Browser, pages: dict[str, Path]) -> None:
    for key, n_plots in (("one", 4), ("empty", 0)):
        events = browser.load(pages[key].as_uri())
        assert _errors(events) == [], key
        assert browser.eval("document.querySelectorAll('.js-plotly-plot').length") == n_plots
        assert browser.eval("document.querySelectorAll('p.note').length") >= 1
