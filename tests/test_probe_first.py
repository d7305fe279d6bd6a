"""search.probe_fraction (LP-FT): the first epochs train the new head alone,
every trunk block frozen, then the trial's freeze depth applies."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.engine.feature_cache import FeatureCache
from autotransfer.engine.trainer import Trainer, TrialParams
from autotransfer.exceptions import SpecError
from autotransfer.tuning.objective import sample_params
from autotransfer.tuning.refit import trial_params

BACKBONE = "timm:test_resnet@none"


def _trainer(plugin_host, spec, splits, cache=None, **params) -> Trainer:
    torch.manual_seed(0)
    b = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    p = TrialParams(BACKBONE, params.pop("freeze", 0.0), 1e-2, 1e-4, 8,
                    params.pop("alpha", 0.0), **params)
    return Trainer(b, splits, p, spec, 0, cache=cache)


def _weights(t: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(head, trunk) parameters, copied."""
    head, trunk = {}, {}
    for n, p in t.backbone.model.named_parameters():
        (head if n in t.backbone.head else trunk)[n] = p.detach().clone()
    return head, trunk


def _stats(t: Trainer) -> dict[str, torch.Tensor]:
    """BatchNorm running means, copied."""
    return {n: b.clone() for n, b in t.backbone.model.named_buffers() if "running_mean" in n}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in a)


def test_the_trunk_waits_for_the_probe_epochs(plugin_host, tiny_spec, tiny_splits) -> None:
    spec = tiny_spec(**{"train.epochs": 4})
    t = _trainer(plugin_host, spec, tiny_splits, probe_fraction=0.5)
    assert t.probe_epochs == 2 and t.k_frozen == 0
    # the optimiser holds the trunk from the start, at the trunk's rate
    assert len(t.optimizer.param_groups) == 2
    head0, trunk0 = _weights(t)
    stats0 = _stats(t)
    assert stats0
    epochs = t.epochs()
    next(epochs), next(epochs)
    head2, trunk2 = _weights(t)
    assert _changed(head0, head2)
    assert not _changed(trunk0, trunk2)
    assert not _changed(stats0, _stats(t))  # BatchNorm in eval mode: a true probe
    next(epochs)
    _, trunk3 = _weights(t)
    assert _changed(trunk2, trunk3)
    assert _changed(stats0, _stats(t))
    assert t.k_active == 0


def test_zero_is_a_plain_fine_tune(plugin_host, tiny_spec, tiny_splits) -> None:
    t = _trainer(plugin_host, tiny_spec(), tiny_splits)  # TrialParams' default: 0.0
    assert t.probe_epochs == 0 and t.k_active == t.k_frozen == 0
    _, trunk0 = _weights(t)
    next(t.epochs())
    assert _changed(trunk0, _weights(t)[1])


def test_probe_epochs_round_half_up(plugin_host, tiny_spec, tiny_splits) -> None:
    spec = tiny_spec(**{"train.epochs": 3})
    assert _trainer(plugin_host, spec, tiny_splits, probe_fraction=0.5).probe_epochs == 2
    assert _trainer(plugin_host, spec, tiny_splits, probe_fraction=0.1).probe_epochs == 0
    # the last epoch always trains the trunk
    assert _trainer(plugin_host, spec, tiny_splits, probe_fraction=0.9).probe_epochs == 2
    one = tiny_spec(**{"train.epochs": 1})
    assert _trainer(plugin_host, one, tiny_splits, probe_fraction=0.5).probe_epochs == 0


def test_l2sp_anchors_the_trunk_the_fine_tune_trains(plugin_host, tiny_spec, tiny_splits) -> None:
    spec = tiny_spec(**{"train.epochs": 4})
    plain = _trainer(plugin_host, spec, tiny_splits, alpha=0.3, retention="l2sp")
    lpft = _trainer(plugin_host, spec, tiny_splits, alpha=0.3, retention="l2sp",
                    probe_fraction=0.5)
    assert len(lpft.retention.params) == len(plain.retention.params) > 0


def test_the_probe_epochs_use_the_whole_trunks_cached_features(
    plugin_host, tiny_spec, tiny_splits
) -> None:
    spec = tiny_spec(**{"train.epochs": 2})
    t = _trainer(plugin_host, spec, tiny_splits, cache=FeatureCache(1.0), probe_fraction=0.5)
    assert t.point == t.backbone.split.point_at_most(t.n_blocks) > 0
    assert t.trial_point == 0  # freeze 0: no prefix once the trunk trains
    epochs = t.epochs()
    next(epochs)
    assert t.features_cached
    next(epochs)
    assert not t.features_cached and t.point == 0


