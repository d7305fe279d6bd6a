"""Many workers on one PostgreSQL study (a private server, tests/_postgres.py):
an exact total budget, and connections that survive a server restart, an idle
timeout and a short outage in the middle of a trial."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import optuna
from _scale_helpers import assert_exact_study, finish, start_search_and_workers
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.store.records import WORKER_ATTR
from autotransfer.tuning.progress import Progress
from autotransfer.tuning.worker import run_worker

runner = CliRunner()


def test_search_and_four_workers_share_an_exact_budget_on_postgres(
    write_spec, postgres_url: str, tmp_path: Path
) -> None:
    # One thread each: five processes share the test machine's cores.
    spec = write_spec(**{"name": "pg-shared", "n_trials": 10, "train.epochs": 1,
                         "train.threads": 1})
    outputs = finish(start_search_and_workers(spec, postgres_url, n_workers=4, cwd=tmp_path))
    trials = assert_exact_study(postgres_url, "pg-shared", 10)
    ran = [int(out.split()[2]) for out, _ in outputs[1:]]  # "worker ran K trial(s); ..."
    assert sum(ran) <= 10
    # Several processes really ran trials at once.
    workers = {(w["host"], w["pid"]) for w in (t.user_attrs[WORKER_ATTR] for t in trials)}
    assert len(workers) >= 2, outputs
    assert "best: trial" in outputs[0][0]
    assert all((tmp_path / "autotransfer-artifacts" / t.user_attrs["checkpoint"]).is_file()
               for t in trials if t.state == optuna.trial.TrialState.COMPLETE)


class _FaultyProgress(Progress):
    """After the first epoch of each trial, hurt the server: ``faults[i]`` for the
    i-th trial this worker runs. The trial's next write comes after it."""

    def __init__(self, faults: list[Any], epochs: int) -> None:
        super().__init__(epochs=epochs)
        self.faults = faults
        self.done: list[int] = []

    def epoch(self, number: int, result: Any) -> None:
        super().epoch(number, result)
        if result.epoch == 1 and number not in self.done:
            self.done.append(number)
            self.faults[len(self.done) - 1]()


def test_connections_survive_restart_idle_timeout_and_outage_mid_trial(
    write_spec, postgres_server: Any, postgres_url: str, tmp_path: Path
) -> None:
    spec = write_spec(**{"name": "pg-faults", "n_trials": 1, "train.epochs": 2})
    made = runner.invoke(app, ["search", str(spec), "--storage", postgres_url,
                               "--artifacts", str(tmp_path / "artifacts")])
    assert made.exit_code == 0, made.output
    optuna.load_study(study_name="pg-faults", storage=postgres_url).set_user_attr(
        "target_trials", 4)

    def restart() -> None:
        postgres_server.restart()

    def idle() -> None:  # the server closes the pooled connections while the trial trains
        postgres_server.execute("ALTER SYSTEM SET idle_session_timeout = '200ms'")
        postgres_server.execute("SELECT pg_reload_conf()")
        threading.Event().wait(1.0)

    def outage() -> None:  # down for 2 s: the next write waits for it
        postgres_server.execute("ALTER SYSTEM RESET idle_session_timeout")
        postgres_server.stop()
        threading.Timer(2.0, postgres_server.start).start()

    progress = _FaultyProgress([restart, idle, outage], epochs=2)
    try:
        outcome = run_worker(postgres_url, "pg-faults", progress=progress)
    finally:
        postgres_server.start() if not _up(postgres_server) else None
        postgres_server.execute("ALTER SYSTEM RESET idle_session_timeout")
        postgres_server.execute("SELECT pg_reload_conf()")
    assert outcome.ran == 3 and progress.done == [1, 2, 3]
    trials = assert_exact_study(postgres_url, "pg-faults", 4)
    assert all(t.user_attrs["epochs_run"] == 2 for t in trials)


def _up(server: Any) -> bool:
    try:
        server.execute("SELECT 1")
        return True
    except Exception:
        return False
