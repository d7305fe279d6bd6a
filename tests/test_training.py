"""One trial: seeding, best epoch (not last) as value and checkpoint, metrics."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from autotransfer.engine.trainer import Trainer, TrialParams, evaluate
from autotransfer.store.checkpoints import load_trial_backbone
from autotransfer.store.storage import artifact_store
from autotransfer.tuning.objective import Objective
from autotransfer.tuning.progress import Progress

GOOD = {"backbone": "timm:test_resnet@none", "freeze": 0.2, "lr": 5e-3,
        "weight_decay": 1e-4, "batch_size": 8, "alpha": 0.25}


def _run_objective(spec, splits, host, artifacts: Path, params: dict):
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(params)
    store = artifact_store(artifacts)
    study.optimize(Objective(spec, splits, host, store, Progress(epochs=spec.train.epochs)),
                   n_trials=1)
    return study.trials[0], store


def test_same_seed_and_params_give_identical_results(plugin_host, tiny_spec, tiny_splits) -> None:
    spec = tiny_spec()
    params = TrialParams(GOOD["backbone"], 0.2, 5e-3, 1e-4, 8, 0.25)

    def run(seed: int):
        torch.manual_seed(seed)
        b = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
        return [(r.train_loss, r.val) for r in Trainer(b, tiny_splits, params, spec, seed).epochs()]

    first, second = run(0), run(0)
    assert first == second  # bit-identical losses and metrics on CPU
    assert run(1) != first  # the seed matters, so the check above can fail


def test_objective_is_reproducible(plugin_host, tiny_spec, tiny_splits, tmp_path: Path) -> None:
    spec = tiny_spec()
    a, _ = _run_objective(spec, tiny_splits, plugin_host, tmp_path / "a", GOOD)
    b, _ = _run_objective(spec, tiny_splits, plugin_host, tmp_path / "b", GOOD)
    assert a.state == b.state == optuna.trial.TrialState.COMPLETE
    assert a.value == b.value
    assert a.intermediate_values == b.intermediate_values
    assert a.user_attrs["val_f1"] == b.user_attrs["val_f1"]


def test_value_and_checkpoint_are_the_best_epoch_not_the_last(
    plugin_host, tiny_spec, tiny_splits, tmp_path: Path, monkeypatch
) -> None:
    """Epoch 2 is sabotaged (the head then predicts one class): the trial's value
    and its stored checkpoint must still be epoch 1's."""
    spec = tiny_spec(**{"train.epochs": 2})
    real_epoch = Trainer._train_epoch
    epochs_seen = []

    def sabotaged(self: Trainer) -> float:
        loss = real_epoch(self)
        epochs_seen.append(len(epochs_seen) + 1)
        if len(epochs_seen) == 2:
            head = self.backbone.model.get_classifier()
            with torch.no_grad():
                head.weight.zero_()
                head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
        return loss

    monkeypatch.setattr(Trainer, "_train_epoch", sabotaged)
    trial, store = _run_objective(spec, tiny_splits, plugin_host, tmp_path / "art", GOOD)
    assert trial.state == optuna.trial.TrialState.COMPLETE
    first, last = trial.intermediate_values[1], trial.intermediate_values[2]
    assert last == pytest.approx(1 / 3)  # one class of three, balanced val set
    assert first > last, "epoch 1 must beat the sabotaged epoch for this test to mean anything"
    assert trial.value == first
    assert trial.user_attrs["best_epoch"] == 1
    assert trial.user_attrs["epochs_run"] == 2

    backbone = load_trial_backbone(trial, plugin_host, store, num_classes=3, image_size=32)
    reloaded = evaluate(backbone, tiny_splits.val)
    assert reloaded.accuracy == trial.value
    assert reloaded.macro_f1 == pytest.approx(trial.user_attrs["val_f1"])
    assert backbone.weights == "none" and backbone.name == "timm:test_resnet"


