"""Worker faults: a killed worker, SIGTERM and Ctrl-C, a hung trial, a failed
checkpoint write. Each one loses no finished trial, and the interrupted trial
goes on from its last epoch.

The kill and signal tests run ``autotransfer search`` in a subprocess
(tests/_fault_worker.py) whose backbone is slowed down, so the test can act
after an epoch has been saved; heartbeats and grace periods are short.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.engine.trainer import Trainer, TrialError, TrialParams
from autotransfer.store.recovery import RetryStaleTrial, recover_lost_trials
from autotransfer.store.resume import load_epoch_state, save_epoch_state
from autotransfer.store.storage import artifact_store, open_storage
from autotransfer.tuning.objective import Objective
from autotransfer.tuning.progress import Progress

WORKER = Path(__file__).with_name("_fault_worker.py")
PARAMS = {"backbone": "timm:test_resnet@none", "freeze": 0.2, "lr": 5e-3,
          "weight_decay": 1e-4, "batch_size": 8, "alpha": 0.25}
FAST_HEARTBEAT = {"recovery.heartbeat_interval": 1, "recovery.grace_period": 2}
EVERY_EPOCH = {"recovery.state_interval": 0}  # tiny trials: write the state after every epoch


def _trials(storage_url: str, name: str, storage=None) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, read like `autotransfer trials` does (no heartbeats)."""
    storage = storage or open_storage(storage_url)
    return optuna.load_study(study_name=name, storage=storage).trials


def _start_worker(spec: Path, storage_url: str, tmp_path: Path, *extra: str,
                  delay: float = 0.2) -> subprocess.Popen:
    args = [sys.executable, str(WORKER), "--delay", str(delay), *extra, "--",
            "search", str(spec), "--storage", storage_url]
    return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(storage_url: str, name: str, proc: subprocess.Popen,
              ready: Callable[[list[optuna.trial.FrozenTrial]], bool], limit: float = 120) -> None:
    deadline, storage = time.monotonic() + limit, open_storage(storage_url)
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if ready(_trials(storage_url, name, storage)):
                return
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out: {proc.communicate()}")


def _saved_an_epoch(number: int) -> Callable[[list[optuna.trial.FrozenTrial]], bool]:
    def ready(trials: list[optuna.trial.FrozenTrial]) -> bool:
        return len(trials) > number and trials[number].user_attrs.get("resume_epoch", 0) >= 1

    return ready


def _resume_states(artifacts: Path) -> list[str]:
    return sorted(p.name for p in artifacts.iterdir() if p.name.startswith("resume-"))


def _search(spec: Path, storage_url: str, *args: str):
    result = CliRunner().invoke(app, ["search", str(spec), "--storage", storage_url, *args])
    assert result.exit_code == 0, result.output
    return result


# ------------------------------------------------------------------ heartbeats


def test_writers_heartbeat_readers_do_not_and_settings_are_resumable(
    tiny_spec, storage_url: str, tmp_path: Path
) -> None:
    from autotransfer.exceptions import SpecError
    from autotransfer.store.opening import open_for_trials
    from autotransfer.store.studies import create_or_resume, load_study
    from autotransfer.tuning.sampling import make_pruner, make_sampler
    from autotransfer.tuning.search import run_trials

    def for_trials(spec):  # as search and worker open it
        return open_for_trials(storage_url, spec.name, spec.recovery, make_sampler(spec),
                               make_pruner(spec))

    spec = tiny_spec()
    created = create_or_resume(spec, storage_url, tmp_path / "a")
    # Only the study the trial loop runs has heartbeats (test-only peek at Optuna's cache).
    assert created._storage._backend.heartbeat_interval is None
    backend = for_trials(spec)._storage._backend
    assert (backend.heartbeat_interval, backend.grace_period) == (30, 120)  # the defaults
    assert isinstance(backend.get_heartbeat_stale_trial_callback(), RetryStaleTrial)
    read = load_study(storage_url, spec.name)  # how readers (trials, report) open it
    assert read._storage._backend.heartbeat_interval is None
    # The trial loop takes nothing else: a study without heartbeat and budget is refused.
    with pytest.raises(TypeError, match="needs the study open_for_trials returns"):
        run_trials(read, spec, None, tmp_path / "a", None, 1, None)  # type: ignore[arg-type]
    # Changing them (or the stall timeout) on resume is allowed: same study.
    changed = tiny_spec(**FAST_HEARTBEAT, **{"train.stall_timeout": 5})
    create_or_resume(changed, storage_url, tmp_path / "a")
    assert for_trials(changed)._storage._backend.grace_period == 2
    with pytest.raises(SpecError, match="grace_period .* must be longer than heartbeat_interval"):
        tiny_spec(**{"recovery.heartbeat_interval": 10, "recovery.grace_period": 10})


