"""One trial's fine-tuning run: build -> freeze -> train epochs -> evaluate.

:class:`Trainer` yields an :class:`EpochResult` after every epoch so the caller
(the Optuna objective) can report it and decide to prune. The trainer keeps the
weights of its best epoch (by validation accuracy; ties: the lower validation
loss), not its last.

Long because one :class:`Trainer` owns the mutable state that the epoch loop,
evaluation, the feature cache, OOM micro-batching and the epoch-state resume
all share; ``evaluate``/``Metrics`` are the next piece to move to their own module.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from autotransfer.backbones import Backbone
from autotransfer.backbones.freeze import freeze, freeze_depth, train_mode
from autotransfer.data.augment import augmentation_plan, is_identity
from autotransfer.data.batches import (
    Batch,
    forward,
    group_overhead,
    length_groups,
    make_batch,
    take,
)
from autotransfer.data.datasets import Dataset, ImageSet, Splits
from autotransfer.data.placement import to_device
from autotransfer.engine.device import CPU, Placement
from autotransfer.engine.feature_cache import CacheKey, FeatureCache, prefix_fingerprint
from autotransfer.engine.retention import make_retention
from autotransfer.exceptions import AutotransferError
from autotransfer.spec.model import StudySpec


class TrialError(AutotransferError):
    """A trial failed in a way that must not stop the study; ``reason`` names it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_OOM_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error: ``torch.OutOfMemoryError``, the
    ``RuntimeError`` forms ("CUDA error: out of memory", "DefaultCPUAllocator:
    can't allocate memory") or the host's :class:`MemoryError`."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def oom_summary(exc: BaseException) -> str:
    """``Type: first line of the message`` of an out-of-memory error."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def free_memory() -> None:
    """Give memory back after an out-of-memory error (call it outside the
    ``except`` block, once the exception and the batch tensors are dropped)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


DIVERGENCE_FACTOR = 1000.0
"""A batch loss this many times the first one's fails the trial (``diverged``)."""

CHECK_EVERY = 16
"""On a GPU, the steps whose losses one non-blocking look by the host covers."""


class StepLosses:
    """One epoch's per-step summed losses, kept on the device; ``check(values,
    start)`` looks at the mean losses of steps ``start, start + 1, ...`` in step
    order and raises to fail the trial.

    On a GPU the host never waits for them inside the epoch: every
    :data:`CHECK_EVERY` steps a non-blocking copy of the new ones to pinned
    memory is started and checked once it has arrived (an event query, no
    wait), so a non-finite or diverged loss fails the trial a few steps late,
    still named by its exact step. :meth:`finish` reads them all: the epoch's
    one host sync. On the CPU there is no queue to stall: each step is checked
    as it ends."""

    def __init__(self, device: torch.device, check: Callable[[list[float], int], None]) -> None:
        self.device = device
        self.check = check
        self.losses: list[torch.Tensor] = []
        self.sizes: list[int] = []
        self.checked = 0  # steps looked at
        self._pending: tuple[int, torch.Tensor, Any] | None = None  # end, host copy, event

    def add(self, loss_sum: torch.Tensor, size: int) -> None:
        self.losses.append(loss_sum)
        self.sizes.append(size)
        if self.device.type != "cuda":
            self._check(self.checked, [float(loss_sum)])
            return
        self._poll()
        if self._pending is None and len(self.losses) - self.checked >= CHECK_EVERY:
            new = torch.stack(self.losses[self.checked :])
            host = torch.empty(new.shape, dtype=new.dtype, pin_memory=True)
            host.copy_(new, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (len(self.losses), host, event)

    def _poll(self) -> None:
        if self._pending is not None and self._pending[2].query():
            end, host, _ = self._pending
            self._pending = None
            self._check(self.checked, host.tolist()[: end - self.checked])

    def _check(self, start: int, sums: list[float]) -> None:
        self.check([v / self.sizes[start + i] for i, v in enumerate(sums)], start)
        self.checked = start + len(sums)

    def finish(self) -> float:
        """The epoch's mean loss per example, after checking every step not
        looked at yet (one host sync)."""
        if not self.losses:
            return 0.0
        self._pending = None
        values = torch.stack(self.losses).tolist()
        if self.checked < len(values):
            self._check(self.checked, values[self.checked :])
        return sum(values) / max(1, sum(self.sizes))


@dataclass(frozen=True)
class TrialParams:
    """The sampled hyperparameters of one trial."""

    backbone: str
    freeze: float
    lr: float
    weight_decay: float
    batch_size: int
    alpha: float
    retention: str | None = None
    """``L_pre``'s kind (``none``: no retention); None: the spec's first kind."""
    trunk_lr_scale: float = 1.0
    """The trunk's learning rate is ``lr * trunk_lr_scale``; the head's (and a
    retention head's) is ``lr``. 1.0, one rate for all, is what trials stored
    before the parameter existed trained with."""
    probe_fraction: float = 0.0
    """LP-FT: the share of the epochs (``round(probe_fraction * epochs)``, half
    up) that train the new head alone, every trunk block frozen, before the
    ``freeze`` depth applies. 0.0 is what trials stored before the parameter
    existed trained with."""


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    macro_f1: float
    loss: float
    confusion: list[list[int]] | None = None
    """``confusion[i][j]``: examples of class i predicted as class j (label order)."""

    def per_class(self, classes: list[str]) -> dict[str, dict[str, float | int]]:
        """Precision, recall, F1 and support of each class, by class name (0 where
        a class is never predicted, or has no examples)."""
        if self.confusion is None:
            return {}
        cm = torch.tensor(self.confusion, dtype=torch.float64)
        tp = cm.diag()
        precision = tp / cm.sum(0).clamp(min=1)
        recall = tp / cm.sum(1).clamp(min=1)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall),
                         0.0)
        return {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(cm[i].sum())}
            for i, name in enumerate(classes)
        }

    def record(self, classes: list[str]) -> dict[str, Any]:
        """The stored form of test metrics: accuracy, macro-F1, ``n``, per-class
        precision/recall/F1/support and the confusion matrix (rows: true class,
        columns: predicted, both in the order of ``classes``)."""
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "n": int(sum(map(sum, self.confusion))) if self.confusion is not None else None,
            "classes": list(classes),
            "per_class": self.per_class(classes),
            "confusion": self.confusion,
        }


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float
    val: Metrics
    seconds: float
    is_best: bool


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def evaluate(
    backbone: Backbone,
    data: Dataset,
    batch_size: int = 256,
    on_batch: Callable[[], None] | None = None,
    states: torch.Tensor | None = None,
    point: int = 0,
    placement: Placement | None = None,
) -> Metrics:
    """Accuracy, macro-F1, mean cross-entropy and the confusion matrix of
    ``backbone`` on ``data`` (``on_batch`` is called after each batch: a sign of
    progress), on the model's device (and in ``placement``'s precision and
    memory layout); :meth:`Metrics.per_class` and :meth:`Metrics.record` derive
    the per-class figures. With ``states``, the outputs of the backbone's first
    ``point`` blocks on every row of ``data`` (the feature cache, on the
    device), only the rest of the model runs. The confusion matrix and the loss
    stay on the device until the end: one host sync per evaluation."""
    model = backbone.model
    placement = placement or Placement(model_device(model), "fp32", False, False)
    device = placement.device
    was_training = model.training
    model.eval()
    n_classes = len(data.classes)
    confusion = torch.zeros((n_classes, n_classes), dtype=torch.long, device=device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    overhead = group_overhead(device)
    for i in range(0, len(data), batch_size):
        batch = slice(i, i + batch_size)
        # the metrics do not depend on the order of rows: texts go by length groups
        for rows in [batch] if states is not None else length_groups(data, batch, backbone,
                                                                      overhead):
            y = to_device(data.labels[rows], device)
            with placement.autocast():
                if states is not None:
                    assert backbone.split is not None
                    h = backbone.split.suffix(
                        model, _layout(placement, to_device(states[rows], device)), point
                    )
                    logits = backbone.classify(model, h).float()
                else:
                    x = make_batch(data, rows, backbone, device=device)
                    logits = forward(model, _layout(placement, x)).float()
            total_loss += F.cross_entropy(logits, y, reduction="sum")
            pred = logits.argmax(1)
            # index_add_, not bincount: bincount on a GPU reads its maximum on the host.
            confusion.view(-1).index_add_(0, y * n_classes + pred, torch.ones_like(y))
        if on_batch is not None:
            on_batch()
    model.train(was_training)
    confusion = confusion.cpu()
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = confusion.sum(1) > 0
    return Metrics(
        accuracy=float(tp.sum() / confusion.sum().clamp(min=1)),
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        loss=float(total_loss) / max(1, len(data)),
        confusion=confusion.tolist(),
    )


def _layout(placement: Placement, x: Batch) -> Batch:
    return placement.batch(x) if isinstance(x, torch.Tensor) else x


class Trainer:
    """Fine-tunes one backbone with one set of parameters.

    Args:
        backbone: freshly built, with a head for the target classes.
        splits: train/val/test sets (decoded once per worker).
        params: the trial's hyperparameters.
        spec: the study spec (epochs, optimizer, retention, augmentation).
        seed: seeds head init happened before; seeds batch order and augmentation.
        source: the source set, for ``retention: source``.
        cache: the worker's feature cache (None: off).
        placement: device, precision and memory layout
            (:mod:`autotransfer.engine.device`); default: the CPU in fp32. The
            model moves there before its optimizer is built; ``splits`` and
            ``source`` should already be there (``WorkerDevice.data``) or on the
            host, whence each batch is copied.

    With a split forward (:attr:`Backbone.split`) and ``j`` > 0, the deepest split
    point at or below the frozen depth, each batch runs the first ``j`` blocks
    without gradients in eval mode, then the rest; ``retention: distill``'s
    teacher runs only the rest, on the same prefix output. With a cache, those
    prefix outputs come from it: validation once, training images as
    ``train.feature_cache_views`` augmented views, epoch e on view
    ``(e - 1) mod views``. Epoch e's augmentation is view ``e - 1`` of
    :func:`~autotransfer.data.augment.augmentation_plan` either way, so a
    cached trial with as many views as epochs trains on the same inputs as an
    uncached one. The prefix runs on the placement's device under its
    autocast, and the cache keeps its outputs there.

    With ``params.probe_fraction`` > 0 (LP-FT), the first :attr:`probe_epochs`
    epochs freeze every trunk block (the prefix, and the cache, then cover the
    whole trunk as far as a split point goes); the next epoch freezes only the
    trial's ``freeze`` depth. The optimiser and the one-cycle schedule are the
    trial's from the start: trunk parameters without gradients are skipped.
    """

    def __init__(
        self,
        backbone: Backbone,
        splits: Splits,
        params: TrialParams,
        spec: StudySpec,
        seed: int,
        source: ImageSet | None = None,
        cache: FeatureCache | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.placement = placement = placement or CPU
        self.device = placement.device
        placement.place_model(backbone.model)  # before retention copies and the optimizer
        self.backbone = backbone
        self.splits = splits
        self.params = params
        self.spec = spec
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.n_blocks = len(backbone.blocks)
        self.k_frozen = freeze_depth(params.freeze, self.n_blocks)
        """The trial's freeze depth (after the probe epochs, if any)."""
        self.probe_epochs = min(
            spec.train.epochs - 1, math.floor(params.probe_fraction * spec.train.epochs + 0.5)
        )
        """LP-FT: the first epochs, which train the head alone (``probe_fraction``;
        the last epoch always trains the trunk)."""
        self.augment = None if is_identity(spec.data.augment) else spec.data.augment
        self.views = 1 if self.augment is None else spec.train.feature_cache_views
        """Training views cached (used when the cache holds this trial's features)."""
        self.features_cached = False
        """Whether the last epoch's training features came from the cache."""
        self._cache_store = cache
        self._uncacheable = False
        """Set when the prefix's outputs are not a tensor (a text model's dict)."""
        self._set_depth(self.k_frozen)  # before l2sp anchors the trained parameters
        self.trial_point = self.point
        """The split point at the trial's freeze depth (after the probe epochs)."""
        self.retention_kind = params.retention or spec.retention_kinds[0]
        self.retention = (
            make_retention(
                self.retention_kind,
                backbone,
                source=source,
                batch_size=params.batch_size,
                generator=self.generator,
                device=self.device,
                channels_last=placement.channels_last,
            )
            if params.alpha > 0 and self.retention_kind != "none"
            else None
        )
        self.steps_per_epoch = math.ceil(len(splits.train) / params.batch_size)
        # The optimiser holds every parameter the trial's depth trains; during the
        # probe epochs the trunk's have no gradients, and AdamW/SGD skip them.
        self.optimizer = self._optimizer(self._param_groups())
        if self.probe_epochs:
            self._set_depth(self.n_blocks)
        self.scaler = placement.grad_scaler()
        self._features = placement.compiled(backbone.features)
        total = self.steps_per_epoch * spec.train.epochs
        # Warm up over 10 % of the steps, but at least 2 (capped at 30 %): with
        # pct_start * total == 1 (e.g. 10 steps) OneCycleLR divides by zero.
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=[g["lr"] for g in self.optimizer.param_groups],
            total_steps=total,
            pct_start=min(0.3, max(0.1, 2 / total)),
        )
        # Largest forward that fits; halved on out-of-memory (see _step).
        self.micro_batch_size = params.batch_size
        self.min_batch_size = min(spec.train.min_batch_size, params.batch_size)
        self.oom_events = 0
        # What another text length group costs, in padded tokens (length_groups).
        self.group_overhead = group_overhead(self.device)
        self.reference_loss: float | None = None
        self.eval_batch_size = spec.train.eval_batch_size
        self.best: EpochResult | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epoch = 0  # the last finished epoch
        self.examples_seen = 0  # training examples stepped on, over all epochs
        self.history: list[tuple[int, float]] = []  # (epoch, val accuracy), as reported
        # Called after every batch (training and validation): the watchdog's heartbeat.
        self.on_batch: Callable[[], None] | None = None

    def _set_depth(self, k: int) -> None:
        """Freeze the first ``k`` blocks (the others train) and set what follows
        from it: the frozen normalisation layers, the split point and the
        feature cache's key for that prefix."""
        backbone = self.backbone
        self.k_active = k
        """Blocks frozen now: :attr:`n_blocks` during the probe epochs, then
        :attr:`k_frozen`."""
        self.frozen_norms = freeze(backbone.model, backbone.blocks, k)
        split = backbone.split
        self.point = split.point_at_most(k) if split is not None else 0
        """Blocks run as a prefix (no gradients, eval mode); 0: none."""
        self._key: dict[str, object] | None = None  # made when first needed (_cache_key)

    @property
    def cache(self) -> FeatureCache | None:
        """The worker's cache while the prefix's outputs can go in it: a prefix
        to cache (:attr:`point` > 0) whose outputs are tensors."""
        return self._cache_store if self.point and not self._uncacheable else None

    def _cache_key(self) -> dict[str, object]:
        """What the cached prefix outputs depend on (:class:`CacheKey` less the
        split and view), made once per depth: the prefix's blocks never train."""
        if self._key is None:
            backbone = self.backbone
            self._key = {
                "backbone": backbone.name,
                "weights": backbone.weights,
                "prefix_sha256": prefix_fingerprint(backbone.model, backbone.blocks, self.point),
                "point": self.point,
                "preprocessing": json.dumps(backbone.preprocessing.to_dict(), sort_keys=True),
                "data": self.spec.data.model_dump_json(exclude={"augment"}),
            }
        return self._key

    def _depth_for(self, epoch: int) -> int:
        """Blocks frozen in ``epoch`` (1-based): all during the probe epochs."""
        return self.n_blocks if epoch <= self.probe_epochs else self.k_frozen

    def _param_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters in two groups: the new heads (the backbone's
        and a retention head) at ``lr``, the unfrozen trunk blocks at
        ``lr * trunk_lr_scale``; an empty group is left out."""
        head_names = set(self.backbone.head)
        head: list[torch.nn.Parameter] = []
        trunk: list[torch.nn.Parameter] = []
        for name, p in self.backbone.model.named_parameters():
            if p.requires_grad:
                (head if name in head_names else trunk).append(p)
        if self.retention is not None:
            head += self.retention.parameters()
        groups = [
            {"params": head, "lr": self.params.lr},
            {"params": trunk, "lr": self.params.lr * self.params.trunk_lr_scale},
        ]
        return [g for g in groups if g["params"]]

    def _optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        wd = self.params.weight_decay
        if self.spec.train.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.params.lr, momentum=0.9, weight_decay=wd)
        return torch.optim.AdamW(groups, lr=self.params.lr, weight_decay=wd)

    @torch.no_grad()
    def _prefix(self, x: Batch) -> Batch:
        """The first :attr:`point` blocks on ``x``, in eval mode, no gradients."""
        model = self.backbone.model
        was_training = model.training
        model.eval()
        try:
            assert self.backbone.split is not None
            with self.placement.autocast():
                return self.backbone.split.prefix(model, _layout(self.placement, x), self.point)
        finally:
            if was_training:
                train_mode(model, self.frozen_norms)

    def _cached(self, split: str, view: int | None) -> torch.Tensor | None:
        """The cached prefix outputs of every row of ``split`` (training view
        ``view``, or None: unaugmented), computed now if missing; None when the
        cache cannot hold them."""
        if self.cache is None:
            return None
        data = getattr(self.splits, split)
        draws = (
            augmentation_plan(len(data), self.seed, view)
            if view is not None and self.augment is not None
            else None
        )
        name = "eval"
        if draws is not None and self.augment is not None:
            name = f"train:{self.seed}:{view}:{self.augment.model_dump_json()}"
        key = CacheKey(**self._cache_key(), split=split, view=name)  # type: ignore[arg-type]
        size = self.eval_batch_size

        def batches() -> Iterator[tuple[slice, torch.Tensor]]:
            for i in range(0, len(data), size):
                rows = slice(i, i + size)
                x = make_batch(data, rows, self.backbone, self.augment,
                               draws=draws[rows] if draws is not None else None,
                               device=self.device)
                state = self._prefix(x)
                if not isinstance(state, torch.Tensor):  # a text model's dict: not cached
                    self._uncacheable = True
                    return
                yield rows, state
                if self.on_batch is not None:
                    self.on_batch()

        return self.cache.get_or_compute(key, len(data), batches)

    def _train_epoch(self) -> float:
        model = self.backbone.model
        epoch = self.epoch + 1
        if self._depth_for(epoch) != self.k_active:  # the probe epochs are over
            self._set_depth(self._depth_for(epoch))
        train_mode(model, self.frozen_norms)
        data = self.splits.train
        order = torch.randperm(len(data), generator=self.generator)
        states = self._cached("train", (epoch - 1) % self.views)
        self.features_cached = states is not None
        draws = (
            augmentation_plan(len(data), self.seed, epoch - 1)
            if states is None and self.augment is not None and data.modality == "image"
            else None
        )
        # Rows are gathered where they are (the device, or the host for data too
        # big for it): a host index into device tensors is a copy that the host
        # waits for, every step.
        where = states.device if states is not None else data.labels.device
        order = order.to(where)
        labels = data.labels.to(where)
        if draws is not None:
            draws = draws.to(where)
        # Per-step losses stay on the device (see StepLosses: a per-step .item()
        # would stall a GPU's queue of kernels).
        losses = StepLosses(self.device, self._check_losses)
        for step, i in enumerate(range(0, len(order), self.params.batch_size)):
            idx = order[i : i + self.params.batch_size]
            parts: list[tuple[Batch, torch.Tensor]] = []
            if states is not None:
                x: Batch = _layout(self.placement, to_device(states[idx], self.device))
                parts.append((x, to_device(labels[idx], self.device)))
            else:
                # texts: rows of similar length together (less padding), one step
                for rows in length_groups(data, idx, self.backbone, self.group_overhead):
                    x = make_batch(data, rows, self.backbone, self.augment,
                                   draws=draws[rows] if draws is not None else None,
                                   device=self.device)
                    x = _layout(self.placement, x)
                    if self.point:
                        x = self._prefix(x)
                    parts.append((x, to_device(labels[rows], self.device)))
            while True:
                try:
                    loss_sum = self._step(parts, step)
                    break
                except TrialError:
                    raise
                except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM
                    if not is_out_of_memory(exc):
                        raise
                    error = oom_summary(exc)
                # Out of the except block: the exception (and the frames holding the
                # batch's activations) is gone, so the memory can really be freed.
                self._shrink_micro_batch(error)
            losses.add(loss_sum, len(idx))
            self.examples_seen += len(idx)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            if self.on_batch is not None:
                self.on_batch()
        return losses.finish()

    def _check_losses(self, means: list[float], start: int) -> None:
        """Fail the trial if the mean loss of step ``start + i`` (``means[i]``)
        is not finite or has diverged, in step order."""
        for step, loss in enumerate(means, start):
            if not math.isfinite(loss):
                raise TrialError(
                    "non_finite",
                    f"loss became {loss} at step {step}; "
                    "the learning rate is probably too high",
                )
            self._check_divergence(loss, step)

    def _step(self, parts: list[tuple[Batch, torch.Tensor]], step: int) -> torch.Tensor:
        """Forward and backward of one optimiser batch, given as ``parts`` (inputs
        and labels: one part, or a text batch's :func:`length_groups`; inputs are
        the model's, or with :attr:`point` > 0 the prefix's outputs), each in
        micro-batches of at most ``micro_batch_size`` with the gradients
        accumulated: each micro-batch's mean loss is weighted by its share of the
        batch, so the gradient (and the sampled ``batch_size``, the learning-rate
        schedule and the steps per epoch) is that of the whole batch. Returns the
        batch's summed loss (a tensor on the device; :meth:`_check_losses` looks
        at it). Forward and loss run under the placement's autocast; fp16 scales
        the loss (gradient scaler)."""
        model, alpha = self.backbone.model, self.params.alpha
        self.optimizer.zero_grad(set_to_none=True)
        n = sum(len(y) for _, y in parts)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        micro = [(take(x, slice(j, j + self.micro_batch_size)), y[j : j + self.micro_batch_size])
                 for x, y in parts for j in range(0, len(y), self.micro_batch_size)]
        for xb, yb in micro:
            with self.placement.autocast():
                if self.point:
                    assert self.backbone.split is not None
                    features = self.backbone.split.suffix(model, xb, self.point)
                else:
                    features = self._features(model, xb)
                logits = self.backbone.classify(model, features)
                loss = F.cross_entropy(
                    logits.float(), yb, label_smoothing=self.spec.train.label_smoothing
                )
                if self.retention is not None:
                    retained = self.retention.loss(xb, features, self.point).float()
                    loss = alpha * retained + (1 - alpha) * loss
            weighted = loss * (len(yb) / n)
            (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
            total += loss.detach() * len(yb)
            del features, logits, loss, weighted
        return total

    def _check_divergence(self, loss: float, step: int) -> None:
        """Stop a trial whose loss explodes while still finite (AdamW with a huge
        learning rate keeps it finite but in the millions): a batch loss above
        ``DIVERGENCE_FACTOR`` times the trial's first batch loss (at least the
        chance-level cross-entropy, ln(classes)) fails it with reason ``diverged``."""
        if self.reference_loss is None:
            self.reference_loss = max(loss, math.log(max(2, len(self.splits.classes))))
        elif loss > DIVERGENCE_FACTOR * self.reference_loss:
            raise TrialError(
                "diverged",
                f"loss {loss:.4g} at step {step} is over {DIVERGENCE_FACTOR:g} times the "
                f"first batch's ({self.reference_loss:.4g}); the learning rate is probably "
                "too high",
            )

    def _shrink_micro_batch(self, error: str) -> None:
        """Halve the micro-batch after an out-of-memory error, or fail the trial
        with reason ``oom`` when it is already at ``train.min_batch_size``."""
        self.optimizer.zero_grad(set_to_none=True)
        free_memory()
        smaller = self.micro_batch_size // 2
        if smaller < self.min_batch_size:
            raise TrialError(
                "oom",
                f"out of memory at batch size {self.micro_batch_size} (the floor, "
                f"train.min_batch_size = {self.min_batch_size}): {error}; use a smaller "
                "model, image size or batch size, or lower train.min_batch_size",
            )
        self.micro_batch_size = smaller
        self.oom_events += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to go on after the last finished epoch as if never
        stopped: weights, optimiser, scheduler, random generators, best epoch and
        its weights, reference loss, micro-batch sizes, reported values."""
        return {
            "epoch": self.epoch,
            "model": self.backbone.model.state_dict(),
            "retention": [p.detach() for p in self.retention.parameters()]
            if self.retention is not None
            else [],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
            else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best": asdict(self.best) if self.best is not None else None,
            "best_state": self.best_state,
            "reference_loss": self.reference_loss,
            "micro_batch_size": self.micro_batch_size,
            "eval_batch_size": self.eval_batch_size,
            "oom_events": self.oom_events,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (of a trial with the same parameters):
        :meth:`epochs` then continues at the epoch after ``state["epoch"]``."""
        self.backbone.model.load_state_dict(state["model"], strict=True)
        with torch.no_grad():
            params = self.retention.parameters() if self.retention is not None else []
            if len(params) != len(state["retention"]):
                raise ValueError("the saved state is of a different retention")
            for p, saved in zip(params, state["retention"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        # Saved on another device (or precision): only what applies here is restored.
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if state.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        best = state["best"]
        if best is not None:
            best = EpochResult(**{**best, "val": Metrics(**best["val"])})
        self.best = best
        self.best_state = state["best_state"]
        self.reference_loss = state["reference_loss"]
        self.micro_batch_size = state["micro_batch_size"]
        self.eval_batch_size = state["eval_batch_size"]
        self.oom_events = state["oom_events"]
        self.history = [(int(e), float(v)) for e, v in state["history"]]
        self.epoch = int(state["epoch"])

    def epochs(self) -> Iterator[EpochResult]:
        """Train epoch by epoch (after the last finished one, if restored),
        yielding each epoch's validation metrics."""
        for epoch in range(self.epoch + 1, self.spec.train.epochs + 1):
            start = time.perf_counter()
            train_loss = self._train_epoch()
            val = self._evaluate()
            if not math.isfinite(val.loss):
                raise TrialError(
                    "non_finite", f"validation loss became {val.loss} at epoch {epoch}"
                )
            # Ties in accuracy are common on small validation sets: the lower loss wins.
            is_best = self.best is None or (val.accuracy, -val.loss) > (
                self.best.val.accuracy, -self.best.val.loss)
            result = EpochResult(epoch, train_loss, val, time.perf_counter() - start, is_best)
            if is_best:
                self.best = result
                self.best_state = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in self.backbone.model.state_dict().items()
                }
            self.epoch = epoch
            self.history.append((epoch, val.accuracy))
            yield result

    def fit(self, epochs: int) -> list[float]:
        """Train the first ``epochs`` epochs of the schedule on ``splits.train``
        with no validation, no selection and no pruning: the model is the last
        epoch's (a refit, :mod:`autotransfer.tuning.refit`). The learning-rate
        schedule is the trial's (over ``spec.train.epochs``), so stopping at the
        trial's best epoch stops where that epoch's weights were taken. Returns
        each epoch's mean training loss."""
        if not 1 <= epochs <= self.spec.train.epochs:
            raise ValueError(f"epochs must be in 1..{self.spec.train.epochs}, not {epochs}")
        losses = []
        for epoch in range(self.epoch + 1, epochs + 1):
            losses.append(self._train_epoch())
            self.epoch = epoch
        return losses

    def _evaluate(self) -> Metrics:
        """:func:`evaluate` on the validation set, halving the evaluation batch on
        out-of-memory (down to 1; then the trial fails with reason ``oom``)."""
        while True:
            try:
                states = self._cached("val", None)
                return evaluate(
                    self.backbone, self.splits.val, self.eval_batch_size, self.on_batch,
                    states=states, point=self.point, placement=self.placement,
                )
            except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM
                if not is_out_of_memory(exc):
                    raise
                error = oom_summary(exc)
            free_memory()
            if self.eval_batch_size <= 1:
                raise TrialError("oom", f"out of memory evaluating one image: {error}")
            self.eval_batch_size //= 2