def test_value_is_max_over_epochs(plugin_host, tiny_spec, tiny_splits, tmp_path: Path) -> None:
    spec = tiny_spec(**{"train.epochs": 3})
    trial, store = _run_objective(spec, tiny_splits, plugin_host, tmp_path, GOOD)
    values = trial.intermediate_values
    assert sorted(values) == [1, 2, 3]
    assert trial.value == max(values.values())
    backbone = load_trial_backbone(trial, plugin_host, store, num_classes=3, image_size=32)
    reloaded = evaluate(backbone, tiny_splits.val)
    assert reloaded.accuracy == trial.value
    assert reloaded.loss == pytest.approx(trial.user_attrs["val_loss"])


def test_equal_accuracy_epochs_are_ranked_by_validation_loss(
    plugin_host, tiny_spec, tiny_splits, monkeypatch
) -> None:
    """Epochs 2-4 tie on accuracy; the lowest loss among them (epoch 3) is the best,
    not the first; epoch 1 has the lowest loss but a lower accuracy."""
    from autotransfer.engine.trainer import Metrics

    scripted = iter([Metrics(0.5, 0.5, 0.2), Metrics(0.6, 0.6, 0.9), Metrics(0.6, 0.6, 0.7),
                     Metrics(0.6, 0.6, 0.8)])
    monkeypatch.setattr(Trainer, "_train_epoch", lambda self: 0.0)
    monkeypatch.setattr(Trainer, "_evaluate", lambda self: next(scripted))
    spec = tiny_spec(**{"train.epochs": 4})
    b = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    trainer = Trainer(b, tiny_splits, TrialParams(GOOD["backbone"], 0.2, 5e-3, 1e-4, 8, 0.25),
                      spec, 0)
    flags = [r.is_best for r in trainer.epochs()]
    assert flags == [True, True, True, False]
    assert trainer.best is not None and trainer.best.epoch == 3


def test_evaluate_metrics(plugin_host, tiny_splits) -> None:
    from autotransfer.spec.model import BackboneRef

    b = plugin_host.build(BackboneRef(name="timm:test_resnet", weights="none"),
                          num_classes=3, image_size=32)
    head = b.model.get_classifier()
    with torch.no_grad():  # always class 1
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    m = evaluate(b, tiny_splits.val, batch_size=4)  # several batches
    assert m.accuracy == pytest.approx(1 / 3)
    # F1: class 1 has precision 1/3, recall 1 -> 0.5; the others 0.
    assert m.macro_f1 == pytest.approx(0.5 / 3)
    assert m.loss > 0


def test_very_high_lr_fails_the_trial_with_a_reason(
    plugin_host, tiny_spec, tiny_splits, tmp_path: Path
) -> None:
    spec = tiny_spec(**{"search.lr": {"low": 1e-3, "high": 1e12, "log": True}})
    params = dict(GOOD, lr=1e12, freeze=0.0, alpha=0.0)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(params)
    from autotransfer.engine.trainer import TrialError

    study.optimize(
        Objective(spec, tiny_splits, plugin_host, artifact_store(tmp_path), Progress()),
        n_trials=1, catch=(TrialError,),
    )
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.FAIL
    assert t.user_attrs["fail_reason"] == "non_finite"


def test_per_class_metrics_and_the_confusion_matrix() -> None:
    from autotransfer.engine.trainer import Metrics

    # 3 classes: 'a' all right, 'b' half taken for 'a', 'c' never predicted.
    m = Metrics(accuracy=0.5, macro_f1=0.0, loss=0.0, confusion=[[2, 0, 0], [1, 1, 0],
                                                                 [0, 2, 0]])
    per_class = m.per_class(["a", "b", "c"])
    assert per_class["a"] == {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    assert per_class["b"]["precision"] == 1 / 3 and per_class["b"]["recall"] == 0.5
    assert per_class["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    record = m.record(["a", "b", "c"])
    assert record["n"] == 6 and record["classes"] == ["a", "b", "c"]
    assert record["confusion"] == [[2, 0, 0], [1, 1, 0], [0, 2, 0]]
    assert Metrics(0.5, 0.5, 0.1).per_class(["a"]) == {}  # no matrix (an old epoch state)