def test_retry_callback_carries_the_epoch_state_once_and_skips_requeued_trials() -> None:
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 1.0})
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})
    for key, value in {"resume_state": "resume-abc", "resume_epoch": 2,
                       "fail_reason": "worker_lost", "val_accuracy": 0.5}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    retry = RetryStaleTrial(max_retry=1)
    retry(study, study.trials[0])
    copy = study.trials[1]
    assert copy.state == optuna.trial.TrialState.WAITING and copy.params == {"x": 1.0}
    assert copy.user_attrs == {"resume_state": "resume-abc", "resume_epoch": 2, "retry_of": 0}
    assert RetryStaleTrial.retried_trial_number(copy) == 0
    retry(study, study.trials[0])  # a second worker that also saw trial 0 lost
    assert len(study.trials) == 2
    # The copy failing again is not retried (max_retry 1) ...
    retry(study, copy)
    assert len(study.trials) == 2
    # ... and a trial its interrupted worker already queued is not queued twice.
    other = optuna.create_study()
    trial = other.ask()
    trial.set_user_attr("requeued", True)
    other.tell(trial, state=optuna.trial.TrialState.FAIL)
    retry(other, other.trials[0])
    assert len(other.trials) == 1


# ------------------------------------------------------------------ SIGKILL


@pytest.mark.parametrize("detected_by", ["heartbeat", "process"])
def test_killed_worker_trial_fails_and_is_retried_once_from_its_last_epoch(
    detected_by: str, write_spec, storage_url: str, tmp_path: Path
) -> None:
    """SIGKILL mid-trial. ``heartbeat``: the trial looks like another machine's,
    so only its heartbeat (older than the 2 s grace period) tells it is lost.
    ``process``: a worker of this machine whose process is gone is failed at
    once, without waiting for the (default, 120 s) grace period."""
    settings = FAST_HEARTBEAT if detected_by == "heartbeat" else {}
    spec = write_spec(**{"name": "killed", "train.epochs": 4, "n_trials": 1, **settings,
                         **EVERY_EPOCH})
    _search(spec, storage_url)  # trial 0 completes
    done = _trials(storage_url, "killed")[0]
    proc = _start_worker(spec, storage_url, tmp_path)
    _wait_for(storage_url, "killed", proc, _saved_an_epoch(1))
    proc.kill()
    proc.wait()
    killed = _trials(storage_url, "killed")[1]
    assert killed.state == optuna.trial.TrialState.RUNNING  # nobody marked it
    if detected_by == "heartbeat":
        storage = open_storage(storage_url)
        storage.set_trial_user_attr(killed._trial_id, "worker", {"machine": "elsewhere", "pid": 1})
        time.sleep(3.5)  # SQLite's clock has 1 s steps: well past the 2 s grace period

    result = _search(spec, storage_url)  # one more trial: the retry runs first

    t0, t1, t2 = _trials(storage_url, "killed")
    assert (t0.state, t0.value, t0.user_attrs) == (done.state, done.value, done.user_attrs)
    assert t1.state == optuna.trial.TrialState.FAIL
    assert t1.user_attrs["fail_reason"] == "worker_lost"
    expected = "no heartbeat" if detected_by == "heartbeat" else "worker process"
    assert expected in t1.user_attrs["fail_message"]
    assert f"trial 1: worker lost ({t1.user_attrs['fail_message'][13:]}" in result.stderr
    epoch = t1.user_attrs["resume_epoch"]
    assert t2.state == optuna.trial.TrialState.COMPLETE and t2.params == t1.params
    assert t2.system_attrs["failed_trial"] == 1 and t2.user_attrs["retry_of"] == 1
    assert t2.user_attrs["resumed_from_epoch"] == epoch >= 1
    assert f"trial 2 resumes after epoch {epoch}" in result.stderr
    assert sorted(t2.intermediate_values) == [1, 2, 3, 4]  # earlier epochs reported again
    assert _resume_states(tmp_path / "autotransfer-artifacts") == []  # all cleaned up


