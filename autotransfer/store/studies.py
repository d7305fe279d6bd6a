"""Creating, resuming and reading studies: the saved spec, changes on resume."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from pydantic import ValidationError

from autotransfer._version import __version__
from autotransfer.exceptions import SpecError, StorageError
from autotransfer.spec.model import FloatRange, StudySpec
from autotransfer.store.budget import budget_lock
from autotransfer.store.records import (
    ARTIFACTS_ATTR,
    SPEC_ATTR,
    TARGET_ATTR,
    TEST_METRICS_ATTR,
    VERSION_ATTR,
)
from autotransfer.store.storage import open_storage, redact, require_existing

# Fields that may change between runs of one study without changing what it means.
RESUMABLE_FIELDS = {
    "n_trials", "timeout", "train.threads", "train.eval_batch_size", "train.stall_timeout",
    "recovery.heartbeat_interval", "recovery.grace_period", "recovery.max_retry",
    "recovery.state_interval",
    "sampler.try_each_backbone", "sampler.portfolio",  # read only when the study is created
    # Where and how fast trials run, not what they compute:
    "train.device", "train.precision", "train.channels_last", "train.compile",
    "export.refit", "export.ensemble",  # read only by export, after the trials
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def spec_changes(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of fields that differ, ignoring :data:`RESUMABLE_FIELDS`.

    A field missing from ``stored`` (a spec saved by an older autotransfer, before
    the field existed, e.g. ``data.text_column``) counts as its default, which is
    what that study ran with.
    """
    a, b = _flatten(_with_defaults(stored)), _flatten(new)
    return sorted(
        k for k in a.keys() | b.keys() if k not in RESUMABLE_FIELDS and a.get(k) != b.get(k)
    )


def _with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    try:
        return StudySpec.model_validate(stored).model_dump(mode="json")
    except ValidationError:  # not a spec this version can read: compare it as stored
        return stored


def create_or_resume(spec: StudySpec, storage_url: str, artifacts: Path) -> optuna.Study:
    """Create the study ``spec.name`` (its target total, :mod:`autotransfer.store.budget`:
    ``spec.n_trials``) or resume it if it exists (the search sets the target once
    it has recovered lost trials: :func:`autotransfer.tuning.search.run_trials`).
    The study returned reads and writes attributes; trials run on the one
    :func:`autotransfer.store.opening.open_for_trials` opens.

    Raises:
        SpecError: the study exists with a different spec (lists the fields).
        StorageError: a database the shared budget cannot lock.
    """
    budget_lock(storage_url, spec.name)  # refuse such a database before anything is made
    study = optuna.create_study(
        storage=open_storage(storage_url),
        study_name=spec.name,
        direction="maximize",
        # Not the one that runs trials (autotransfer.store.opening.open_for_trials):
        # a sampler that draws nothing.
        sampler=optuna.samplers.RandomSampler(),
        load_if_exists=True,
    )
    new = spec.model_dump(mode="json")
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        # The target and the artifacts directory first: a worker joins only once
        # the spec is there, and then finds both.
        artifacts.mkdir(parents=True, exist_ok=True)
        study.set_user_attr(TARGET_ATTR, spec.n_trials)
        enqueue_start_trials(study, spec)
        study.set_user_attr(SPEC_ATTR, new)
        study.set_user_attr(ARTIFACTS_ATTR, str(artifacts))
        study.set_user_attr(VERSION_ATTR, __version__)
        with warnings.catch_warnings():  # experimental API; keep stderr for progress
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_accuracy"])
        return study
    changed = spec_changes(stored, new)
    if changed:
        raise SpecError(
            f"study '{spec.name}' exists with a different spec (changed: {', '.join(changed)}); "
            "run it with its own spec, or start a new study with --study-name NEW"
        )
    return study


