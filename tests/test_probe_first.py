"""search.probe_fraction (LP-FT): the first epochs train the new head alone,
every trunk block frozen, then the trial's freeze depth applies."""

from __future__ import annotations

import optuna
import pytest
import torch

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
    assert _trainer(plugin_host, spec, tiny_splits, probe_fraction=1.0).probe_epochs == 3


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


def test_a_restored_trainer_goes_on_in_the_right_phase(plugin_host, tiny_spec, tiny_splits) -> None:
    spec = tiny_spec(**{"train.epochs": 3})
    straight = _trainer(plugin_host, spec, tiny_splits, probe_fraction=0.34)  # 1 probe epoch
    results = [r.val.loss for r in straight.epochs()]
    first = _trainer(plugin_host, spec, tiny_splits, probe_fraction=0.34)
    next(first.epochs())
    state = first.state_dict()
    again = _trainer(plugin_host, spec, tiny_splits, probe_fraction=0.34)
    again.load_state_dict(state)
    assert [r.val.loss for r in again.epochs()] == pytest.approx(results[1:])


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


@pytest.mark.parametrize("bad", [-0.1, 1.5, {"low": 0.5, "high": 1.2}, "half"])
def test_out_of_range_fraction_is_refused_by_name(tiny_spec, bad) -> None:
    with pytest.raises(SpecError, match="probe_fraction"):
        tiny_spec(**{"search.probe_fraction": bad})
