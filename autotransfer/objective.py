"""The Optuna objective: sample -> build -> freeze -> train -> report -> prune.

Follows Optuna's PyTorch example: report the validation accuracy after every
epoch, ask ``should_prune()``, raise ``TrialPruned``. The trial's value is its
best epoch's accuracy, and its checkpoint is that epoch's weights.
"""

from __future__ import annotations

import time

import optuna
import torch
from optuna.artifacts._protocol import ArtifactStore

from autotransfer.checkpoints import save_checkpoint
from autotransfer.data import ImageSet, Splits
from autotransfer.exceptions import AutotransferError
from autotransfer.plugins import PluginHost
from autotransfer.progress import Progress
from autotransfer.spec import BackboneRef, FloatParam, FloatRange, StudySpec
from autotransfer.training import Trainer, TrialError, TrialParams

FAIL_REASON_ATTR = "fail_reason"


def suggest_float(trial: optuna.Trial, name: str, space: FloatParam) -> float:
    """A searched range is sampled; a fixed value is recorded as a one-point range."""
    if isinstance(space, FloatRange):
        return trial.suggest_float(name, space.low, space.high, log=space.log)
    return trial.suggest_float(name, space, space)


def sample_params(trial: optuna.Trial, spec: StudySpec) -> TrialParams:
    """Sample one point of the search space in ``spec.search``."""
    s = spec.search
    sizes = s.batch_size if isinstance(s.batch_size, list) else [s.batch_size]
    return TrialParams(
        backbone=trial.suggest_categorical("backbone", [b.key for b in s.backbones]),
        freeze=suggest_float(trial, "freeze", s.freeze),
        lr=suggest_float(trial, "lr", s.lr),
        weight_decay=suggest_float(trial, "weight_decay", s.weight_decay),
        batch_size=int(trial.suggest_categorical("batch_size", sizes)),
        alpha=suggest_float(trial, "alpha", s.alpha),
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
    trial.set_user_attr("effective_batch_size", trainer.params.batch_size)
    trial.set_user_attr("micro_batch_size", trainer.micro_batch_size)
    if trainer.oom_events:
        trial.set_user_attr("oom_events", trainer.oom_events)


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
    ) -> None:
        self.spec = spec
        self.splits = splits
        self.host = host
        self.store = store
        self.progress = progress
        self.source = source
        self.refs = {b.key: b for b in spec.search.backbones}

    def __call__(self, trial: optuna.Trial) -> float:
        params = sample_params(trial, self.spec)
        ref = self.refs[params.backbone]
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
                f"{plugin_label(self.host, ref.family)} failed to build {ref.key}: {exc!r}",
            ) from exc
        trainer = Trainer(backbone, self.splits, params, self.spec, self.spec.seed, self.source)
        trial.set_user_attr("n_blocks", trainer.n_blocks)
        trial.set_user_attr("frozen_blocks", trainer.k_frozen)
        self.progress.trial_started(trial.number, params, trainer.k_frozen, trainer.n_blocks)
        start = time.perf_counter()
        try:
            for result in trainer.epochs():
                trial.report(result.val.accuracy, result.epoch)
                trial.set_user_attr("epochs_run", result.epoch)
                _record_batch(trial, trainer)
                self.progress.epoch(trial.number, result)
                # Pruning after the last epoch saves nothing; let the trial complete.
                if result.epoch < self.spec.train.epochs and trial.should_prune():
                    trial.set_user_attr("pruned_at_epoch", result.epoch)
                    self._record_best(trial, trainer, start)
                    self.progress.trial_finished(
                        trial.number, "PRUNED",
                        f"stopped after epoch {result.epoch}; best val_acc "
                        f"{trainer.best.val.accuracy:.3f}" if trainer.best else "",
                    )
                    raise optuna.TrialPruned(f"pruned after epoch {result.epoch}")
        except TrialError as exc:
            _record_batch(trial, trainer)
            raise self._fail(trial, exc.reason, str(exc)) from exc
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise self._fail(
                trial, "plugin_error",
                f"training {ref.key} ({plugin_label(self.host, ref.family)}) raised {exc!r}",
            ) from exc
        assert trainer.best is not None and trainer.best_state is not None
        self._record_best(trial, trainer, start)
        save_checkpoint(trial, trainer.best_state, backbone, self.store)
        self.progress.trial_finished(
            trial.number, "COMPLETE",
            f"val_acc {trainer.best.val.accuracy:.3f} (best epoch {trainer.best.epoch}) "
            f"in {time.perf_counter() - start:.0f}s",
        )
        return trainer.best.val.accuracy

    def _record_best(self, trial: optuna.Trial, trainer: Trainer, start: float) -> None:
        if trainer.best is not None:
            trial.set_user_attr("best_epoch", trainer.best.epoch)
            trial.set_user_attr("val_accuracy", trainer.best.val.accuracy)
            trial.set_user_attr("val_f1", trainer.best.val.macro_f1)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))

    def _fail(self, trial: optuna.Trial, reason: str, message: str) -> TrialError:
        trial.set_user_attr(FAIL_REASON_ATTR, reason)
        trial.set_user_attr("fail_message", message[:500])
        self.progress.trial_finished(trial.number, "FAIL", f"{reason}: {message}")
        return TrialError(reason, message)
