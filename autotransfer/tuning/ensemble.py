"""A greedy ensemble of a study's completed trials, exported as one model.

Selection (Caruana et al., "Ensemble selection from libraries of models",
2004): start from the best trial (the study's pick), then repeatedly add (with
replacement: a repeat weights a member) the trial that most lowers the
validation log-loss of the members' mean softmax; stop when nothing lowers it
or after ``rounds`` additions. Log-loss, not accuracy: with a validation split
of a few dozen examples the accuracy moves in steps of a few points and
rarely rises, so the greedy stopped at the pick alone in 5 of 12 benchmark
runs; the log-loss, a proper scoring rule, sees every example's confidence
(bench/results/ensemble_variants-s3.json). Only trials with
the best trial's input pipeline (the ``preprocessing`` attribute: image size
and normalisation, or the tokenizer) are candidates, so the ensemble takes
the same input as any single trial's export.

:class:`EnsembleModel` returns the log of the members' weighted mean softmax:
"logits" whose softmax is the ensemble's probabilities, so the export's
programs, parity checks and ``predict`` treat it as one model.

With a refit (``export.refit``, on by default), :func:`refit_members` trains each
distinct member again on train + validation (:func:`~autotransfer.tuning.refit.refit_trial`:
its parameters, seed and best epoch count) and keeps the weights chosen on
validation, as AutoGluon's ``refit_full`` does for its weighted ensemble.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Literal

import optuna
import torch
from torch import nn

from autotransfer.backbones import Backbone
from autotransfer.data.batches import forward, group_overhead, length_groups, make_batch
from autotransfer.data.datasets import Dataset, Splits
from autotransfer.plugins.host import PluginHost
from autotransfer.spec.model import StudySpec
from autotransfer.store.checkpoints import load_trial_backbone
from autotransfer.store.records import PREPROCESSING_ATTR
from autotransfer.tuning.refit import RefitResult, refit_trial


class EnsembleModel(nn.Module):
    """``log(Σ w_i softmax(member_i(x)))`` for members with the same inputs."""

    def __init__(self, members: list[nn.Module], weights: list[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights]))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        probs = [
            self.weights[i] * torch.softmax(m(*args, **kwargs).float(), dim=1)
            for i, m in enumerate(self.members)
        ]
        return torch.log(torch.stack(probs).sum(0).clamp_min(1e-12))


@dataclass(frozen=True)
class Ensemble:
    """The selected members and the model that averages them."""

    backbone: Backbone
    """The best trial's backbone with :class:`EnsembleModel` as its ``model``."""
    members: list[dict[str, Any]]
    """``{"trial": number, "weight": count}`` in selection order of first use."""
    val_accuracy: float
    """The ensemble's validation accuracy (the selection's score)."""
    candidates: int
    """Completed trials with the best trial's input pipeline, scored on validation."""


def probabilities(backbone: Backbone, data: Dataset, batch_size: int = 256) -> torch.Tensor:
    """Softmax of ``backbone`` on every row of ``data`` (eval mode, CPU)."""
    model = backbone.model.eval()
    out = torch.empty((len(data), len(data.classes)))
    overhead = group_overhead("cpu")
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            for rows in length_groups(data, slice(i, i + batch_size), backbone, overhead):
                x = make_batch(data, rows, backbone)
                out[rows] = torch.softmax(forward(model, x).float(), dim=1)
    return out


