"""A final refit: the chosen trial trained again on train + validation.

The search chose the trial (its parameters and its best epoch) on the
validation split; once chosen, the validation examples can also be trained on.
:func:`refit_trial` rebuilds the trial's model as it started (its weights and
head seeded as in the trial, :func:`~autotransfer.store.checkpoints.load_trial_backbone`
with ``checkpoint=False``), trains it with the trial's parameters and seed on
train + validation for the trial's best epoch count (the engine's
:class:`~autotransfer.engine.trainer.Trainer`, :meth:`~Trainer.fit`: no
validation, no selection, no pruning) and measures it on the test split.
On by default (``export.refit``); docs/search.md says why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import optuna
import torch

from autotransfer.backbones import Backbone
from autotransfer.data.datasets import Dataset, Splits, concat
from autotransfer.engine.device import WorkerDevice
from autotransfer.engine.trainer import Trainer, TrialParams, evaluate
from autotransfer.exceptions import StorageError
from autotransfer.plugins.host import PluginHost
from autotransfer.spec.model import StudySpec
from autotransfer.store.checkpoints import load_trial_backbone
from autotransfer.store.records import BEST_EPOCH_ATTR


@dataclass
class RefitResult:
    """A refit model and what it was trained on."""

    backbone: Backbone
    """The refit model, on the CPU, in eval mode."""
    trial: int
    epochs: int
    """Epochs trained: the trial's best epoch."""
    train_examples: int
    """Examples in train + validation."""
    examples_seen: int
    """Training examples stepped on over all epochs (``epochs * train_examples``)."""
    train_losses: list[float]
    test: dict[str, Any] | None
    """Test metrics of the refit model (:meth:`~autotransfer.engine.trainer.Metrics.record`);
    None when not asked for."""
    seconds: float


def trial_params(trial: optuna.trial.FrozenTrial) -> TrialParams:
    """The :class:`TrialParams` a finished trial trained with."""
    p = trial.params
    return TrialParams(
        backbone=str(p["backbone"]), freeze=float(p["freeze"]), lr=float(p["lr"]),
        weight_decay=float(p["weight_decay"]), batch_size=int(p["batch_size"]),
        alpha=float(p["alpha"]), retention=p.get("retention"),
        trunk_lr_scale=float(p.get("trunk_lr_scale", 1.0)),  # stored before it existed: 1
        probe_fraction=float(p.get("probe_fraction", 0.0)),  # stored before it existed: 0
    )


def refit_trial(
    trial: optuna.trial.FrozenTrial,
    spec: StudySpec,
    host: PluginHost,
    store: Any,
    splits: Splits,
    source: Dataset | None = None,
    device: WorkerDevice | None = None,
    message: Any = None,
    test: bool = True,
) -> RefitResult:
    """Train ``trial``'s model again on ``splits.train`` + ``splits.val`` for its
    best epoch count, with its parameters and the study's seed; test metrics
    on ``splits.test`` (unless ``test`` is False).

    Raises:
        StorageError: the trial records no best epoch (it did not complete).
        TrialError: the refit diverged, or ran out of memory.
    """
    say = message or (lambda _msg: None)
    best_epoch = trial.user_attrs.get(BEST_EPOCH_ATTR)
    if not best_epoch:
        raise StorageError(
            f"trial {trial.number} records no best epoch; refit a COMPLETE trial "
            "(see `autotransfer trials`)"
        )
    epochs = int(best_epoch)
    start = time.perf_counter()
    # As in the trial (autotransfer.tuning.objective): the seed, then the build, so
    # the new head starts from the same draw.
    torch.manual_seed(spec.seed)
    backbone = load_trial_backbone(
        trial, host, store, num_classes=len(splits.classes), image_size=spec.data.image_size,
        listed=spec.search.backbones, checkpoint=False,
    )
    device = device or WorkerDevice.for_evaluation(spec.train)
    placement = device.placement(backbone)
    train = concat(splits.train, splits.val)
    say(
        f"refit: trial {trial.number} ({backbone.name}) on train + validation "
        f"({len(train)} examples) for {epochs} epoch(s)"
    )
    refit_splits = Splits(device.data(train), device.data(splits.val), splits.test)
    trainer = Trainer(
        backbone, refit_splits, trial_params(trial), spec, spec.seed, source,
        cache=None, placement=placement,
    )
    losses = trainer.fit(epochs)
    metrics = None
    if test:
        say("refit: computing test metrics of the refit model")
        metrics = evaluate(
            backbone, device.data(splits.test), spec.train.eval_batch_size, placement=placement
        ).record(list(splits.classes))
    model = backbone.model
    for p in model.parameters():
        p.requires_grad_(True)
    model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    return RefitResult(
        backbone=backbone, trial=trial.number, epochs=epochs, train_examples=len(train),
        examples_seen=trainer.examples_seen, train_losses=losses, test=metrics,
        seconds=time.perf_counter() - start,
    )