@pytest.mark.parametrize("stop", [1, 2, 3])  # in the probe epochs, at their end, after
def test_a_restored_trainer_goes_on_in_the_right_phase(
    plugin_host, tiny_spec, tiny_splits, stop
) -> None:
    spec = tiny_spec(**{"train.epochs": 4})
    straight = _trainer(plugin_host, spec, tiny_splits, probe_fraction=0.5)  # 2 probe epochs
    results = [r.val.loss for r in straight.epochs()]
    first = _trainer(plugin_host, spec, tiny_splits, probe_fraction=0.5)
    epochs = first.epochs()
    for _ in range(stop):
        next(epochs)
    state = first.state_dict()
    again = _trainer(plugin_host, spec, tiny_splits, probe_fraction=0.5)
    again.load_state_dict(state)
    assert [r.val.loss for r in again.epochs()] == pytest.approx(results[stop:])
    assert _weights(again)[1].keys() == _weights(straight)[1].keys()
    assert not _changed(_weights(again)[1], _weights(straight)[1])


def test_cached_and_uncached_train_the_same(plugin_host, tiny_spec, tiny_splits) -> None:
    """Half the blocks frozen after the probe epochs: the cache holds the whole
    trunk's prefix first, then the shallower one; both phases train as uncached."""
    plain_images = {"crop_scale": [1.0, 1.0], "flip": False}  # cached = uncached inputs
    spec = tiny_spec(**{"train.epochs": 4, "data.augment": plain_images})
    cached = _trainer(plugin_host, spec, tiny_splits, cache=FeatureCache(1.0),
                      freeze=0.6, probe_fraction=0.5)
    plain = _trainer(plugin_host, spec, tiny_splits, freeze=0.6, probe_fraction=0.5)
    assert 0 < cached.trial_point < cached.point
    seen = []
    for a, b in zip(cached.epochs(), plain.epochs(), strict=True):
        assert a.val.loss == pytest.approx(b.val.loss, rel=1e-4, abs=1e-5)
        seen.append((cached.features_cached, cached.point))
    assert seen[1] == (True, cached.backbone.split.point_at_most(cached.n_blocks))
    assert seen[3] == (True, cached.trial_point)


def test_sampled_recorded_and_refit(tiny_spec) -> None:
    trial = optuna.create_study().ask()
    assert sample_params(trial, tiny_spec()).probe_fraction == 0.0  # the default: off
    assert trial.params["probe_fraction"] == 0.0  # recorded, as a one-point range
    searched = tiny_spec(**{"search.probe_fraction": {"low": 0.0, "high": 0.5}})
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)).ask()
    fraction = sample_params(trial, searched).probe_fraction
    assert 0.0 < fraction <= 0.5 and trial.params["probe_fraction"] == fraction
    fixed = tiny_spec(**{"search.probe_fraction": 0.25})
    trial = optuna.create_study().ask()
    assert sample_params(trial, fixed).probe_fraction == 0.25
    frozen = optuna.trial.create_trial(
        params=trial.params, distributions=trial.distributions, value=0.5
    )
    assert trial_params(frozen).probe_fraction == 0.25
    old = dict(trial.params)
    del old["probe_fraction"]  # a trial stored before the parameter existed
    dists = {k: v for k, v in trial.distributions.items() if k in old}
    assert trial_params(
        optuna.trial.create_trial(params=old, distributions=dists, value=0.5)
    ).probe_fraction == 0.0


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, {"low": 0.5, "high": 1.2}, "half"])
def test_out_of_range_fraction_is_refused_by_name(tiny_spec, bad) -> None:
    with pytest.raises(SpecError, match="probe_fraction"):
        tiny_spec(**{"search.probe_fraction": bad})


def test_a_search_and_its_refit_export_with_probe_epochs(write_spec, tmp_path: Path) -> None:
    """Through the command line: the progress line names the probe epochs, the
    table shows the fraction, and the refit export trains with it."""
    runner = CliRunner()
    storage = f"sqlite:///{tmp_path / 's.db'}"
    spec = write_spec(**{"name": "lpft", "n_trials": 2, "search.probe_fraction": 0.5,
                         "search.freeze": 0.0, "sampler.portfolio": False})
    result = runner.invoke(app, ["search", str(spec), "--storage", storage, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["best_params"]["probe_fraction"] == 0.5
    assert "freeze 0/" in result.stderr and "after 1 probe epoch " in result.stderr
    table = runner.invoke(app, ["trials", "--storage", storage])
    assert table.exit_code == 0 and "probe" in table.stdout and "0.50" in table.stdout
    export = runner.invoke(app, ["export", "--storage", storage, "--refit", "--no-ensemble",
                                 str(tmp_path / "m")])
    assert export.exit_code == 0, export.output
    card = (tmp_path / "m" / "README.md").read_text()
    assert "probe_fraction" in card


def test_the_sampler_seed_of_a_spec_without_it_is_unchanged(tiny_spec) -> None:
    import hashlib

    from autotransfer.tuning.sampling import sampler_seed

    spec = tiny_spec()
    search = spec.search.model_dump(mode="json")
    del search["probe_fraction"]  # the identity as it was before the field existed
    text = json.dumps({"seed": spec.seed, "name": spec.name,
                       "data": spec.data.model_dump(mode="json"), "search": search},
                      sort_keys=True)
    assert sampler_seed(spec) == int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    assert sampler_seed(tiny_spec(**{"search.probe_fraction": 0.25})) != sampler_seed(spec)
