"""Trial faults: out of memory, non-finite loss, a plugin that raises. Each one
fails (or shrinks) only its own trial; the study goes on.

Out-of-memory is injected on CPU: the backbone's forward raises
``torch.OutOfMemoryError`` (or another OOM form) for batches larger than N.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import optuna
import pytest
import torch

from autotransfer.engine.trainer import Trainer, TrialError, TrialParams, is_out_of_memory
from autotransfer.store.storage import artifact_store
from autotransfer.tuning.objective import Objective
from autotransfer.tuning.progress import Progress

GOOD = {"backbone": "timm:test_resnet@none", "freeze": 0.2, "lr": 5e-3,
        "weight_decay": 1e-4, "batch_size": 8, "alpha": 0.25}


def _oom_host(host, monkeypatch, limit: int, error: BaseException | None = None):
    """Make every backbone ``host`` builds raise an OOM for batches above ``limit``;
    returns the list of batch sizes its forward saw."""
    seen: list[int] = []
    real_build = host.build

    def build(ref, **kwargs):
        backbone = real_build(ref, **kwargs)
        features = backbone.features

        def flaky(model, x):
            seen.append(len(x))
            if len(x) > limit:
                raise error or torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 18.50 GiB")
            return features(model, x)

        # No split forward: the trainer would run the blocks through it, not this forward.
        return dataclasses.replace(backbone, features=flaky, split=None)

    monkeypatch.setattr(host, "build", build)
    return seen


def _optimize(spec, splits, host, tmp_path: Path, *trial_params: dict) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for params in trial_params:
        study.enqueue_trial(params)
    objective = Objective(spec, splits, host, artifact_store(tmp_path / "artifacts"),
                          Progress(epochs=spec.train.epochs))
    study.optimize(objective, n_trials=len(trial_params), catch=(TrialError,))
    return study


# ------------------------------------------------------------------ out of memory


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                      "can't allocate memory: you tried to allocate 1000000 bytes."), True),
        (MemoryError(), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of range"), False),
    ],
    ids=["OutOfMemoryError", "cuda-runtime", "cpu-allocator", "MemoryError", "shape", "value"],
)
def test_out_of_memory_forms(error: BaseException, expected: bool) -> None:
    assert is_out_of_memory(error) is expected


def test_oom_halves_the_micro_batch_and_the_trial_completes(
    plugin_host, tiny_spec, tiny_splits, tmp_path: Path, monkeypatch
) -> None:
    seen = _oom_host(plugin_host, monkeypatch, limit=3)
    study = _optimize(tiny_spec(**{"train.epochs": 1}), tiny_splits, plugin_host, tmp_path, GOOD)
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.COMPLETE, t.user_attrs
    assert t.user_attrs["effective_batch_size"] == 8  # the optimiser still steps on 8
    assert t.user_attrs["micro_batch_size"] == 2  # 8 -> 4 -> 2 fits under 3
    assert t.user_attrs["oom_events"] == 2
    assert seen[:3] == [8, 4, 2] and max(seen[3:]) <= 3  # never retries the big batch
    assert t.params["batch_size"] == 8  # the sampled parameter is not rewritten


def test_micro_batches_give_the_whole_batch_gradient(plugin_host, tiny_spec, tiny_splits) -> None:
    """Gradient accumulation keeps the optimisation unchanged (frozen trunk, so
    BatchNorm statistics do not depend on the micro-batch)."""
    spec = tiny_spec()
    params = TrialParams(GOOD["backbone"], 1.0, 5e-3, 1e-4, 8, 0.25)
    torch.manual_seed(0)
    backbone = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    # No split forward: _step takes images here, not a cached prefix's outputs.
    backbone = dataclasses.replace(backbone, split=None)
    trainer = Trainer(backbone, tiny_splits, params, spec, seed=0)
    from autotransfer.backbones.freeze import train_mode
    from autotransfer.data.augment import normalise

    train_mode(backbone.model, trainer.frozen_norms)  # frozen BatchNorm in eval mode
    x = normalise(tiny_splits.train.images[:8], backbone.preprocessing)
    y = tiny_splits.train.labels[:8]

    def grads(micro: int) -> tuple[float, list[torch.Tensor]]:
        trainer.micro_batch_size = micro
        loss = trainer._step([(x, y)], 0)
        return loss, [p.grad.clone() for p in backbone.model.parameters() if p.grad is not None]

    whole_loss, whole = grads(8)
    micro_loss, micro = grads(3)  # 3 + 3 + 2: unequal shares are weighted right
    assert whole and len(whole) == len(micro)
    assert math.isclose(whole_loss, micro_loss, rel_tol=1e-5)
    for a, b in zip(whole, micro, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("CUDA error: out of memory"),
     RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
     MemoryError()],
    ids=["cuda-runtime", "cpu-allocator", "MemoryError"],
)
def test_oom_at_the_floor_fails_the_trial_and_the_study_goes_on(
    error, plugin_host, tiny_spec, tiny_splits, tmp_path: Path, monkeypatch
) -> None:
    # Batches of 8 never fit (floor 4: 8 -> 4 -> fail); batches of 2 fit.
    _oom_host(plugin_host, monkeypatch, limit=2, error=error)
    spec = tiny_spec(**{"train.epochs": 1, "train.min_batch_size": 4, "search.batch_size": [8, 2]})
    study = _optimize(spec, tiny_splits, plugin_host, tmp_path, GOOD, dict(GOOD, batch_size=2))
    failed, ok = study.trials
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == "oom"
    assert "train.min_batch_size = 4" in failed.user_attrs["fail_message"]
    assert failed.user_attrs["micro_batch_size"] == 4
    assert ok.state == optuna.trial.TrialState.COMPLETE  # the study went on
    assert ok.user_attrs["effective_batch_size"] == 2


def test_oom_while_evaluating_halves_the_eval_batch(
    plugin_host, tiny_spec, tiny_splits, tmp_path: Path, monkeypatch
) -> None:
    real_eval = __import__("autotransfer.engine.trainer", fromlist=["evaluate"]).evaluate
    sizes: list[int] = []

    def evaluate(backbone, data, batch_size=256, on_batch=None, **kwargs):
        sizes.append(batch_size)
        if batch_size > 5:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_eval(backbone, data, batch_size, on_batch, **kwargs)

    monkeypatch.setattr("autotransfer.engine.trainer.evaluate", evaluate)
    study = _optimize(tiny_spec(**{"train.epochs": 1}), tiny_splits, plugin_host, tmp_path, GOOD)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert sizes[:4] == [64, 32, 16, 8] and sizes[4] == 4


def test_min_batch_size_is_validated(tiny_spec) -> None:
    from autotransfer.exceptions import SpecError

    with pytest.raises(SpecError, match="train.min_batch_size = 0"):
        tiny_spec(**{"train.min_batch_size": 0})


# ------------------------------------------------------------------ NaN / inf


def test_divergent_lr_is_stopped_within_one_epoch(
    plugin_host, tiny_spec, tiny_splits, tmp_path: Path, monkeypatch
) -> None:
    """lr = 1e3 with AdamW keeps the loss finite (millions), so a finite
    explosion must stop the trial too, in its first epoch; lr = 1e12 gives NaN."""
    calls = []
    real = Trainer._train_epoch

    def counted(self):
        calls.append(self.params.lr)
        return real(self)

    monkeypatch.setattr(Trainer, "_train_epoch", counted)
    spec = tiny_spec(**{"train.epochs": 3, "search.lr": {"low": 1e-3, "high": 1e12, "log": True}})
    diverge = dict(GOOD, lr=1e3, freeze=0.0, alpha=0.0)
    nan = dict(GOOD, lr=1e12, freeze=0.0, alpha=0.0)
    study = _optimize(spec, tiny_splits, plugin_host, tmp_path, diverge, nan)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert [t.user_attrs["fail_reason"] for t in study.trials] == ["diverged", "non_finite"]
    assert "too high" in study.trials[0].user_attrs["fail_message"]
    assert all("epochs_run" not in t.user_attrs and t.value is None for t in study.trials)
    assert calls == [1e3, 1e12]  # each stopped inside its first epoch


@pytest.mark.parametrize("where", ["loss", "metric"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_or_metric_fails_never_completes(
    where: str, value: float, plugin_host, tiny_spec, tiny_splits, tmp_path: Path, monkeypatch
) -> None:
    if where == "loss":
        real = plugin_host.build

        def build(ref, **kwargs):
            b = real(ref, **kwargs)
            classify = b.classify
            return dataclasses.replace(b, classify=lambda m, f: classify(m, f) * value)

        monkeypatch.setattr(plugin_host, "build", build)
    else:
        from autotransfer.engine.trainer import Metrics

        monkeypatch.setattr("autotransfer.engine.trainer.evaluate",
                            lambda *a, **k: Metrics(accuracy=0.5, macro_f1=0.5, loss=value))
    study = _optimize(tiny_spec(**{"train.epochs": 1}), tiny_splits, plugin_host, tmp_path,
                      dict(GOOD, alpha=0.0))
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.FAIL
    assert t.user_attrs["fail_reason"] == "non_finite"


# ------------------------------------------------------------ a plugin that raises


def test_plugin_raising_in_forward_fails_only_its_trial_and_is_named(
    plugin_host, tiny_spec, tiny_splits, tmp_path: Path, monkeypatch
) -> None:
    real = plugin_host.build
    calls = iter(range(100))

    def build(ref, **kwargs):
        b = real(ref, **kwargs)
        if next(calls) > 0:
            return b

        def broken(model, x):
            raise ValueError("bad kernel shape in plugin")

        return dataclasses.replace(b, features=broken, split=None)

    monkeypatch.setattr(plugin_host, "build", build)
    study = _optimize(tiny_spec(**{"train.epochs": 1}), tiny_splits, plugin_host, tmp_path,
                      GOOD, GOOD)
    bad, ok = study.trials
    assert bad.state == optuna.trial.TrialState.FAIL
    assert bad.user_attrs["fail_reason"] == "plugin_error"
    message = bad.user_attrs["fail_message"]
    dist = next(p.distribution for p in plugin_host.plugins
                if p.name == plugin_host.family_plugins["timm"])
    assert "plugin 'timm'" in message and f"distribution '{dist}" in message
    assert "bad kernel shape in plugin" in message
    assert ok.state == optuna.trial.TrialState.COMPLETE


class _BrokenFamily:
    """A third-party family whose build always raises (a plugin bug)."""

    name = "broken"
    modality = "image"
    weights_sources = ("pretrained", "none")

    def list_models(self, pattern=None):
        return ["net"]

    def build(self, model, *, weights, num_classes, image_size):
        raise RuntimeError("weights layout changed in v2")


def test_plugin_raising_while_building_is_named_before_any_trial(
    write_spec, storage_url: str, monkeypatch
) -> None:
    """The preflight builds every candidate: a build that always fails is exit 2,
    one line naming the plugin, its distribution and the error, and no study."""
    from typer.testing import CliRunner

    from autotransfer.cli import app
    from autotransfer.plugins.host import PluginHost, PluginInfo

    host = PluginHost.load()
    host.families["broken"] = _BrokenFamily()
    host.family_plugins["broken"] = "brokenplug"
    host.plugins.append(PluginInfo("brokenplug", "autotransfer-broken", "0.3.1", False))
    monkeypatch.setattr("autotransfer.tuning.search.get_plugin_host", lambda: host)
    result = CliRunner().invoke(app, ["search", str(write_spec()), "--storage", storage_url,
                                      "--backbones", "broken:net@none"])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.output
    for needle in ("plugin 'brokenplug'", "distribution 'autotransfer-broken 0.3.1'",
                   "broken:net@none", "RuntimeError: weights layout changed in v2"):
        assert needle in line, line
    assert optuna.get_all_study_names(storage_url) == []  # no study was created


# ------------------------------------------------------------ every trial fails


def test_every_trial_failing_exits_1_and_exports_nothing(
    write_spec, storage_url: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from autotransfer.cli import app

    spec = write_spec(**{"name": "doomed", "train.epochs": 1, "n_trials": 2,
                         "search.lr": 1e12, "search.alpha": 0.0, "search.freeze": 1.0})
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["search", str(spec), "--storage", storage_url,
                                      "--export", str(out), "--json"])
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "no successful trials in study 'doomed'" in errors[0]
    assert "2 trials: diverged" in errors[0] and "Traceback" not in result.output
    assert result.stdout == ""
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("model", ".model"))]


def test_cuda_cache_is_released_after_each_trial(monkeypatch) -> None:
    from autotransfer.tuning.search import release_cached_memory

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    release_cached_memory(None, None)  # type: ignore[arg-type]
    assert calls == ["empty_cache"]


def test_free_memory_collects_and_empties_the_cuda_cache(monkeypatch) -> None:
    import autotransfer.engine.trainer as training

    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    monkeypatch.setattr(training.gc, "collect", lambda: events.append("gc") or 0)
    training.free_memory()
    assert events == ["gc", "empty_cache"]


def test_oom_frees_memory_after_dropping_the_exception(
    plugin_host, tiny_spec, tiny_splits, tmp_path: Path, monkeypatch
) -> None:
    """A kept exception pins the batch's activations (its traceback's frames):
    memory is freed outside the ``except`` block, before the retry."""
    import sys

    import autotransfer.engine.trainer as training

    states: list[object] = []
    real = training.free_memory
    monkeypatch.setattr(training, "free_memory",
                        lambda: states.append(sys.exc_info()[1]) or real())
    _oom_host(plugin_host, monkeypatch, limit=4)
    study = _optimize(tiny_spec(**{"train.epochs": 1}), tiny_splits, plugin_host, tmp_path,
                      dict(GOOD, freeze=0.4))
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert states == [None]  # one OOM (8 -> 4), handled with no live exception
