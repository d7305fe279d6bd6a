"""The Optuna objective: sample -> build -> freeze -> train -> report -> prune.

Follows Optuna's PyTorch example: report the validation accuracy after every
epoch, ask ``should_prune()``, raise ``TrialPruned``. The trial's value is its
best epoch's accuracy, and its checkpoint is that epoch's weights.

Faults (see docs/faults.md): after every epoch the training state is saved
(:mod:`autotransfer.store.resume`), so a trial queued again after an interruption or
a lost worker continues at the next epoch; a trial with no progress for
``train.stall_timeout`` seconds is ended by the watchdog (reason ``timeout``);
SIGTERM/Ctrl-C mark the trial and queue it again (:mod:`autotransfer.store.recovery`).
"""

from __future__ import annotations

import sys
import time

import optuna
import torch

from autotransfer.data.batches import fit_to_data
from autotransfer.data.datasets import ImageSet, Splits
from autotransfer.engine.device import WorkerDevice
from autotransfer.engine.feature_cache import FeatureCache
from autotransfer.engine.trainer import Trainer, TrialError, TrialParams
from autotransfer.exceptions import AutotransferError
from autotransfer.plugins.host import PluginHost
from autotransfer.spec.model import BackboneRef, FloatParam, FloatRange, StudySpec
from autotransfer.store.checkpoints import save_checkpoint
from autotransfer.store.optuna_internals import trial_id
from autotransfer.store.records import (
    BEST_EPOCH_ATTR,
    DEVICE_ATTR,
    EFFECTIVE_BATCH_SIZE_ATTR,
    EPOCHS_RUN_ATTR,
    FAIL_MESSAGE_ATTR,
    FAIL_REASON_ATTR,
    FEATURE_VIEWS_ATTR,
    FEATURES_CACHED_ATTR,
    FROZEN_BLOCKS_ATTR,
    MICRO_BATCH_SIZE_ATTR,
    N_BLOCKS_ATTR,
    OOM_EVENTS_ATTR,
    PREFIX_BLOCKS_ATTR,
    PROBE_EPOCHS_ATTR,
    PRUNED_AT_EPOCH_ATTR,
    RESUME_EPOCH_ATTR,
    RESUME_STATE_ATTR,
    RESUMED_FROM_EPOCH_ATTR,
    RETRY_OF_ATTR,
    SECONDS_ATTR,
    VAL_ACCURACY_ATTR,
    VAL_F1_ATTR,
    VAL_LOSS_ATTR,
    WORKER_ATTR,
)
from autotransfer.store.recovery import requeue_interrupted, worker_identity
from autotransfer.store.resume import drop_artifact, load_epoch_state, save_epoch_state
from autotransfer.store.storage import ArtifactStore
from autotransfer.tuning.interrupts import signal_name
from autotransfer.tuning.progress import Progress
from autotransfer.tuning.watchdog import TrialStalled, Watchdog


def suggest_float(trial: optuna.Trial, name: str, space: FloatParam) -> float:
    """A searched range is sampled; a fixed value is recorded as a one-point range."""
    if isinstance(space, FloatRange):
        return trial.suggest_float(name, space.low, space.high, log=space.log)
    return trial.suggest_float(name, space, space)


PARAM_NAMES = (
    "backbone", "freeze", "lr", "trunk_lr_scale", "weight_decay", "batch_size", "retention",
    "alpha", "probe_fraction",
)


def sample_params(trial: optuna.Trial, spec: StudySpec) -> TrialParams:
    """Sample one point of the search space in ``spec.search`` and the
    retention kind (``spec.retention``); with kind ``none``, α is 0 (recorded
    as a one-point range)."""
    s = spec.search
    sizes = s.batch_size if isinstance(s.batch_size, list) else [s.batch_size]
    backbone = trial.suggest_categorical("backbone", [b.key for b in s.backbones])
    freeze = suggest_float(trial, "freeze", s.freeze)
    lr = suggest_float(trial, "lr", s.lr)
    trunk_lr_scale = suggest_float(
        trial, "trunk_lr_scale", s.trunk_lr_scale_for(spec.data.modality)
    )
    weight_decay = suggest_float(trial, "weight_decay", s.weight_decay)
    batch_size = int(trial.suggest_categorical("batch_size", sizes))
    retention = str(trial.suggest_categorical("retention", spec.retention_kinds))
    alpha = suggest_float(trial, "alpha", 0.0 if retention == "none" else s.alpha)
    probe_fraction = suggest_float(trial, "probe_fraction", s.probe_fraction)
    return TrialParams(
        backbone=backbone, freeze=freeze, lr=lr, weight_decay=weight_decay,
        batch_size=batch_size, alpha=alpha, retention=retention, trunk_lr_scale=trunk_lr_scale,
        probe_fraction=probe_fraction,
    )


