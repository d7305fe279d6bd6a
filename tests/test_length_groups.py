"""Text batches in groups of similar length (data/batches.length_groups): the
cheapest cuts, every row once, and the same gradients, metrics and probabilities
as the whole padded batch."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from _text_helpers import TOPICS, save_tiny_bert

from autotransfer.data.batches import (
    ACCELERATOR_GROUP_OVERHEAD_TOKENS,
    CPU_GROUP_OVERHEAD_TOKENS,
    cheapest_cuts,
    group_overhead,
    length_groups,
    make_batch,
)
from autotransfer.data.datasets import ImageSet, Splits, TextSet
from autotransfer.engine import trainer as trainer_module
from autotransfer.engine.trainer import Trainer, TrialParams, evaluate
from autotransfer.spec.model import validate_spec
from autotransfer.tuning import ensemble

pytest.importorskip("transformers")


def padded_cost(lengths: list[int], cuts: list[int], overhead: int) -> int:
    starts = [0, *cuts[:-1]]
    return sum((b - a) * lengths[b - 1] + overhead for a, b in zip(starts, cuts, strict=True))


def test_cheapest_cuts_are_optimal_and_cut_off_long_stragglers() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        lengths = sorted(rng.randint(1, 60) for _ in range(n))
        overhead = rng.choice([0, 5, 20, 100, 10_000])
        cuts = cheapest_cuts(lengths, overhead)
        assert cuts[-1] == n and cuts == sorted(set(cuts))
        brute = min(
            padded_cost(lengths, [*inner, n], overhead)
            for k in range(n)
            for inner in itertools.combinations(range(1, n), k)
        )
        assert padded_cost(lengths, cuts, overhead) == brute
    assert cheapest_cuts([5, 5, 5, 60], 10) == [3, 4]  # 95 padded tokens instead of 250
    assert cheapest_cuts([5, 5, 5, 60], 1000) == [4]  # a pass costs more than it saves
    assert cheapest_cuts([], 10) == []


def test_group_overhead_grows_with_the_cpu_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert group_overhead("cpu") == group_overhead(None) == 2 * CPU_GROUP_OVERHEAD_TOKENS
    assert group_overhead("cuda:0") == ACCELERATOR_GROUP_OVERHEAD_TOKENS


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "bert")


def mixed_texts(n: int, seed: int = 0) -> TextSet:
    """Texts of 1 to 30 words over the tiny vocabulary, three labels."""
    rng = random.Random(seed)
    words = [w for ws in TOPICS.values() for w in ws]
    texts = [" ".join(rng.choices(words, k=rng.choice([1, 2, 3, 30]))) for _ in range(n)]
    labels = torch.tensor([rng.randrange(3) for _ in range(n)])
    return TextSet(texts, labels, ["a", "b", "c"])


def text_setup(tiny_bert: Path, plugin_host, tmp_path: Path):
    data = mixed_texts(24)
    raw = {
        "name": "groups", "data": {"path": str(tmp_path)}, "retention": "distill",
        "search": {"backbones": [f"hf:{tiny_bert}@pretrained"], "freeze": 0.0, "lr": 1e-2,
                   "batch_size": 24, "alpha": 0.3},
        "train": {"epochs": 1, "threads": 1}, "pruner": {"type": "none"}, "n_trials": 1,
    }
    spec = validate_spec(raw)
    torch.manual_seed(0)
    backbone = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    return spec, backbone, Splits(data, mixed_texts(12, 1), mixed_texts(12, 2))


def test_groups_hold_every_row_once_shortest_first(tiny_bert: Path, plugin_host,
                                                   tmp_path: Path) -> None:
    _, backbone, splits = text_setup(tiny_bert, plugin_host, tmp_path)
    data = splits.train
    ids = data.encoded(backbone.preprocessing)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    groups = length_groups(data, idx, backbone, overhead=0)
    assert len(groups) > 1
    rows = torch.cat([torch.as_tensor(g) for g in groups])
    assert sorted(rows.tolist()) == sorted(idx.tolist())
    longest = [max(len(ids[i]) for i in g.tolist()) for g in groups]
    assert longest == sorted(longest)
    # a slice works too; one group when another pass never pays
    assert sorted(torch.cat(length_groups(data, slice(2, 9), backbone, 0)).tolist()) == list(
        range(2, 9))
    assert length_groups(data, idx, backbone, overhead=10**9) == [idx]
    images = ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4).long(), ["x"])
    assert length_groups(images, slice(0, 4), backbone, 0) == [slice(0, 4)]


def test_a_step_over_length_groups_is_the_whole_batch_step(tiny_bert: Path, plugin_host,
                                                            tmp_path: Path) -> None:
    spec, backbone, splits = text_setup(tiny_bert, plugin_host, tmp_path)
    params = TrialParams(spec.search.backbones[0].key, 0.0, 1e-2, 1e-4, 24, 0.3)
    trainer = Trainer(backbone, splits, params, spec, seed=0)
    backbone.model.eval()  # no dropout: the two runs must see the same network
    data, idx = splits.train, torch.arange(24)

    def grads(groups, micro: int = 24):
        trainer.micro_batch_size = micro
        parts = [(make_batch(data, g, backbone), data.labels[g]) for g in groups]
        loss = trainer._step(parts, 0)
        return loss, [p.grad.clone() for p in backbone.model.parameters() if p.grad is not None]

    whole_loss, whole = grads([idx])
    groups = length_groups(data, idx, backbone, overhead=0)
    assert len(groups) > 1
    for micro in (24, 5):  # and OOM micro-batches inside the groups
        loss, grouped = grads(groups, micro)
        assert float(loss) == pytest.approx(float(whole_loss), rel=1e-5)
        for a, b in zip(whole, grouped, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_metrics_and_probabilities_do_not_depend_on_the_groups(
    tiny_bert: Path, plugin_host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, backbone, splits = text_setup(tiny_bert, plugin_host, tmp_path)
    data = splits.train
    results = {}
    for overhead in (0, 10**9):
        monkeypatch.setattr(trainer_module, "group_overhead", lambda _d, o=overhead: o)
        monkeypatch.setattr(ensemble, "group_overhead", lambda _d, o=overhead: o)
        results[overhead] = (evaluate(backbone, data, batch_size=10),
                             ensemble.probabilities(backbone, data, batch_size=10))
    (grouped, p_grouped), (whole, p_whole) = results[0], results[10**9]
    assert grouped.confusion == whole.confusion
    assert grouped.loss == pytest.approx(whole.loss, rel=1e-5)
    torch.testing.assert_close(p_grouped, p_whole, rtol=1e-4, atol=1e-6)


def test_training_epochs_step_over_length_groups(tiny_bert: Path, plugin_host, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    spec, backbone, splits = text_setup(tiny_bert, plugin_host, tmp_path)
    params = TrialParams(spec.search.backbones[0].key, 0.0, 1e-2, 1e-4, 24, 0.3)
    trainer = Trainer(backbone, splits, params, spec, seed=0)
    assert trainer.group_overhead == group_overhead("cpu")
    trainer.group_overhead = 0
    seen: list[list[int]] = []
    step = trainer._step
    monkeypatch.setattr(trainer, "_step", lambda parts, i: seen.append(
        [len(y) for _, y in parts]) or step(parts, i))
    trainer.fit(1)
    assert len(seen) == 1 and len(seen[0]) > 1 and sum(seen[0]) == 24
