"""``autotransfer dashboard`` (optuna-dashboard on the study storage), and watching
a study while a search still writes to it.

The concurrency test runs a writer process that appends trials to the SQLite
study through ``autotransfer.store.storage.open_storage`` (as a running search does)
while this process renders the report and polls the dashboard's HTTP API over
and over; the writer must finish every trial with no "database is locked".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from _browser import browser_or_skip, page_errors, requests_made
from _report_helpers import make_study
from _scale_helpers import assert_exact_study, finish, start_search_and_workers
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.report.page import render_report
from autotransfer.store.studies import load_study

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        assert r.status == 200
        return json.load(r)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AUTOTRANSFER_STORAGE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return env


def _start_dashboard(url: str, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "autotransfer", "dashboard", "--storage", url, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )


def _wait_up(proc: subprocess.Popen[str], port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited {proc.returncode}: {proc.communicate()}")
        try:
            _get(f"http://127.0.0.1:{port}/api/meta", timeout=2)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("dashboard did not answer in time")


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.terminate()
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


@pytest.fixture
def dashboard_for(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(url: str) -> int:
        port = _free_port()
        proc = _start_dashboard(url, port)
        procs.append(proc)
        _wait_up(proc, port)
        return port

    yield start
    for p in procs:
        _stop(p)


def test_dashboard_serves_the_study(tmp_path: Path, dashboard_for: Any) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    make_study(url, "synthetic", n_trials=6)
    port = dashboard_for(url)
    base = f"http://127.0.0.1:{port}"
    studies = _get(f"{base}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["synthetic"]
    detail = _get(f"{base}/api/studies/{studies[0]['study_id']}?after=0")
    assert len(detail["trials"]) == 6
    states = sorted({t["state"] for t in detail["trials"]})
    assert states == ["Complete", "Pruned"]
    best = detail["best_trials"][0]
    assert best["values"] == [max(t.value for t in load_study(url, None).trials if t.value)]
    # The web page itself is served too.
    with urllib.request.urlopen(f"{base}/dashboard", timeout=10) as r:
        assert r.status == 200 and b'id="dashboard"' in r.read()

    # ... and works in a real browser: the study page draws its history plot from
    # the API, logs no error and fetches nothing from outside this machine.
    browser = browser_or_skip(tmp_path / "chromium-profile")
    try:
        start = len(browser.events)
        browser.load(f"{base}/dashboard/studies/{studies[0]['study_id']}")
        plots = browser.eval(
            """new Promise(resolve => {
                const t0 = Date.now();
                (function poll() {
                    const n = document.querySelectorAll('.js-plotly-plot .scatterlayer .point')
                        .length;
                    if (n > 0 || Date.now() - t0 > 15000) resolve(n); else setTimeout(poll, 100);
                })();
            })"""
        )
        events = browser.events[start:]
        text = browser.eval("document.body.innerText")
    finally:
        browser.close()
    assert plots > 0
    assert "synthetic" in text
    assert page_errors(events) == []
    remote = [u for u in requests_made(events)
              if not u.startswith((base, "data:", "blob:"))]
    assert remote == []


def test_dashboard_binds_loopback_unless_allowed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    make_study(url, "synthetic", n_trials=1)
    runner = CliRunner()
    res = runner.invoke(app, ["dashboard", "--storage", url, "--host", "0.0.0.0"])
    assert res.exit_code == 2
    assert "pass --allow-remote" in res.output and len(res.output.strip().splitlines()) == 1
    # Allowed: a warning first (192.0.2.1 is TEST-NET-1, never bindable, so it stops there).
    res = runner.invoke(
        app, ["dashboard", "--storage", url, "--host", "192.0.2.1", "--allow-remote"]
    )
    assert res.exit_code == 2
    assert "warning: serving the dashboard on 192.0.2.1" in res.output
    assert "no authentication" in res.output and "cannot listen on 192.0.2.1" in res.output
    # A missing SQLite file is an error, not a new empty storage.
    missing = tmp_path / "nope.db"
    res = runner.invoke(app, ["dashboard", "--storage", f"sqlite:///{missing}"])
    assert res.exit_code == 2 and "no study storage" in res.output
    assert not missing.exists()


def test_watching_a_running_study_never_locks_the_search(
    tmp_path: Path, dashboard_for: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    make_study(url, "live", n_trials=2)
    port = dashboard_for(url)
    n_new = 16
    writer = subprocess.Popen(  # 16 trials x ~3.5 epochs x 40 ms: a few seconds of writing
        [sys.executable, str(TESTS / "_report_helpers.py"), url, "live", str(n_new), "0.04"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    reports = polls = 0
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    try:
        while writer.poll() is None and time.monotonic() < deadline:
            study = load_study(url, "live")
            page = render_report(study)
            assert page.startswith("<!DOCTYPE html>")
            reports += 1
            for _ in range(3):
                detail = _get(f"http://127.0.0.1:{port}/api/studies/1?after=0")
                seen.add(len(detail["trials"]))
                polls += 1
        out, err = writer.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    assert writer.returncode == 0, err
    assert "database is locked" not in err
    assert out.strip() == f"wrote {n_new} trials"
    # The readers really ran while the study was being written.
    assert reports >= 2 and polls >= 6 and len(seen) >= 2, (reports, polls, seen)
    final = optuna.load_study(study_name="live", storage=url)
    assert len(final.trials) == 2 + n_new
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in final.trials)


def test_workers_on_sqlite_with_a_live_dashboard_and_report(
    write_spec, tmp_path: Path, dashboard_for: Any
) -> None:
    """A search and 4 worker processes on one SQLite study, watched all along
    by the dashboard and the report: every process exits 0, none reports a
    locked database, and the study ends with exactly its 10 trials."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_spec(**{"name": "live-workers", "n_trials": 10, "train.epochs": 1,
                         "train.threads": 1})
    procs = start_search_and_workers(spec, url, n_workers=4, cwd=tmp_path)
    reports = polls = 0
    try:
        deadline = time.monotonic() + 120
        while not _has_trials(url, "live-workers"):
            assert time.monotonic() < deadline and procs[0].poll() is None, "no study made"
            time.sleep(0.2)
        port = dashboard_for(url)
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline + 120:
            page = render_report(load_study(url, "live-workers"))
            assert page.startswith("<!DOCTYPE html>")
            reports += 1
            _get(f"http://127.0.0.1:{port}/api/studies/1?after=0")
            polls += 1
            time.sleep(0.3)  # leave the workers the CPU
    finally:
        outputs = finish(procs)
    assert not [err for _, err in outputs if "database is locked" in err]
    assert reports >= 2 and polls >= 2, (reports, polls)
    assert_exact_study(url, "live-workers", 10)


def _has_trials(url: str, name: str) -> bool:
    try:
        return len(optuna.load_study(study_name=name, storage=url).trials) > 0
    except KeyError:  # not created yet
        return False
