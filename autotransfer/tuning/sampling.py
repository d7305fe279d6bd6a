"""The sampler and the pruner a study's trials run with, from its spec
(``seed``, ``sampler``, ``pruner``); given to
:func:`autotransfer.store.opening.open_for_trials`."""

from __future__ import annotations

import hashlib
import json
import warnings

import optuna

from autotransfer.spec.model import StudySpec

LATER_SEARCH_FIELDS: dict[str, object] = {"probe_fraction": 0.0}
"""Search fields added after :func:`sampler_seed`'s rule, with their defaults."""


def sampler_seed(spec: StudySpec) -> int:
    """The sampler's seed: ``seed`` together with the study's identity (its
    name, data and search space), so two studies that differ in any of these
    draw different random start-up trials even with the same ``seed``, and the
    same spec draws the same ones. The first 8 hex digits of the SHA-256 of
    the JSON of those fields, as an integer. A search field added after this
    rule (:data:`LATER_SEARCH_FIELDS`) counts only when set away from its
    default, so a spec written before it keeps its draws."""
    search = spec.search.model_dump(mode="json")
    for name, default in LATER_SEARCH_FIELDS.items():
        if search.get(name) == default:
            del search[name]
    identity = {
        "seed": spec.seed,
        "name": spec.name,
        "data": spec.data.model_dump(mode="json"),
        "search": search,
    }
    text = json.dumps(identity, sort_keys=True)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def make_sampler(spec: StudySpec, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler, seeded by :func:`sampler_seed`; ``offset`` (trials already
    run) keeps a resumed run from replaying the same random start-up draws."""
    seed = sampler_seed(spec) + offset
    if spec.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.sampler.n_startup_trials, multivariate=True,
            group=True, constant_liar=True,
        )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's pruner; with ``pruner.patience``, wrapped in Optuna's
    :class:`~optuna.pruners.PatientPruner`, so only a trial whose validation
    accuracy has stalled (no gain over the last ``patience + 1`` epochs) can
    be pruned: under a one-cycle schedule a trial may be far behind at
    mid-run and among the best at its end."""
    p = spec.pruner
    pruner: optuna.pruners.BasePruner
    if p.type == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, max_resource=spec.train.epochs,
            reduction_factor=p.reduction_factor,
        )
    elif p.type == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    elif p.type == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=p.warmup_epochs)
    else:
        return optuna.pruners.NopPruner()
    if p.patience is None:
        return pruner
    with warnings.catch_warnings():  # PatientPruner is "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.PatientPruner(pruner, patience=p.patience)