# ------------------------------------------------------------------ SIGTERM / Ctrl-C


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_marks_the_trial_exits_promptly_and_it_resumes_on_the_next_run(
    sig: signal.Signals, write_spec, storage_url: str, tmp_path: Path
) -> None:
    spec = write_spec(**{"name": "stopped", "train.epochs": 4, "n_trials": 1, **EVERY_EPOCH})
    proc = _start_worker(spec, storage_url, tmp_path)
    _wait_for(storage_url, "stopped", proc, _saved_an_epoch(0))
    start = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig  # 143 / 130
    assert time.monotonic() - start < 10
    assert f"interrupted ({sig.name})" in stderr and "Traceback" not in stderr
    interrupted, queued = _trials(storage_url, "stopped")
    assert interrupted.state == optuna.trial.TrialState.FAIL
    assert interrupted.user_attrs["interrupted"] == sig.name
    assert interrupted.user_attrs["fail_reason"] == "interrupted"
    assert queued.state == optuna.trial.TrialState.WAITING and queued.params == interrupted.params
    state = interrupted.user_attrs["resume_state"]
    assert _resume_states(tmp_path / "autotransfer-artifacts") == [state]  # flushed, whole

    result = _search(spec, storage_url)

    trials = _trials(storage_url, "stopped")
    assert len(trials) == 2  # queued once, run first, nothing else started
    assert trials[1].state == optuna.trial.TrialState.COMPLETE
    assert trials[1].user_attrs["resumed_from_epoch"] == interrupted.user_attrs["resume_epoch"]
    assert "resumes after epoch" in result.stderr


def test_ctrl_c_while_the_backbone_builds_still_queues_the_trial_again(
    plugin_host, tiny_spec, tiny_splits, tmp_path: Path, monkeypatch
) -> None:
    def build(ref, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plugin_host, "build", build)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(PARAMS)
    objective = Objective(tiny_spec(), tiny_splits, plugin_host, artifact_store(tmp_path),
                          Progress(epochs=2))
    with pytest.raises(KeyboardInterrupt):
        study.optimize(objective, n_trials=1, catch=(TrialError,))
    stopped, queued = study.trials
    assert stopped.state == optuna.trial.TrialState.FAIL
    assert stopped.user_attrs["interrupted"] == "SIGINT"
    assert queued.state == optuna.trial.TrialState.WAITING and queued.params == stopped.params
    assert PARAMS.items() <= queued.params.items()  # plus the sampled retention kind


# ------------------------------------------------------------------ hang watchdog


def _hanging_host(host, monkeypatch, hangs: int) -> None:
    """The first ``hangs`` backbones built hang in their first training forward."""
    real_build = host.build
    built = []

    def build(ref, **kwargs):
        backbone = real_build(ref, **kwargs)
        features, hang = backbone.features, len(built) < hangs
        built.append(ref)

        def forward(model, x):
            if hang and model.training:
                time.sleep(120)
            return features(model, x)

        # No split forward: the trainer would run the blocks through it, not this forward.
        return dataclasses.replace(backbone, features=forward, split=None)

    monkeypatch.setattr(host, "build", build)


