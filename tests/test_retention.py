"""The retention term L_pre of L = α·L_pre + (1−α)·L_fine, for each kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autotransfer.backbones.freeze import freeze
from autotransfer.data.datasets import load_dataset
from autotransfer.engine.retention import L2SP, Distill, SourceTask
from autotransfer.engine.trainer import Trainer, TrialParams
from autotransfer.spec.model import BackboneRef, DataSpec

REF = BackboneRef(name="timm:test_resnet", weights="none")


def _build(host, seed: int = 0):
    torch.manual_seed(seed)
    return host.build(REF, num_classes=3, image_size=32)


@pytest.fixture(scope="module")
def source_images(tmp_path_factory, make_images) -> Path:
    colours = {"cyan": (40, 200, 200), "magenta": (200, 40, 200),
               "yellow": (200, 200, 40), "grey": (128, 128, 128)}
    return make_images(tmp_path_factory.mktemp("source") / "src", per_class=6,
                             classes=colours, seed=1)


def test_l2sp_is_squared_distance_of_trainable_trunk_weights(plugin_host) -> None:
    b = _build(plugin_host)
    freeze(b.model, b.blocks, 2)
    l2sp = L2SP(b)
    names = {id(p): n for n, p in b.model.named_parameters()}
    covered = {names[id(p)] for p, _ in l2sp.params}
    frozen = {n for block in b.blocks[:2] for n in block}
    assert covered == {n for n, p in b.model.named_parameters()} - frozen - set(b.head)
    x = torch.zeros(1, 3, 32, 32)
    feats = torch.zeros(1, b.num_features)
    assert l2sp.loss(x, feats).item() == 0.0
    p = dict(b.model.named_parameters())[b.blocks[3][0]]
    with torch.no_grad():
        p.add_(0.5)
    loss = l2sp.loss(x, feats)
    assert loss.item() == pytest.approx(0.25 * p.numel(), rel=1e-5)
    loss.backward()
    assert torch.allclose(p.grad, torch.full_like(p, 1.0))  # d/dp (p - p0)^2 = 2 * 0.5


def test_distill_matches_frozen_teacher_features(plugin_host) -> None:
    b = _build(plugin_host)
    distill = Distill(b)
    b.model.eval()
    x = torch.randn(4, 3, 32, 32)
    assert distill.loss(x, b.features(b.model, x)).item() == pytest.approx(0.0, abs=1e-10)
    params = dict(b.model.named_parameters())
    last = [params[n] for n in b.blocks[-1]]
    with torch.no_grad():
        for p in last:
            p.add_(0.3)
    loss = distill.loss(x, b.features(b.model, x))
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in last) and any(p.grad.abs().sum() > 0 for p in last)
    assert all(not q.requires_grad and q.grad is None for q in distill.teacher.parameters())


def test_source_task_trains_a_source_head(plugin_host, source_images: Path) -> None:
    b = _build(plugin_host)
    source = load_dataset(DataSpec(path=str(source_images), image_size=32))
    task = SourceTask(b, source, batch_size=8, generator=torch.Generator().manual_seed(0))
    head = task.parameters()
    assert head and head[0].shape == (4, b.num_features)  # 4 source classes, new head
    loss = task.loss(torch.zeros(1), torch.zeros(1))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in head)
    params = dict(b.model.named_parameters())
    # The source loss reaches the shared trunk (timm zero-inits some last-BN gammas,
    # so look for any gradient in the last block).
    assert any(params[n].grad is not None and params[n].grad.abs().sum() > 0
               for n in b.blocks[-1])


def _spec_for(kind: str, tiny_spec, source_images: Path):
    extra = {"source": {"path": str(source_images), "image_size": 32}} if kind == "source" else {}
    return tiny_spec(retention=kind, **{"train.epochs": 1}, **extra)


def _run(plugin_host, spec, splits, alpha: float, source=None, zero_retention=False):
    calls: list[torch.Tensor] = []
    b = _build(plugin_host)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    trainer = Trainer(b, splits, TrialParams(REF.name, 0.2, 1e-2, 1e-4, 8, alpha), spec,
                      seed=0, source=source)
    extra_params = trainer.retention.parameters() if trainer.retention else []
    extra = [p.detach().clone() for p in extra_params]
    if trainer.retention is not None:
        real = trainer.retention.loss

        def spy(x, features, point=0):
            value = real(x, features, point)
            calls.append(value.detach())
            return value * 0 if zero_retention else value

        trainer.retention.loss = spy  # type: ignore[method-assign]
    results = list(trainer.epochs())
    moved = any(not torch.equal(v, before[k]) for k, v in b.model.state_dict().items())
    if extra:  # extra trainable parameters (the source head) must train too
        moved = moved and all(
            not torch.equal(p, p0) for p, p0 in zip(extra_params, extra, strict=True)
        )
    return trainer, results, calls, moved


@pytest.mark.parametrize("kind", ["l2sp", "distill", "source"])
def test_each_retention_kind_contributes_to_the_loss_and_trains(
    kind: str, plugin_host, tiny_spec, tiny_splits, source_images: Path
) -> None:
    spec = _spec_for(kind, tiny_spec, source_images)
    source = load_dataset(spec.source) if spec.source else None
    expected = {"l2sp": L2SP, "distill": Distill, "source": SourceTask}[kind]

    trainer, results, calls, moved = _run(plugin_host, spec, tiny_splits, 0.5, source)
    assert isinstance(trainer.retention, expected)
    assert len(calls) == trainer.steps_per_epoch  # one L_pre per training batch
    assert all(torch.isfinite(c) for c in calls)
    assert any(c.item() > 0 for c in calls)
    assert moved and all(r.val.accuracy >= 0 for r in results)
    if kind == "source":  # the source head is optimised too
        optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert all(id(p) in optimised for p in trainer.retention.parameters())

    # Same run with L_pre forced to zero: the training loss differs, so L_pre counts.
    _, zeroed, _, _ = _run(plugin_host, spec, tiny_splits, 0.5, source, zero_retention=True)
    assert results[0].train_loss != zeroed[0].train_loss


def test_alpha_zero_is_plain_fine_tuning(
    plugin_host, tiny_spec, tiny_splits, source_images: Path, monkeypatch
) -> None:
    def no_retention(*args, **kwargs):
        raise AssertionError("alpha = 0 must not build a retention term")

    monkeypatch.setattr("autotransfer.engine.trainer.make_retention", no_retention)
    losses = {}
    for kind in ("l2sp", "distill", "source"):
        spec = _spec_for(kind, tiny_spec, source_images)
        source = load_dataset(spec.source) if spec.source else None
        trainer, results, calls, moved = _run(plugin_host, spec, tiny_splits, 0.0, source)
        assert trainer.retention is None and not calls and moved
        losses[kind] = (results[0].train_loss, results[0].val.loss)
    # The retention kind is irrelevant at alpha = 0: the three runs are identical.
    assert losses["l2sp"] == losses["distill"] == losses["source"]