def log_loss(p: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-probability of the true class under ``p`` ((n, classes))."""
    return float(-p.clamp_min(1e-12).log().gather(1, labels[:, None]).mean())


def candidate_trials(
    study: optuna.Study, best: optuna.trial.FrozenTrial
) -> list[optuna.trial.FrozenTrial]:
    """The COMPLETE trials with ``best``'s input pipeline (``preprocessing``)."""
    pipeline = best.user_attrs.get(PREPROCESSING_ATTR)
    return [
        t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs.get(PREPROCESSING_ATTR) == pipeline
    ]


def greedy_selection(val: list[torch.Tensor], labels: torch.Tensor, rounds: int = 10,
                     first: int | None = None,
                     criterion: Literal["log_loss", "accuracy"] = "log_loss") -> list[int]:
    """Indexes into ``val`` (each member's (n, classes) probabilities) chosen
    greedily with replacement, starting from ``first`` (default: the best
    alone), each addition the one that most lowers the validation log-loss of
    the mean probabilities (``criterion="accuracy"``: most raises the accuracy,
    ties by log-loss); see the module docstring."""

    def score(chosen: list[int]) -> tuple[float, ...]:
        p = torch.stack([val[i] for i in chosen]).mean(0)
        nll = log_loss(p, labels)
        if criterion == "log_loss":
            return (-nll,)
        return float((p.argmax(1) == labels).float().mean()), -nll

    chosen = [max(range(len(val)), key=lambda i: score([i])) if first is None else first]
    best = score(chosen)
    for _ in range(rounds - 1):
        i, s = max(((i, score([*chosen, i])) for i in range(len(val))), key=lambda t: t[1])
        if s <= best:
            break
        chosen, best = [*chosen, i], s
    return chosen


def select_ensemble(
    study: optuna.Study,
    best: optuna.trial.FrozenTrial,
    spec: StudySpec,
    host: PluginHost,
    store: Any,
    val: Dataset,
    rounds: int = 10,
    say: Any = None,
) -> Ensemble:
    """The greedy ensemble of ``study``'s COMPLETE trials with ``best``'s input
    pipeline, chosen on ``val``, reloaded from their checkpoints."""
    say = say or (lambda _msg: None)
    candidates = candidate_trials(study, best)
    say(f"export: ensemble: scoring {len(candidates)} completed trial(s) on validation")
    backbones, probs = [], []
    for t in candidates:
        b = load_trial_backbone(
            t, host, store, num_classes=len(val.classes), image_size=spec.data.image_size,
            listed=spec.search.backbones,
        )
        backbones.append(b)
        probs.append(probabilities(b, val, spec.train.eval_batch_size))
    labels = val.labels.cpu()
    pick = next(i for i, t in enumerate(candidates) if t.number == best.number)
    chosen = greedy_selection(probs, labels, rounds, first=pick)
    counts = Counter(chosen)
    order = list(dict.fromkeys(chosen))
    members = [{"trial": candidates[i].number, "weight": counts[i]} for i in order]
    mean = torch.stack([probs[i] for i in chosen]).mean(0)
    model = EnsembleModel([backbones[i].model for i in order], [counts[i] for i in order])
    ensemble = replace(backbones[pick], model=model.eval())
    return Ensemble(
        ensemble, members, float((mean.argmax(1) == labels).float().mean()), len(candidates)
    )


def refit_members(
    ensemble: Ensemble,
    study: optuna.Study,
    spec: StudySpec,
    host: PluginHost,
    store: Any,
    splits: Splits,
    source: Dataset | None = None,
    say: Any = None,
) -> tuple[Ensemble, list[RefitResult]]:
    """``ensemble`` with each distinct member refit on train + validation (same
    weights, same order), and the refits (without test metrics: the caller
    scores the ensemble). ``ensemble``'s checkpoint models are released first
    (its model is emptied), so memory holds the refit members and the one in
    training, not the checkpoints too.

    Raises:
        TrialError: a member's refit diverged, or ran out of memory.
    """
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    old = ensemble.backbone.model
    if isinstance(old, EnsembleModel):
        old.members = nn.ModuleList()
    refits = []
    for i, m in enumerate(ensemble.members, 1):
        if say:
            say(f"export: ensemble: refitting member {i} of {len(ensemble.members)}")
        refits.append(refit_trial(trials[m["trial"]], spec, host, store, splits, source,
                                  message=say, test=False))
    model = EnsembleModel([r.backbone.model for r in refits],
                          [m["weight"] for m in ensemble.members])
    refit = replace(
        ensemble, backbone=replace(ensemble.backbone, model=model.eval()),
        members=[{**m, "epochs": r.epochs} for m, r in zip(ensemble.members, refits, strict=True)],
    )
    return refit, refits