def test_hung_trial_is_ended_with_reason_timeout_and_the_study_goes_on(
    plugin_host, tiny_spec, tiny_splits, tmp_path: Path, monkeypatch
) -> None:
    _hanging_host(plugin_host, monkeypatch, hangs=1)
    # 5 s, not 1 s: on a loaded 2-core machine one healthy batch can take over a second.
    spec = tiny_spec(**{"train.epochs": 1, "train.stall_timeout": 5.0})
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(PARAMS)
    study.enqueue_trial(PARAMS)
    objective = Objective(spec, tiny_splits, plugin_host, artifact_store(tmp_path),
                          Progress(epochs=1))
    start = time.monotonic()
    study.optimize(objective, n_trials=2, catch=(TrialError,))
    assert time.monotonic() - start < 30  # not the 120 s the forward sleeps
    hung, ok = study.trials
    assert hung.state == optuna.trial.TrialState.FAIL
    assert hung.user_attrs["fail_reason"] == "timeout"
    assert "no batch finished for 5s" in hung.user_attrs["fail_message"]
    assert ok.state == optuna.trial.TrialState.COMPLETE


def test_trial_stuck_where_python_cannot_raise_is_marked_and_the_process_exits(
    write_spec, storage_url: str, tmp_path: Path
) -> None:
    spec = write_spec(**{"name": "stuck", "train.epochs": 1, "train.stall_timeout": 1.0})
    proc = _start_worker(spec, storage_url, tmp_path, "--hang-stuck")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "trial 0 made no progress" in stderr and "marked FAIL (timeout)" in stderr
    (trial,) = _trials(storage_url, "stuck")
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "timeout"


# ------------------------------------------------------------------ resumable state


def test_trainer_restored_from_an_epoch_state_goes_on_exactly_as_if_never_stopped(
    plugin_host, tiny_spec, tiny_splits
) -> None:
    spec = tiny_spec(**{"train.epochs": 3})
    params = TrialParams(**PARAMS)

    def trainer() -> Trainer:
        torch.manual_seed(spec.seed)
        backbone = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
        return Trainer(backbone, tiny_splits, params, spec, spec.seed)

    whole, saved = [], io.BytesIO()
    for result in (a := trainer()).epochs():
        whole.append(result)
        if result.epoch == 1:
            torch.save(a.state_dict(), saved)
    saved.seek(0)
    b = trainer()
    b.load_state_dict(torch.load(saved, weights_only=True))
    rest = list(b.epochs())
    assert [r.epoch for r in rest] == [2, 3]
    strip = [dataclasses.replace(r, seconds=0) for r in whole[1:]]
    assert [dataclasses.replace(r, seconds=0) for r in rest] == strip
    assert b.history == a.history and b.best.epoch == a.best.epoch
    assert all(torch.equal(b.best_state[k], v) for k, v in a.best_state.items())


def test_text_trainer_with_dropout_resumes_exactly_too(plugin_host, tmp_path: Path) -> None:
    """A text encoder trains with dropout, drawn from torch's global generator:
    the epoch state carries that generator too."""
    pytest.importorskip("transformers")
    from _text_helpers import save_tiny_bert, sentences, write_csv

    from autotransfer.data.datasets import load_text_file, stratified_split
    from autotransfer.spec.model import validate_spec

    bert = save_tiny_bert(tmp_path / "bert")
    data = write_csv(tmp_path / "topics.csv", sentences(8))
    spec = validate_spec({
        "name": "t", "data": {"path": str(data), "split": {"train": 0.5, "val": 0.25,
                                                           "test": 0.25}},
        "search": {"backbones": [f"hf:{bert}@pretrained"], "freeze": 0.0, "lr": 1e-2,
                   "batch_size": 4, "alpha": 0.1},
        "train": {"epochs": 2, "threads": 2},
    })
    splits = stratified_split(load_text_file(data), spec.data.split, 0)
    params = TrialParams(spec.search.backbones[0].key, 0.0, 1e-2, 1e-4, 4, 0.1)

    def trainer() -> Trainer:
        torch.manual_seed(0)
        backbone = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
        return Trainer(backbone, splits, params, spec, seed=0)

    saved = io.BytesIO()
    a = trainer()
    whole = []
    for result in a.epochs():
        whole.append(dataclasses.replace(result, seconds=0))
        if result.epoch == 1:
            torch.save(a.state_dict(), saved)
    saved.seek(0)
    b = trainer()
    b.load_state_dict(torch.load(saved, weights_only=True))
    assert [dataclasses.replace(r, seconds=0) for r in b.epochs()] == whole[1:]


