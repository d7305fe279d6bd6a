"""One worker process per GPU (``--gpus``, ``--trials-per-gpu``), with GPUs
simulated by CPU processes (``AUTOTRANSFER_SIMULATED_GPUS``): the workers share
the study's exact budget, each trial records its GPU, a killed worker is
reported and its trial retried, Ctrl-C stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.engine.device import SIMULATED_GPUS_ENV, Machine
from autotransfer.exceptions import UserInputError
from autotransfer.store.budget import used_slots
from autotransfer.store.storage import open_storage
from autotransfer.tuning.gpus import ALLOC_CONF, ALLOC_DEFAULT, Slot, plan_gpus, worker_env

FOUR = Machine(cuda=True, count=4, names=("H100",) * 4, bf16=True, visible=("0", "1", "2", "3"))
PINNED = Machine(cuda=True, count=2, names=("H100",) * 2, bf16=True, visible=("5", "7"))


def _ids(gpus: str | None, k: int = 1, device: str = "auto", machine=FOUR) -> list[str]:
    return [s.label for s in plan_gpus(gpus, k, device, machine).slots]


def test_gpu_plans() -> None:
    assert _ids(None) == ["GPU 0", "GPU 1", "GPU 2", "GPU 3"]  # default: all
    assert _ids(None, machine=Machine.cpu()) == [] and _ids("all", machine=Machine.cpu()) == []
    assert _ids("none") == [] and _ids(None, device="cuda:1") == []  # the spec's own device
    assert _ids("2") == ["GPU 0", "GPU 1"]  # a count
    assert _ids("0,2") == ["GPU 0", "GPU 2"] and _ids("3,") == ["GPU 3"]  # indices
    assert _ids("1", 2) == ["GPU 0/0", "GPU 0/1"]
    assert _ids("all", machine=PINNED) == ["GPU 5", "GPU 7"]  # physical ids
    assert not plan_gpus("1", 1, "auto", FOUR).spawn  # one slot on GPU 0: in-process
    assert plan_gpus("1,", 1, "auto", FOUR).spawn and plan_gpus("1", 2, "auto", FOUR).spawn
    for bad, message in [
        ("5", "this machine has 4 GPU"), ("0,4", "no GPU 4 here"), ("gpu0", "is not valid"),
        ("0", "use --gpus none"), (",", "is not valid"),
    ]:
        with pytest.raises(UserInputError, match=message):
            plan_gpus(bad, 1, "auto", FOUR)
    with pytest.raises(UserInputError, match="no CUDA GPU is available"):
        plan_gpus("1,", 1, "auto", Machine.cpu())
    with pytest.raises(UserInputError, match="needs train.device auto"):
        plan_gpus("all", 1, "cpu", FOUR)


def test_worker_env_pins_the_gpu_and_keeps_the_users_allocator(monkeypatch) -> None:
    monkeypatch.delenv(ALLOC_CONF, raising=False)
    env = worker_env(Slot(1, "3"))
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env[ALLOC_CONF] == ALLOC_DEFAULT
    monkeypatch.setenv(ALLOC_CONF, "max_split_size_mb:128")
    assert worker_env(Slot(0, "0"))[ALLOC_CONF] == "max_split_size_mb:128"


def test_bad_gpus_is_one_line_and_exit_2(write_spec, storage_url: str) -> None:
    result = CliRunner().invoke(
        app, ["search", str(write_spec()), "--storage", storage_url, "--gpus", "gpu1"]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --gpus 'gpu1' is not valid; give all, none, a count (e.g. 2) or GPU indices "
        "(e.g. 0,2; one GPU: 3,)"
    ]


def _search(spec: Path, storage_url: str, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, SIMULATED_GPUS_ENV: "2", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.Popen(
        [sys.executable, "-m", "autotransfer", "search", str(spec), "--storage", storage_url,
         "--gpus", "all", "--json"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _trials(storage_url: str, storage=None) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="tiny", storage=storage).trials
    except KeyError:
        return []


def _wait(proc: subprocess.Popen, storage_url: str, ready, limit: float = 180):
    storage = open_storage(storage_url)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        trials = _trials(storage_url, storage)
        if ready(trials):
            return trials
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out: {proc.communicate()}")


def _running(trials, n: int = 1):
    running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING
               and {"worker", "device"} <= t.user_attrs.keys()]
    return running if len(running) >= n else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_simulated_gpus_share_the_budget_and_a_killed_worker_is_reported(
    write_spec, storage_url: str, tmp_path: Path
) -> None:
    spec = write_spec(n_trials=4, train__epochs=2, train__threads=1)
    proc = _search(spec, storage_url, tmp_path)
    (victim, *_) = _wait(proc, storage_url, _running)
    pid = victim.user_attrs["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "2 worker(s): GPU 0, GPU 1" in err
    gpu = victim.user_attrs["device"]["gpu_id"]
    assert f"error: worker on GPU {gpu} (pid {pid}) killed by SIGKILL" in err
    trials = _trials(storage_url, open_storage(storage_url))
    assert used_slots(trials) == 4  # exactly the target, the retry replacing the lost trial
    lost = trials[victim.number]
    assert lost.state == optuna.trial.TrialState.FAIL
    assert lost.user_attrs["fail_reason"] == "worker_lost"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    ran = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.user_attrs["device"]["gpu_id"] for t in trials} == {"0", "1"}  # both worked
    for t in ran:
        assert t.user_attrs["device"] == {
            "device": "cuda:0", "gpu": "simulated GPU", "simulated": True, "precision": "bf16",
            "gpu_id": t.user_attrs["device"]["gpu_id"], "channels_last": True,
        }
    assert '"best_trial"' in out  # the search still reports its outcome
    listed = CliRunner().invoke(app, ["trials", "--storage", storage_url, "--json"])
    assert '"gpu_id"' in listed.output


def test_ctrl_c_stops_every_worker(write_spec, storage_url: str, tmp_path: Path) -> None:
    # Epochs of the tiny set take 0.1-0.3 s: with 3 a trial could finish between the
    # poll that saw it running and the signal (seen once workers mapped the decoded
    # data instead of decoding it, and so started their trials sooner).
    spec = write_spec(n_trials=4, train__epochs=30, train__threads=1)
    proc = _search(spec, storage_url, tmp_path)
    running = _wait(proc, storage_url, lambda trials: _running(trials, 2))
    pids = [t.user_attrs["worker"]["pid"] for t in running]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted (SIGINT)" in err
    assert not any(_alive(p) for p in pids)
    trials = _trials(storage_url, open_storage(storage_url))
    stopped = [t for t in trials if t.number in {r.number for r in running}]
    assert all(t.user_attrs.get("fail_reason") == "interrupted" for t in stopped), [
        (t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in stopped]
    assert sum(t.state == optuna.trial.TrialState.WAITING for t in trials) == 2  # to resume