def plugin_label(host: PluginHost, family: str) -> str:
    """``plugin 'NAME' (distribution 'DIST VERSION')`` of the plugin that
    registered backbone ``family``, for failure messages."""
    name = host.family_plugins.get(family, "?")
    info = next((p for p in host.plugins if p.name == name), None)
    dist = f"{info.distribution} {info.version}" if info else "?"
    return f"plugin '{name}' (distribution '{dist}')"


def _record_batch(trial: optuna.Trial, trainer: Trainer) -> None:
    """The batch each optimiser step used (``effective_batch_size``, the sampled
    batch: out-of-memory splits it into micro-batches with the gradients
    accumulated) and the largest forward that fitted (``micro_batch_size``)."""
    trial.set_user_attr(EFFECTIVE_BATCH_SIZE_ATTR, trainer.params.batch_size)
    trial.set_user_attr(MICRO_BATCH_SIZE_ATTR, trainer.micro_batch_size)
    if trainer.oom_events:
        trial.set_user_attr(OOM_EVENTS_ATTR, trainer.oom_events)
    trial.set_user_attr(FEATURES_CACHED_ATTR, trainer.features_cached)
    if trainer.features_cached:
        trial.set_user_attr(FEATURE_VIEWS_ATTR, trainer.views)


class Objective:
    """Callable for ``study.optimize``; holds the decoded data for all its trials."""

    def __init__(
        self,
        spec: StudySpec,
        splits: Splits,
        host: PluginHost,
        store: ArtifactStore,
        progress: Progress,
        source: ImageSet | None = None,
        device: WorkerDevice | None = None,
    ) -> None:
        self.spec = spec
        # Resolved once per worker; the data moves to its device once, here.
        self.device = device or WorkerDevice(spec.train)
        splits = Splits(*(self.device.data(d) for d in (splits.train, splits.val, splits.test)))
        if isinstance(source, ImageSet):
            source = self.device.data(source)  # type: ignore[assignment]
        self.splits = splits
        self.host = host
        self.store = store
        self.progress = progress
        self.source = source
        self.refs = {b.key: b for b in spec.search.backbones}
        budget = spec.train.feature_cache
        # One feature cache per worker: every trial of this process shares it.
        self.cache = (
            None if budget is False
            else FeatureCache(None if budget is True else float(budget))
        )

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except KeyboardInterrupt as exc:  # SIGTERM or Ctrl-C (autotransfer.tuning.interrupts)
            self._interrupted(trial, exc)
            raise

    def _run(self, trial: optuna.Trial) -> float:
        params = sample_params(trial, self.spec)
        ref = self.refs[params.backbone]
        trial.set_user_attr(WORKER_ATTR, worker_identity())
        trainer = self._trainer(trial, params, ref)
        trial.set_user_attr(DEVICE_ATTR, trainer.placement.record)
        trial.set_user_attr(N_BLOCKS_ATTR, trainer.n_blocks)
        trial.set_user_attr(FROZEN_BLOCKS_ATTR, trainer.k_frozen)
        trial.set_user_attr(PREFIX_BLOCKS_ATTR, trainer.trial_point)
        trial.set_user_attr(PROBE_EPOCHS_ATTR, trainer.probe_epochs)
        self.progress.trial_started(
            trial.number, params, trainer.k_frozen, trainer.n_blocks, trainer.placement.record,
            trainer.probe_epochs,
        )
        if not self._resume(trial, trainer):
            trainer = self._trainer(trial, params, ref)  # a clean start, not half-restored
        start = time.perf_counter()
        watchdog = Watchdog(self.spec.train.stall_timeout)
        try:
            with watchdog.watch(lambda idle: self._unresponsive(trial, idle)) as beat:
                trainer.on_batch = beat
                self._train(trial, trainer, start)
        except TrialError as exc:
            self._drop_state(trial)
            _record_batch(trial, trainer)
            raise self._fail(trial, exc.reason, str(exc)) from exc
        except TrialStalled as exc:
            self._drop_state(trial)
            raise self._fail(trial, "timeout", f"trial {trial.number}: {exc}") from None
        except optuna.TrialPruned:
            self._drop_state(trial)
            raise
        except Exception as exc:
            self._drop_state(trial)
            raise self._fail(
                trial, "plugin_error",
                f"{type(exc).__name__}: {exc} (training {ref.key}, "
                f"{plugin_label(self.host, ref.family)})",
            ) from exc
        finally:
            trainer.on_batch = None
        assert trainer.best is not None and trainer.best_state is not None
        self._record_best(trial, trainer, start)
        try:
            save_checkpoint(trial, trainer.best_state, trainer.backbone, self.store)
        except OSError as exc:  # e.g. a full disk: the trial cannot keep its model
            self._drop_state(trial)
            raise self._fail(
                trial, "checkpoint_error", f"could not write the best checkpoint: {exc}"
            ) from exc
        self._drop_state(trial)
        self.progress.trial_finished(
            trial.number, "COMPLETE",
            f"val_acc {trainer.best.val.accuracy:.3f} (best epoch {trainer.best.epoch}) "
            f"in {time.perf_counter() - start:.0f}s",
        )
        return trainer.best.val.accuracy

    def _trainer(self, trial: optuna.Trial, params: TrialParams, ref: BackboneRef) -> Trainer:
        # Same seed and parameters give the same result: seed head init and data order.
        torch.manual_seed(self.spec.seed)
        try:
            backbone = self.host.build(
                ref, num_classes=len(self.splits.classes), image_size=self.spec.data.image_size
            )
        except AutotransferError:
            raise
        except Exception as exc:
            raise self._fail(
                trial, "plugin_error",
                f"{type(exc).__name__}: {exc} (building {ref.key}, "
                f"{plugin_label(self.host, ref.family)})",
            ) from exc
        fit_to_data(backbone, self.spec.data)
        return Trainer(
            backbone, self.splits, params, self.spec, self.spec.seed, self.source,
            cache=self.cache, placement=self.device.placement(backbone),
        )

    def _train(self, trial: optuna.Trial, trainer: Trainer, start: float) -> None:
        written = time.perf_counter()  # the epoch state: when the trial last wrote it
        for result in trainer.epochs():
            trial.report(result.val.accuracy, result.epoch)
            trial.set_user_attr(EPOCHS_RUN_ATTR, result.epoch)
            _record_batch(trial, trainer)
            self.progress.epoch(trial.number, result)
            # Not after the last epoch (the trial ends), nor more often than
            # recovery.state_interval: a state is about four times the weights.
            due = time.perf_counter() - written >= self.spec.recovery.state_interval
            if result.epoch < self.spec.train.epochs and due:
                self._save_state(trial, trainer)
                written = time.perf_counter()
            # Pruning after the last epoch saves nothing; let the trial complete.
            if result.epoch < self.spec.train.epochs and trial.should_prune():
                trial.set_user_attr(PRUNED_AT_EPOCH_ATTR, result.epoch)
                self._record_best(trial, trainer, start)
                self.progress.trial_finished(
                    trial.number, "PRUNED",
                    f"stopped after epoch {result.epoch}; best val_acc "
                    f"{trainer.best.val.accuracy:.3f}" if trainer.best else "",
                )
                raise optuna.TrialPruned(f"pruned after epoch {result.epoch}")

    def _save_state(self, trial: optuna.Trial, trainer: Trainer) -> None:
        """Save the epoch state; if the write fails (a full disk), the trial goes
        on and the previous state stays the recorded one."""
        try:
            save_epoch_state(trial, trainer.state_dict(), self.store)
        except OSError as exc:
            self.progress.message(
                f"  trial {trial.number}: could not save its epoch {trainer.epoch} state "
                f"({exc}); training goes on, a retry would resume from the previous one"
            )

    def _resume(self, trial: optuna.Trial, trainer: Trainer) -> bool:
        """Continue from the epoch state this trial inherited (it re-runs an
        interrupted or lost trial): restore it and report the earlier epochs'
        values again, so the pruner sees the whole curve. False: the state could
        not be loaded and ``trainer`` may be half-restored."""
        try:
            state = load_epoch_state(trial, self.store)
            if state is None:
                if trial.user_attrs.get(RESUME_STATE_ATTR):
                    self.progress.message(
                        f"  trial {trial.number}: its epoch state is gone; starting at epoch 1"
                    )
                return True
            trainer.load_state_dict(state)
        except AutotransferError:
            raise
        except Exception as exc:  # a state that does not fit: train from the start
            self.progress.message(
                f"  trial {trial.number}: cannot resume from the saved epoch state "
                f"({type(exc).__name__}: {exc}); starting at epoch 1"
            )
            return False
        for epoch, value in trainer.history:
            trial.report(value, epoch)
        trial.set_user_attr(RESUMED_FROM_EPOCH_ATTR, trainer.epoch)
        self.progress.message(
            f"  trial {trial.number} resumes after epoch {trainer.epoch} "
            f"(re-runs trial {trial.user_attrs.get(RETRY_OF_ATTR, '?')})"
        )
        return True

    def _drop_state(self, trial: optuna.Trial) -> None:
        """The trial ended: its epoch state is not needed any more."""
        drop_artifact(self.store, trial.user_attrs.get(RESUME_STATE_ATTR))

    def _interrupted(self, trial: optuna.Trial, exc: BaseException) -> None:
        """Mark the trial, queue it again from its last epoch state; never raises
        (if the storage cannot be written, the heartbeat retry takes over)."""
        name = signal_name(exc)
        epoch = trial.user_attrs.get(RESUME_EPOCH_ATTR, 0)
        try:
            trial.set_user_attr(FAIL_REASON_ATTR, "interrupted")
            trial.set_user_attr(FAIL_MESSAGE_ATTR, f"interrupted by {name}")
            if len(trial.params) < len(PARAM_NAMES):  # stopped while sampling: not started
                return
            requeue_interrupted(trial, name)
        except Exception as error:  # noqa: BLE001 - the interrupt matters more
            self.progress.message(
                f"  trial {trial.number}: interrupted by {name}, but could not queue it "
                f"again ({type(error).__name__}: {error}); it is retried when its "
                "heartbeat goes stale"
            )
            return
        self.progress.trial_finished(
            trial.number, "FAIL",
            f"interrupted by {name}; queued to run again from "
            + (f"its epoch {epoch} state" if epoch else "epoch 1"),
        )

    def _unresponsive(self, trial: optuna.Trial, idle: float) -> None:
        """From the watchdog thread: the main thread is stuck outside Python.
        Record the failure in the storage ourselves; the process then exits."""
        storage, lost_id = trial.storage, trial_id(trial)
        message = (
            f"trial {trial.number} made no progress for {idle:.0f}s "
            f"(train.stall_timeout {self.spec.train.stall_timeout:g}s) and did not stop"
        )
        print(
            f"error: {message}; it is marked FAIL (timeout) and this process exits; "
            "run the same command to go on with the study",
            file=sys.stderr,
            flush=True,
        )
        try:
            storage.set_trial_user_attr(lost_id, FAIL_REASON_ATTR, "timeout")
            storage.set_trial_user_attr(lost_id, FAIL_MESSAGE_ATTR, message)
            storage.set_trial_state_values(lost_id, optuna.trial.TrialState.FAIL)
        except Exception as exc:  # noqa: BLE001 - exiting anyway
            print(f"error: could not mark trial {trial.number}: {exc}", file=sys.stderr)
        self._drop_state(trial)

    def _record_best(self, trial: optuna.Trial, trainer: Trainer, start: float) -> None:
        if trainer.best is not None:
            trial.set_user_attr(BEST_EPOCH_ATTR, trainer.best.epoch)
            trial.set_user_attr(VAL_ACCURACY_ATTR, trainer.best.val.accuracy)
            trial.set_user_attr(VAL_F1_ATTR, trainer.best.val.macro_f1)
            trial.set_user_attr(VAL_LOSS_ATTR, trainer.best.val.loss)
        trial.set_user_attr(SECONDS_ATTR, round(time.perf_counter() - start, 2))

    def _fail(self, trial: optuna.Trial, reason: str, message: str) -> TrialError:
        trial.set_user_attr(FAIL_REASON_ATTR, reason)
        trial.set_user_attr(FAIL_MESSAGE_ATTR, message[:500])
        self.progress.trial_finished(trial.number, "FAIL", f"{reason}: {message}")
        return TrialError(reason, message)