PORTFOLIO: tuple[tuple[str, dict[str, float]], ...] = (
    ("fine-tune", {"freeze": 0.0, "lr": 1e-3, "alpha": 0.0, "probe_fraction": 0.0}),
    ("linear probe", {"freeze": 1.0, "lr": 1e-2, "alpha": 0.0, "probe_fraction": 0.0}),
)
"""The start portfolio: hand configurations strong across tasks, tried first
(``sampler.portfolio``). A plain full fine-tune (no block frozen, lr 1e-3, α 0)
and a linear probe (every trunk block frozen, lr 1e-2, α 0); docs/search.md
gives the measurements behind them."""


def start_trials(spec: StudySpec) -> list[dict[str, Any]]:
    """The parameters of a new study's first trials, in order (at most
    ``n_trials``): with ``sampler.portfolio``, each :data:`PORTFOLIO` entry for
    each listed backbone (entry by entry, backbones in the listed order; a
    backbone with ``weights: none`` gets no linear probe: random features are
    not worth probing); otherwise, with ``sampler.try_each_backbone`` and
    several backbones, one trial per backbone. A portfolio value is clipped
    into the spec's range, and a parameter the spec fixes keeps its fixed
    value; parameters not given are drawn by the sampler."""
    refs = list(spec.search.backbones)
    trials: list[dict[str, Any]] = []
    if spec.sampler.portfolio:
        for _, config in PORTFOLIO:
            for ref in refs:
                if ref.weights == "none" and config.get("freeze", 0.0) >= 1.0:
                    continue
                params: dict[str, Any] = {"backbone": ref.key}
                if "none" in spec.retention_kinds and config.get("alpha") == 0.0:
                    params["retention"] = "none"  # α 0 is no retention: say so
                for name, value in config.items():
                    space = getattr(spec.search, name)
                    if isinstance(space, FloatRange):
                        params[name] = min(max(value, space.low), space.high)
                if params not in trials:
                    trials.append(params)
    elif spec.sampler.try_each_backbone and len(refs) > 1:
        trials = [{"backbone": ref.key} for ref in refs]
    return trials[: spec.n_trials] if spec.n_trials is not None else trials


def enqueue_start_trials(study: optuna.Study, spec: StudySpec) -> int:
    """Queue :func:`start_trials` (the start portfolio, or one trial per
    backbone). Without this, a short search may never try some backbones, nor
    the hand baselines a practitioner would run first. Queued trials count
    toward the budget and run first, whichever worker takes them. Returns how
    many were queued."""
    trials = start_trials(spec)
    for params in trials:
        study.enqueue_trial(params)
    return len(trials)


def load_study(storage_url: str, study_name: str | None) -> optuna.Study:
    """Open an existing study; without a name, the only study in the storage.

    Raises:
        StorageError: no such storage file, no such study, or several and no
            name given.
    """
    require_existing(storage_url)
    storage = open_storage(storage_url)
    names = [s.study_name for s in storage.get_all_studies()]
    if study_name is None and not names:
        raise StorageError(
            f"storage '{redact(storage_url)}' holds no study; run `autotransfer search` "
            "first, or give the --storage of an existing one"
        )
    if study_name is None:
        if len(names) != 1:
            listed = ", ".join(names) if names else "none"
            raise StorageError(
                f"give --study-name: the storage holds {len(names)} studies ({listed})"
            )
        study_name = names[0]
    if study_name not in names:
        listed = ", ".join(names) if names else "none"
        raise StorageError(f"no study '{study_name}' in the storage; studies: {listed}")
    return optuna.load_study(study_name=study_name, storage=storage)


def stored_spec(study: optuna.Study) -> StudySpec:
    raw = study.user_attrs.get(SPEC_ATTR)
    if raw is None:
        raise StorageError(
            f"study '{study.study_name}' was not made by autotransfer (it has no saved "
            "spec); create studies with `autotransfer search`"
        )
    return StudySpec.model_validate(raw)


def test_metrics(study: optuna.Study) -> dict[str, dict[str, Any]]:
    return dict(study.user_attrs.get(TEST_METRICS_ATTR, {}))


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
