"""The search strategy: start portfolio, sampler seed per study, patient
pruning, the retention kind as a searched parameter."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import tiny_spec_dict
from rich.console import Console

from autotransfer.exceptions import SpecError
from autotransfer.spec.model import validate_spec
from autotransfer.store.studies import create_or_resume, start_trials
from autotransfer.tuning.objective import sample_params
from autotransfer.tuning.progress import Progress
from autotransfer.tuning.sampling import make_pruner, make_sampler, sampler_seed
from autotransfer.tuning.search import run_search

PRE, NONE = "timm:test_resnet@pretrained", "timm:test_resnet@none"


def _queued(study: optuna.Study) -> list[dict]:
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    return [t.system_attrs["fixed_params"] for t in waiting]


def test_a_new_study_starts_with_the_portfolio(tiny_spec, tmp_path: Path) -> None:
    spec = tiny_spec(**{"n_trials": 10, "search.backbones": [PRE, NONE],
                        "search.freeze": {"low": 0.0, "high": 1.0},
                        "search.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    assert spec.sampler.portfolio  # on by default
    expected = [
        {"backbone": PRE, "freeze": 0.0, "lr": 1e-3, "alpha": 0.0},  # plain fine-tune
        {"backbone": NONE, "freeze": 0.0, "lr": 1e-3, "alpha": 0.0},
        {"backbone": PRE, "freeze": 1.0, "lr": 1e-2, "alpha": 0.0},  # linear probe
    ]  # no probe of random weights
    assert start_trials(spec) == expected
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = create_or_resume(spec, storage, tmp_path / "artifacts")
    assert _queued(study) == expected
    # Resuming queues nothing more.
    assert _queued(create_or_resume(spec, storage, tmp_path / "artifacts")) == expected


def test_portfolio_values_respect_the_spec(tiny_spec) -> None:
    # The tiny spec searches freeze in [0, 0.5] and lr in [3e-3, 1e-2]: values are clipped.
    spec = tiny_spec(**{"n_trials": 10, "search.backbones": [PRE], "search.alpha": 0.1})
    assert start_trials(spec) == [
        {"backbone": PRE, "freeze": 0.0, "lr": 3e-3},  # alpha fixed by the spec: not set
        {"backbone": PRE, "freeze": 0.5, "lr": 1e-2},
    ]
    assert len(start_trials(tiny_spec(**{"n_trials": 1, "search.backbones": [PRE]}))) == 1
    assert start_trials(tiny_spec(**{"sampler.portfolio": False})) == []
    # With the retention kind searched and 'none' among the kinds, α 0 says 'none'.
    searched = tiny_spec(**{"search.backbones": [PRE], "retention": ["none", "l2sp"]})
    assert {t["retention"] for t in start_trials(searched)} == {"none"}


def test_portfolio_trials_run_first(tiny_spec, tmp_path: Path) -> None:
    spec = tiny_spec(**{"n_trials": 3, "train.epochs": 1, "search.backbones": [NONE],
                        "search.freeze": {"low": 0.0, "high": 1.0},
                        "search.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    storage = f"sqlite:///{tmp_path / 's.db'}"
    quiet = Progress(console=Console(file=(tmp_path / "log").open("w"), highlight=False))
    outcome = run_search(spec, storage, tmp_path / "artifacts", quiet)
    trials = outcome.study.trials
    assert len(trials) == 3
    assert trials[0].params["freeze"] == 0.0 and trials[0].params["lr"] == 1e-3
    assert trials[0].params["alpha"] == 0.0
    assert trials[1].params["lr"] != 1e-3  # then the sampler


def test_sampler_seed_differs_between_studies(tiny_spec, tmp_path: Path) -> None:
    base = tiny_spec()
    assert sampler_seed(base) == sampler_seed(tiny_spec())  # same spec, same draws
    others = [
        tiny_spec(name="other"), tiny_spec(seed=1), tiny_spec(**{"data.seed": 3}),
        tiny_spec(**{"search.lr": {"low": 1e-3, "high": 1e-2, "log": True}}),
    ]
    seeds = {sampler_seed(s) for s in [base, *others]}
    assert len(seeds) == 5

    def first_draw(spec) -> dict:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
        trial = study.ask()
        sample_params(trial, spec)
        return trial.params

    assert first_draw(base) == first_draw(tiny_spec())
    assert first_draw(base) != first_draw(tiny_spec(name="other"))


def test_patient_pruning_spares_a_climbing_trial(tiny_spec) -> None:
    spec = tiny_spec(**{"pruner": {"type": "median", "warmup_epochs": 0}, "train.epochs": 6})
    assert spec.pruner.patience == 1  # the default
    for patience, pruned in ((1, False), (None, True)):
        s = tiny_spec(**{"pruner": {"type": "median", "warmup_epochs": 0,
                                    "patience": patience}, "train.epochs": 6})
        study = optuna.create_study(direction="maximize", pruner=make_pruner(s))
        for _ in range(3):  # strong trials
            t = study.ask()
            for step in range(1, 4):
                t.report(0.9, step)
            study.tell(t, 0.9)
        late = study.ask()  # far behind, but climbing every epoch
        for step, value in enumerate((0.1, 0.2, 0.34), start=1):
            late.report(value, step)
        assert bool(late.should_prune()) is pruned
    # A stalled trial that falls behind is still pruned under patience.
    study = optuna.create_study(direction="maximize", pruner=make_pruner(spec))
    for _ in range(3):
        t = study.ask()
        for step in range(1, 4):
            t.report(0.9, step)
        study.tell(t, 0.9)
    stalled = study.ask()
    for step, value in enumerate((0.3, 0.2, 0.2), start=1):
        stalled.report(value, step)
    assert stalled.should_prune()


def test_retention_kind_is_searched(tiny_spec) -> None:
    spec = tiny_spec(retention=["none", "l2sp", "distill"])
    assert spec.retention_kinds == ["none", "l2sp", "distill"]
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    kinds = set()
    for _ in range(12):
        trial = study.ask()
        params = sample_params(trial, spec)
        kinds.add(params.retention)
        assert trial.params["retention"] == params.retention
        if params.retention == "none":
            assert params.alpha == 0.0
        study.tell(trial, 0.5)
    assert kinds == {"none", "l2sp", "distill"}
    assert tiny_spec().retention_kinds == ["l2sp"]


@pytest.mark.parametrize(("value", "message"), [
    ([], "no retention kind to search"),
    (["l2sp", "l2sp"], "listed twice: l2sp"),
    (["l2sp", "source"], "retention 'source' needs a 'source:' data set"),
    ("forget", "retention"),
])
def test_bad_retention_lists(tiny_images, value, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        validate_spec(tiny_spec_dict(tiny_images, retention=value))
