"""The feature cache: keys never mix entries, cached trials train on the same
inputs as uncached ones, the memory budget is honoured; distill's teacher runs
only the blocks after the frozen prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autotransfer.engine.feature_cache import CacheKey, FeatureCache
from autotransfer.engine.trainer import Trainer, TrialParams
from autotransfer.spec.model import BackboneRef

PROBE = TrialParams("timm:test_resnet@none", 1.0, 5e-3, 1e-4, 8, 0.0)


def _trainer(host, spec, splits, params=PROBE, cache=None, ref=None, seed=0):
    torch.manual_seed(seed)
    ref = ref or spec.search.backbones[0]
    b = host.build(ref, num_classes=len(splits.classes), image_size=spec.data.image_size)
    return Trainer(b, splits, params, spec, 0, cache=cache)


def _entries(cache: FeatureCache) -> set[CacheKey]:
    return set(cache._entries)


def test_keys_never_hit_another_entry(plugin_host, tiny_spec, tiny_splits, tmp_path: Path):
    """Weights, depth, image size and preprocessing each give new entries."""
    spec = tiny_spec(**{"train.epochs": 1})
    cache = FeatureCache(1.0)
    list(_trainer(plugin_host, spec, tiny_splits, cache=cache).epochs())
    first = _entries(cache)
    assert len(first) == 2 and cache.hits == 0  # train view 0 and val
    list(_trainer(plugin_host, spec, tiny_splits, cache=cache).epochs())
    assert _entries(cache) == first and cache.hits == 2  # the same trial again: all hits

    # another weights file (same architecture): its own entries
    torch.manual_seed(5)
    other = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    path = tmp_path / "other.pt"
    torch.save({k: v for k, v in other.model.state_dict().items() if not k.startswith("fc.")},
               path)
    ref = BackboneRef.parse(f"timm:test_resnet@{path}")
    hits = cache.hits
    list(_trainer(plugin_host, spec, tiny_splits, cache=cache, ref=ref).epochs())
    assert cache.hits == hits and len(cache) == 4
    # another depth
    half = TrialParams("timm:test_resnet@none", 0.6, 5e-3, 1e-4, 8, 0.0)
    t = _trainer(plugin_host, spec, tiny_splits, params=half, cache=cache)
    assert 0 < t.point < len(t.backbone.blocks)
    list(t.epochs())
    assert cache.hits == hits and len(cache) == 6
    # other preprocessing (mean/std) with the same weights
    t = _trainer(plugin_host, spec, tiny_splits, cache=cache)
    pre = type(t.backbone.preprocessing)(mean=(0.4,) * 3, std=(0.3,) * 3)
    assert pre != t.backbone.preprocessing
    t.backbone.preprocessing = pre
    keys = {CacheKey(**t._cache_key(), split="val", view="eval")}
    assert not keys & _entries(cache)
    # another image size: the data part of the key differs
    big = tiny_spec(**{"train.epochs": 1, "data.image_size": 40})
    assert big.data.model_dump_json(exclude={"augment"}) != t._cache_key()["data"]


def test_cached_probe_equals_uncached_when_views_match(plugin_host, tiny_spec, tiny_splits):
    """With as many cached views as epochs, epoch e trains on the same augmented
    inputs as an uncached run: same losses and metrics within float tolerance."""
    spec = tiny_spec(**{"train.epochs": 3, "train.feature_cache_views": 3})
    cache = FeatureCache(1.0)
    cached = _trainer(plugin_host, spec, tiny_splits, cache=cache)
    plain = _trainer(plugin_host, spec, tiny_splits, cache=None)
    a, b = list(cached.epochs()), list(plain.epochs())
    assert cached.features_cached and not plain.features_cached
    assert len(cache) == 4  # 3 training views + validation
    for x, y in zip(a, b, strict=True):
        assert x.train_loss == pytest.approx(y.train_loss, rel=1e-4, abs=1e-5)
        assert x.val.loss == pytest.approx(y.val.loss, rel=1e-4, abs=1e-5)
        assert x.val.accuracy == y.val.accuracy
    # one view: epochs 2 and 3 reuse view 0, so the inputs (and losses) differ
    one = tiny_spec(**{"train.epochs": 3, "train.feature_cache_views": 1})
    c = list(_trainer(plugin_host, one, tiny_splits, cache=FeatureCache(1.0)).epochs())
    assert c[0].train_loss == pytest.approx(a[0].train_loss, rel=1e-4)
    assert c[1].train_loss != pytest.approx(a[1].train_loss, rel=1e-6)


def test_budget_is_honoured(plugin_host, tiny_spec, tiny_splits):
    """Entries beyond the budget evict the least recently used; an entry larger
    than the whole budget is not stored and the trial trains uncached."""
    spec = tiny_spec(**{"train.epochs": 1})
    probe = _trainer(plugin_host, spec, tiny_splits)
    width = probe.backbone.num_features
    train_bytes = len(tiny_splits.train) * width * 4
    # room for the train entry (18 rows) but not with validation's (9 rows) too
    cache = FeatureCache(train_bytes * 1.2 / 1024**3)
    t = _trainer(plugin_host, spec, tiny_splits, cache=cache)
    list(t.epochs())
    assert t.features_cached
    assert cache.evictions == 1 and len(cache) == 1 and cache.bytes <= cache.budget
    tiny = FeatureCache(16 / 1024**3)  # 16 bytes
    t = _trainer(plugin_host, spec, tiny_splits, cache=tiny)
    results = list(t.epochs())
    assert len(tiny) == 0 and tiny.refused >= 1 and not t.features_cached
    assert results and results[-1].val.accuracy >= 0.0


def test_distill_teacher_runs_only_the_suffix(plugin_host, tiny_spec, tiny_splits):
    """retention: distill with half the trunk frozen: the teacher's prefix
    blocks are never called; its suffix is."""
    spec = tiny_spec(**{"train.epochs": 1, "retention": "distill"})
    params = TrialParams("timm:test_resnet@none", 0.6, 5e-3, 1e-4, 8, 0.3)
    t = _trainer(plugin_host, spec, tiny_splits, params=params, cache=FeatureCache(1.0))
    assert t.point >= 1
    teacher = t.retention.teacher
    calls = {"stem": 0, "last": 0}
    teacher.conv1.register_forward_hook(lambda *a: calls.__setitem__("stem", calls["stem"] + 1))
    teacher.layer4[0].register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))
    list(t.epochs())
    assert calls["stem"] == 0 and calls["last"] > 0
