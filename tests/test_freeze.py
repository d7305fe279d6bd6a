"""Freeze depth: fraction -> k blocks, frozen parameters, BatchNorm in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autotransfer.backbones.freeze import freeze, freeze_depth, train_mode
from autotransfer.engine.trainer import Trainer, TrialParams
from autotransfer.spec.model import BackboneRef


@pytest.mark.parametrize(
    ("fraction", "n", "k"),
    [(0.0, 5, 0), (1.0, 5, 5), (0.5, 6, 3), (0.34, 6, 2), (0.33, 6, 2), (0.3, 5, 2),
     (0.25, 6, 2), (0.5, 5, 3), (0.1, 4, 0), (0.2, 0, 0)],  # 1.5 and 2.5 round half up
)
def test_freeze_depth_maps_fraction_to_round_f_times_n(fraction: float, n: int, k: int) -> None:
    assert freeze_depth(fraction, n) == k


@pytest.mark.parametrize("fraction", [-0.1, 1.01])
def test_freeze_depth_rejects_fractions_outside_0_1(fraction: float) -> None:
    with pytest.raises(ValueError, match="freeze fraction"):
        freeze_depth(fraction, 5)


@pytest.mark.parametrize("model", ["test_resnet", "test_efficientnet", "test_vit"])
def test_blocks_cover_trunk_exactly_once_and_exclude_head(plugin_host, model: str) -> None:
    b = plugin_host.build(BackboneRef(name=f"timm:{model}", weights="none"),
                          num_classes=3, image_size=32)
    names = [n for n, _ in b.model.named_parameters()]
    in_blocks = [n for block in b.blocks for n in block]
    assert len(b.blocks) >= 3 and all(b.blocks)
    assert len(in_blocks) == len(set(in_blocks)), "a parameter is in two blocks"
    assert set(b.head) and not set(b.head) & set(in_blocks), "head parameters in a block"
    assert set(in_blocks) | set(b.head) == set(names), "trunk parameters missing from blocks"
    # Stem first: the blocks follow the order of the parameters in the network.
    first_index = [names.index(block[0]) for block in b.blocks]
    assert first_index == sorted(first_index)
    # The head is the classifier for the new classes.
    assert b.model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def _bn_of(model: nn.Module, params: set[str]) -> list[nn.Module]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and f"{name}.weight" in params:
            out.append(m)
    return out


@pytest.mark.parametrize("k", [0, 2, 5])
def test_freeze_first_k_blocks(plugin_host, k: int) -> None:
    b = plugin_host.build(BackboneRef(name="timm:test_resnet", weights="none"),
                          num_classes=3, image_size=32)
    frozen = {n for block in b.blocks[:k] for n in block}
    norms = freeze(b.model, b.blocks, k)
    for name, p in b.model.named_parameters():
        assert p.requires_grad == (name not in frozen), name
    assert all(p.requires_grad for n, p in b.model.named_parameters() if n in b.head)
    frozen_bns = _bn_of(b.model, frozen)
    live_bns = _bn_of(b.model, {n for n, _ in b.model.named_parameters()} - frozen)
    assert {id(m) for m in norms} == {id(m) for m in frozen_bns}
    assert len(frozen_bns) > 0 if k else not frozen_bns
    train_mode(b.model, norms)
    assert b.model.training
    assert all(not m.training for m in frozen_bns)
    assert all(m.training for m in live_bns)


def test_training_leaves_frozen_blocks_untouched(plugin_host, tiny_spec, tiny_splits) -> None:
    spec = tiny_spec(**{"train.epochs": 1})
    torch.manual_seed(0)
    b = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    # freeze 0.4 of 5 blocks -> k = 2
    trainer = Trainer(b, tiny_splits, TrialParams("x", 0.4, 1e-2, 1e-2, 8, 0.3), spec, seed=0)
    assert (trainer.k_frozen, trainer.n_blocks) == (2, 5)
    frozen = {n for block in b.blocks[:2] for n in block}
    results = list(trainer.epochs())
    assert len(results) == 1
    params = dict(b.model.named_parameters())
    for name in frozen:
        assert params[name].grad is None, f"frozen {name} got a gradient"
        assert torch.equal(params[name], before[name]), f"frozen {name} changed"
    changed = [n for n in params if n not in frozen and not torch.equal(params[n], before[n])]
    assert changed and set(b.head) <= set(changed)
    # BatchNorm running statistics: kept in frozen blocks, updated in trained ones.
    state = b.model.state_dict()
    frozen_bn = [n.rsplit(".", 1)[0] for n in frozen if n.endswith(".weight")]
    stats = [f"{m}.running_mean" for m in frozen_bn if f"{m}.running_mean" in state]
    assert stats, "expected BatchNorm layers in the frozen blocks"
    for s in stats:
        assert torch.equal(state[s], before[s]), f"{s} moved: BatchNorm of a frozen block trained"
    live_stats = [k for k in state if k.endswith("running_mean") and k not in stats]
    assert any(not torch.equal(state[k], before[k]) for k in live_stats)
