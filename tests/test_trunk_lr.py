"""search.trunk_lr_scale: the new head learns at lr, the unfrozen trunk at
lr * trunk_lr_scale (and trials stored before the parameter existed keep one
rate for all)."""

from __future__ import annotations

import optuna
import pytest
import torch

from autotransfer.engine.trainer import Trainer, TrialParams
from autotransfer.exceptions import SpecError
from autotransfer.tuning.objective import sample_params
from autotransfer.tuning.refit import trial_params

BACKBONE = "timm:test_resnet@none"


def _trainer(plugin_host, spec, splits, **params) -> Trainer:
    torch.manual_seed(0)
    b = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    p = TrialParams(BACKBONE, params.pop("freeze", 0.0), 1e-2, 1e-4, 8, 0.0, **params)
    return Trainer(b, splits, p, spec, 0)


def test_head_at_lr_trunk_at_the_scaled_lr(plugin_host, tiny_spec, tiny_splits) -> None:
    t = _trainer(plugin_host, tiny_spec(), tiny_splits, trunk_lr_scale=0.1)
    head_group, trunk_group = t.optimizer.param_groups
    assert head_group["max_lr"] == pytest.approx(1e-2)
    assert trunk_group["max_lr"] == pytest.approx(1e-3)
    head = {id(p) for n, p in t.backbone.model.named_parameters() if n in t.backbone.head}
    assert {id(p) for p in head_group["params"]} == head
    trainable = {id(p) for p in t.backbone.model.parameters() if p.requires_grad}
    assert {id(p) for p in trunk_group["params"]} == trainable - head
    # the one-cycle schedule keeps the ratio at every step
    for _ in range(3):
        t.optimizer.step()
        t.scheduler.step()
        assert trunk_group["lr"] == pytest.approx(0.1 * head_group["lr"])


def test_a_frozen_trunk_leaves_only_the_head(plugin_host, tiny_spec, tiny_splits) -> None:
    t = _trainer(plugin_host, tiny_spec(), tiny_splits, freeze=1.0, trunk_lr_scale=0.1)
    assert len(t.optimizer.param_groups) == 1
    assert t.optimizer.param_groups[0]["max_lr"] == pytest.approx(1e-2)


def test_scale_one_is_one_rate_for_all(plugin_host, tiny_spec, tiny_splits) -> None:
    t = _trainer(plugin_host, tiny_spec(), tiny_splits)  # TrialParams' default: 1.0
    assert [g["max_lr"] for g in t.optimizer.param_groups] == [pytest.approx(1e-2)] * 2


def test_auto_is_a_tenth_for_text_and_one_for_images(tiny_spec, tmp_path) -> None:
    spec = tiny_spec(**{"search.trunk_lr_scale": ...})  # the default
    assert spec.search.trunk_lr_scale == "auto"
    trial = optuna.create_study().ask()
    assert sample_params(trial, spec).trunk_lr_scale == 1.0  # an image folder
    assert trial.params["trunk_lr_scale"] == 1.0  # recorded, as a one-point range
    texts = tmp_path / "t.csv"
    texts.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(8)))
    text_spec = tiny_spec(**{"search.trunk_lr_scale": ..., "data.path": str(texts)})
    trial = optuna.create_study().ask()
    assert sample_params(trial, text_spec).trunk_lr_scale == pytest.approx(0.1)


def test_fixed_and_searched(tiny_spec) -> None:
    fixed = tiny_spec(**{"search.trunk_lr_scale": 0.3})
    trial = optuna.create_study().ask()
    assert sample_params(trial, fixed).trunk_lr_scale == pytest.approx(0.3)
    searched = tiny_spec(**{"search.trunk_lr_scale": {"low": 0.05, "high": 1.0, "log": True}})
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    assert 0.05 <= sample_params(trial, searched).trunk_lr_scale <= 1.0


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, {"low": 0.0, "high": 1.0}, "half"])
def test_out_of_range_scale_is_refused_by_name(tiny_spec, bad) -> None:
    with pytest.raises(SpecError, match="trunk_lr_scale"):
        tiny_spec(**{"search.trunk_lr_scale": bad})


def test_a_trial_stored_before_the_parameter_trained_with_one_rate() -> None:
    old = optuna.trial.create_trial(
        params={"backbone": BACKBONE, "freeze": 0.0, "lr": 1e-3, "weight_decay": 1e-4,
                "batch_size": 8, "alpha": 0.0},
        distributions={
            "backbone": optuna.distributions.CategoricalDistribution([BACKBONE]),
            "freeze": optuna.distributions.FloatDistribution(0.0, 1.0),
            "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
            "weight_decay": optuna.distributions.FloatDistribution(1e-4, 1e-4),
            "batch_size": optuna.distributions.CategoricalDistribution([8]),
            "alpha": optuna.distributions.FloatDistribution(0.0, 0.5),
        },
        value=0.5,
    )
    assert trial_params(old).trunk_lr_scale == 1.0
