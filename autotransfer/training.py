"""One trial's fine-tuning run: build -> freeze -> train epochs -> evaluate.

:class:`Trainer` yields an :class:`EpochResult` after every epoch so the caller
(the Optuna objective) can report it and decide to prune. The trainer keeps the
weights of its best epoch (by validation accuracy), not its last.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from autotransfer.augment import augment, normalise
from autotransfer.backbones import Backbone
from autotransfer.data import ImageSet, Splits
from autotransfer.exceptions import AutotransferError
from autotransfer.freeze import freeze, freeze_depth, train_mode
from autotransfer.retention import make_retention
from autotransfer.spec import StudySpec


class TrialError(AutotransferError):
    """A trial failed in a way that must not stop the study; ``reason`` names it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TrialParams:
    """The sampled hyperparameters of one trial."""

    backbone: str
    freeze: float
    lr: float
    weight_decay: float
    batch_size: int
    alpha: float


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    macro_f1: float
    loss: float


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float
    val: Metrics
    seconds: float
    is_best: bool


@torch.no_grad()
def evaluate(backbone: Backbone, data: ImageSet, batch_size: int = 256) -> Metrics:
    """Accuracy, macro-F1 and mean cross-entropy of ``backbone`` on ``data``."""
    model = backbone.model
    was_training = model.training
    model.eval()
    n_classes = len(data.classes)
    confusion = torch.zeros((n_classes, n_classes), dtype=torch.long)
    total_loss = 0.0
    for i in range(0, len(data), batch_size):
        x = normalise(data.images[i : i + batch_size], backbone.preprocessing)
        y = data.labels[i : i + batch_size]
        logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(1)
        confusion += torch.bincount(y * n_classes + pred, minlength=n_classes**2).view(
            n_classes, n_classes
        )
    model.train(was_training)
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = confusion.sum(1) > 0
    return Metrics(
        accuracy=float(tp.sum() / confusion.sum().clamp(min=1)),
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        loss=total_loss / max(1, len(data)),
    )


class Trainer:
    """Fine-tunes one backbone with one set of parameters.

    Args:
        backbone: freshly built, with a head for the target classes.
        splits: train/val/test sets (decoded once per worker).
        params: the trial's hyperparameters.
        spec: the study spec (epochs, optimizer, retention, augmentation).
        seed: seeds head init happened before; seeds batch order and augmentation.
        source: the source set, for ``retention: source``.
    """

    def __init__(
        self,
        backbone: Backbone,
        splits: Splits,
        params: TrialParams,
        spec: StudySpec,
        seed: int,
        source: ImageSet | None = None,
    ) -> None:
        self.backbone = backbone
        self.splits = splits
        self.params = params
        self.spec = spec
        self.generator = torch.Generator().manual_seed(seed)
        self.n_blocks = len(backbone.blocks)
        self.k_frozen = freeze_depth(params.freeze, self.n_blocks)
        self.frozen_norms = freeze(backbone.model, backbone.blocks, self.k_frozen)
        self.retention = (
            make_retention(
                spec.retention,
                backbone,
                source=source,
                batch_size=params.batch_size,
                generator=self.generator,
            )
            if params.alpha > 0
            else None
        )
        trainable = [p for p in backbone.model.parameters() if p.requires_grad]
        if self.retention is not None:
            trainable += self.retention.parameters()
        self.steps_per_epoch = math.ceil(len(splits.train) / params.batch_size)
        self.optimizer = self._optimizer(trainable)
        total = self.steps_per_epoch * spec.train.epochs
        # Warm up over 10 % of the steps, but at least 2 (capped at 30 %): with
        # pct_start * total == 1 (e.g. 10 steps) OneCycleLR divides by zero.
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=params.lr, total_steps=total,
            pct_start=min(0.3, max(0.1, 2 / total)),
        )
        self.best: EpochResult | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        wd = self.params.weight_decay
        if self.spec.train.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.params.lr, momentum=0.9, weight_decay=wd)
        return torch.optim.AdamW(params, lr=self.params.lr, weight_decay=wd)

    def _train_epoch(self) -> float:
        model, pre, alpha = self.backbone.model, self.backbone.preprocessing, self.params.alpha
        train_mode(model, self.frozen_norms)
        data = self.splits.train
        order = torch.randperm(len(data), generator=self.generator)
        total, count = 0.0, 0
        for i in range(0, len(order), self.params.batch_size):
            idx = order[i : i + self.params.batch_size]
            x = augment(normalise(data.images[idx], pre), self.spec.data.augment, self.generator)
            y = data.labels[idx]
            features = self.backbone.features(model, x)
            logits = self.backbone.classify(model, features)
            loss = F.cross_entropy(logits, y, label_smoothing=self.spec.train.label_smoothing)
            if self.retention is not None:
                loss = alpha * self.retention.loss(x, features) + (1 - alpha) * loss
            if not torch.isfinite(loss):
                raise TrialError(
                    "non_finite",
                    f"loss became {loss.item()} at step {i // self.params.batch_size}; "
                    "the learning rate is probably too high",
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += loss.item() * len(idx)
            count += len(idx)
        return total / max(1, count)

    def epochs(self) -> Iterator[EpochResult]:
        """Train epoch by epoch, yielding each epoch's validation metrics."""
        for epoch in range(1, self.spec.train.epochs + 1):
            start = time.perf_counter()
            train_loss = self._train_epoch()
            val = evaluate(self.backbone, self.splits.val, self.spec.train.eval_batch_size)
            if not math.isfinite(val.loss):
                raise TrialError("non_finite", f"validation loss became {val.loss} at epoch {epoch}")
            is_best = self.best is None or val.accuracy > self.best.val.accuracy
            result = EpochResult(epoch, train_loss, val, time.perf_counter() - start, is_best)
            if is_best:
                self.best = result
                self.best_state = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in self.backbone.model.state_dict().items()
                }
            yield result
