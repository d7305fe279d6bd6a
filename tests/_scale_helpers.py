"""Running a search and several ``autotransfer worker`` processes on one study,
all started at once (the workers wait for the search to create the study), and
checking the study they leave."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

TESTS = Path(__file__).resolve().parent


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.pop("AUTOTRANSFER_STORAGE", None)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), out.get("PYTHONPATH")) if p)
    return out


def start(cwd: Path, *args: object) -> subprocess.Popen[str]:
    """``autotransfer ARGS`` in the working directory ``cwd``."""
    return subprocess.Popen(
        [sys.executable, "-m", "autotransfer", *(str(a) for a in args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=cwd,
    )


def start_search_and_workers(
    spec: Path, storage: str, n_workers: int, cwd: Path
) -> list[subprocess.Popen[str]]:
    """``autotransfer search SPEC`` and ``n_workers`` workers, started together."""
    procs = [start(cwd, "search", spec, "--storage", storage)]
    procs += [start(cwd, "worker", "--storage", storage, "--wait", 120) for _ in range(n_workers)]
    return procs


def finish(procs: list[subprocess.Popen[str]], timeout: float = 240) -> list[tuple[str, str]]:
    """Wait for every process; each must exit 0. Returns their (stdout, stderr)."""
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{err[-3000:]}"
            outputs.append((out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def assert_exact_study(storage: str, name: str, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly ``n_trials`` trials, numbered 0..n-1 (no duplicate, none lost),
    all finished (none left RUNNING or WAITING)."""
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [
        (t.number, t.state.name, t.user_attrs.get("fail_message")) for t in trials
    ]
    return trials