def test_failed_checkpoint_write_keeps_the_previous_state_recorded_and_whole(
    tmp_path: Path, monkeypatch
) -> None:
    import autotransfer.store.storage as storage

    store = artifact_store(tmp_path / "artifacts")
    study = optuna.create_study()
    trial = study.ask()
    first = save_epoch_state(trial, {"epoch": 1, "w": torch.ones(1000)}, store)
    real_copy = storage.shutil.copyfileobj

    def disk_full(src, dst, *args):
        dst.write(src.read(100))  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.shutil, "copyfileobj", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_epoch_state(trial, {"epoch": 2, "w": torch.zeros(1000)}, store)
    monkeypatch.setattr(storage.shutil, "copyfileobj", real_copy)
    assert trial.user_attrs["resume_state"] == first and trial.user_attrs["resume_epoch"] == 1
    assert sorted(os.listdir(tmp_path / "artifacts")) == [first]  # no half-written file
    state = load_epoch_state(trial, store)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(1000))
    # The next write that succeeds replaces it and deletes the old one.
    second = save_epoch_state(trial, {"epoch": 2, "w": torch.zeros(1000)}, store)
    assert sorted(os.listdir(tmp_path / "artifacts")) == [second]


def test_recovery_without_heartbeats_does_nothing(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url))
    study.ask()
    assert recover_lost_trials(study) == []
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING


def test_full_disk_fails_only_the_trial_that_cannot_write_its_checkpoint(
    plugin_host, tiny_spec, tiny_splits, tmp_path: Path, monkeypatch
) -> None:
    """Epoch states that cannot be written are reported and training goes on;
    a best checkpoint that cannot be written fails the trial (checkpoint_error),
    and the study goes on."""
    import autotransfer.store.storage as storage

    def disk_full(src, dst, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.shutil, "copyfileobj", disk_full)
    spec = tiny_spec(**{"train.epochs": 2})
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(PARAMS)
    objective = Objective(spec, tiny_splits, plugin_host, artifact_store(tmp_path / "a"),
                          Progress(epochs=2))
    study.optimize(objective, n_trials=1, catch=(TrialError,))
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["epochs_run"] == 2
    assert trial.user_attrs["fail_reason"] == "checkpoint_error"
    assert "No space left" in trial.user_attrs["fail_message"]
    assert os.listdir(tmp_path / "a") == []  # nothing half-written


@pytest.mark.parametrize(("interval", "epoch_seconds", "written_after"), [
    (0, 0.0, [1, 2, 3]),  # after every epoch but the last
    (60, 0.0, []),  # the default: a quick trial writes none
    (10, 4.0, [3]),  # 12 s after the start, then only 8 s more by epoch 4 (the last)
])
def test_epoch_states_are_written_at_most_every_state_interval(
    interval: float, epoch_seconds: float, written_after: list[int], tiny_spec, storage_url: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autotransfer.tuning import objective as objective_module
    from autotransfer.tuning.search import run_search

    clock = [0.0]  # the objective's clock only: the trial's epochs take epoch_seconds each
    monkeypatch.setattr(objective_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    written: list[int] = []

    def save(trial, state, store):
        written.append(int(state["epoch"]))
        return save_epoch_state(trial, state, store)

    monkeypatch.setattr(objective_module, "save_epoch_state", save)
    epochs = Trainer.epochs

    def timed_epochs(self):
        for result in epochs(self):
            clock[0] += epoch_seconds
            yield result

    monkeypatch.setattr(Trainer, "epochs", timed_epochs)
    spec = tiny_spec(**{"train.epochs": 4, "n_trials": 1, "recovery.state_interval": interval})
    quiet = Progress(console=Console(file=io.StringIO()))
    run_search(spec, storage_url, tmp_path / "artifacts", quiet)
    assert written == written_after
