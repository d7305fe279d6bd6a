"""A conformance suite for backbone families, shipped for plugin authors.

Like ``optuna.testing.pytest_storages``: import the tests into a test module of
your plugin and give them a ``backbone_case`` fixture, parametrized over the
models to check::

    import pytest
    from autotransfer.testing.backbone_family import *  # noqa: F403  (the tests)
    from autotransfer.testing.backbone_family import BackboneCase

    from my_plugin import MyFamily

    @pytest.fixture(params=["small", "medium"], scope="module")
    def backbone_case(request):
        return BackboneCase(MyFamily, request.param, image_size=32)

Each test builds the backbone on the CPU with ``weights="none"`` (random init:
no downloads) unless the case names other weights, and checks the contract of
:class:`autotransfer.backbones.Backbone`: forward and backward, blocks that cover
every trunk parameter exactly once and leave out the head, freezing the first k
blocks (:func:`autotransfer.backbones.freeze.freeze`), a head resized to ``num_classes``,
``classify(features(x)) == model(x)`` in eval mode, valid preprocessing, a name
``family:model``, declared weights sources, and exportability: the model with
its new head traced to TorchScript and exported to ONNX by the export's own code
(:func:`autotransfer.export.writer.write_programs`), both programs within
:data:`EXPORT_TOLERANCE` of the model on another batch. A case is built once per
test session and deep-copied for each test. Each failure says what to fix.
A backbone that declares a split forward (:class:`autotransfer.backbones.SplitForward`)
is also checked: prefix then suffix equals the whole forward within 1e-5 (fp32,
eval mode) at every declared point, and the prefix reads only the first k blocks.

Image backbones get random image batches; text backbones (``modality ==
"text"``) get a few sentences encoded by their own tokenizer and padded
(:mod:`autotransfer.data.batches`), so the checks also show that the tokenizer fits
the model (token ids inside the vocabulary, max length inside the position
embeddings).

The ``check_*`` functions are the same checks as plain functions, for use
outside pytest: each returns None or raises ``AssertionError`` with the message;
``check_all(case)`` runs them all in order and stops at the first failure.

Long because it ships as one pytest module that plugin authors import with
``*``: every check lives in this file.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from autotransfer.backbones import (
    MODALITIES,
    Backbone,
    BackboneFamily,
    SplitForward,
    TextPreprocessing,
)
from autotransfer.backbones.freeze import freeze, freeze_depth, train_mode
from autotransfer.data.batches import Batch, forward, pad
from autotransfer.plugins.host import get_plugin_host

SENTENCES = (
    "the film was good",
    "a long and very boring movie, i did not like it at all",
    "great",
    "the plot made no sense but the music was wonderful",
)
"""Text inputs of the checks (a batch takes the first ``batch`` of them, cycling)."""
INTERPOLATIONS = frozenset({"nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"})
"""The values ``Preprocessing.interpolation`` may take (PIL's resampling filters)."""
EXPORT_TOLERANCE = 1e-4
"""Largest absolute logit difference allowed between the model and its exported
TorchScript and ONNX programs (the export itself refuses above 1e-3)."""
NAMED_WEIGHTS = ("pretrained", "packaged", "none")

__all__ = [
    "BackboneCase",
    "EXPORT_TOLERANCE",
    "check_all",
    "test_backward_reaches_every_block",
    "test_blocks_cover_trunk_exactly_once",
    "test_builds",
    "test_exports_to_torchscript_and_onnx",
    "test_features_classify_match_model",
    "test_forward_cpu",
    "test_freezing_k_blocks",
    "test_head_reset_changes_output_size",
    "test_list_models_filter",
    "test_preprocessing_is_valid",
    "test_weights_sources",
    "test_split_forward_matches_whole",
]

SPLIT_ATOL = 1e-5
"""Tolerance of prefix-then-suffix against the whole forward (fp32, eval mode)."""


@dataclass(frozen=True)
class BackboneCase:
    """One model of a family to check.

    Attributes:
        family: the family class (or instance), or its name as installed
            (looked up through the plugin host, i.e. the entry point).
        model: the model name (the part after ``family:``).
        weights: ``none`` by default: tests must not download.
        image_size: input side; keep it small.
        num_classes: classes of the test head.
        batch: batch size of the test inputs.
        atol: tolerance of the ``classify(features(x)) == model(x)`` check.
        export: run the exportability check (TorchScript and ONNX). Switch it
            off only to save test time for a model whose export is checked
            elsewhere: ``autotransfer export`` needs it.
    """

    family: type[BackboneFamily] | BackboneFamily | str
    model: str
    weights: str = "none"
    image_size: int = 32
    num_classes: int = 3
    batch: int = 2
    atol: float = 1e-4
    export: bool = True

    @property
    def id(self) -> str:
        return f"{self.family_instance().name}:{self.model}@{self.weights}"

    def family_instance(self) -> BackboneFamily:
        if isinstance(self.family, BackboneFamily):
            return self.family
        if isinstance(self.family, str):
            return get_plugin_host().family(self.family)
        return self.family()

    def build(self, num_classes: int | None = None) -> Backbone:
        """A fresh backbone (built once per session, then deep-copied)."""
        return copy.deepcopy(_build(self, num_classes or self.num_classes))

    def inputs(self, seed: int = 0) -> Batch:
        """A batch for the backbone: random images, or sentences its tokenizer
        encoded (``seed`` rotates the sentences), padded to the longest."""
        pre = _build(self, self.num_classes).preprocessing
        if isinstance(pre, TextPreprocessing):
            texts = [SENTENCES[(seed + i) % len(SENTENCES)] for i in range(self.batch)]
            return pad(pre.encode(texts), pre.pad_token_id)
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch, 3, self.image_size, self.image_size, generator=g)


@functools.cache
def _build(case: BackboneCase, num_classes: int) -> Backbone:
    torch.manual_seed(0)
    return case.family_instance().build(
        case.model, weights=case.weights, num_classes=num_classes, image_size=case.image_size
    )


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


# -- the checks ---------------------------------------------------------------


def check_builds(case: BackboneCase) -> None:
    b = case.build()
    family = case.family_instance()
    assert isinstance(b, Backbone), (
        f"build() returned {type(b).__name__}: return an autotransfer.backbones.Backbone "
        "wrapping the model"
    )
    expected = f"{family.name}:{case.model}"
    assert b.name == expected, (
        f"Backbone.name is {b.name!r}: set it to {expected!r} (family:model, the family's "
        "name and the model name build() was given)"
    )
    assert b.weights == case.weights, (
        f"Backbone.weights is {b.weights!r}: set it to the weights build() was given "
        f"({case.weights!r})"
    )
    assert isinstance(b.model, nn.Module), (
        f"Backbone.model is {type(b.model).__name__}: it must be a torch.nn.Module"
    )
    assert b.blocks, "a backbone needs at least one trunk block"
    assert all(b.blocks), "empty block"
    assert b.head, "no head parameters"
    assert b.num_features > 0
    assert family.modality in ("image", "text", "image+text"), f"modality {family.modality!r}"
    assert b.modality in MODALITIES, f"backbone modality {b.modality!r}"
    assert b.modality in family.modality.split("+"), (
        f"the family is {family.modality}, the backbone {b.modality}"
    )
    assert isinstance(b.preprocessing, TextPreprocessing) == (b.modality == "text"), (
        "a text backbone needs TextPreprocessing, an image backbone Preprocessing"
    )


def check_forward_cpu(case: BackboneCase) -> None:
    b = case.build()
    b.model.train()
    y = forward(b.model, case.inputs())
    assert isinstance(y, torch.Tensor), f"model(x) returned {type(y).__name__}, not logits"
    assert y.shape == (case.batch, case.num_classes), f"logits shape {tuple(y.shape)}"
    assert torch.isfinite(y).all()


def check_backward_reaches_every_block(case: BackboneCase) -> None:
    b = case.build()
    b.model.train()
    y = forward(b.model, case.inputs())
    F.cross_entropy(y, torch.arange(case.batch) % case.num_classes).backward()
    params = _params(b.model)
    for name in b.head:
        assert params[name].grad is not None, f"head parameter {name} got no gradient"
    for i, block in enumerate(b.blocks):
        assert any(params[n].grad is not None for n in block), f"block {i} got no gradient"


def check_blocks_cover_trunk_exactly_once(case: BackboneCase) -> None:
    b = case.build()
    names = list(_params(b.model))
    flat = [n for block in b.blocks for n in block]
    unknown = sorted(set(flat + b.head) - set(names))
    assert not unknown, f"not parameters of the model: {unknown[:5]}"
    dupes = sorted({n for n in flat if flat.count(n) > 1})
    assert not dupes, f"in more than one block: {dupes[:5]}"
    in_head = sorted(set(flat) & set(b.head))
    assert not in_head, f"head parameters in blocks: {in_head[:5]}"
    missing = [n for n in names if n not in set(flat) | set(b.head)]
    assert not missing, f"trunk parameters in no block: {missing[:5]}"


def check_freezing_k_blocks(case: BackboneCase) -> None:
    n = len(case.build().blocks)
    for k in sorted({0, 1, freeze_depth(0.5, n), n}):
        b = case.build()
        frozen_norms = freeze(b.model, b.blocks, k)
        frozen = {name for block in b.blocks[:k] for name in block}
        params = _params(b.model)
        for name, p in params.items():
            assert p.requires_grad == (name not in frozen), f"k={k}: {name} requires_grad wrong"
        before = {name: params[name].detach().clone() for name in frozen}
        buffers = {
            name: t.clone()
            for m in frozen_norms
            for name, t in m.named_buffers()
            if t.is_floating_point()
        }
        train_mode(b.model, frozen_norms)
        opt = torch.optim.SGD([p for p in b.model.parameters() if p.requires_grad], lr=0.1)
        y = forward(b.model, case.inputs())
        F.cross_entropy(y, torch.arange(case.batch) % case.num_classes).backward()
        opt.step()
        for name in frozen:
            assert params[name].grad is None, f"k={k}: frozen {name} got a gradient"
            assert torch.equal(params[name], before[name]), f"k={k}: frozen {name} changed"
        after = {
            name: t for m in frozen_norms for name, t in m.named_buffers() if t.is_floating_point()
        }
        for name, t in buffers.items():
            assert torch.equal(t, after[name]), f"k={k}: frozen norm statistics {name} changed"
        assert any(params[h].grad is not None for h in b.head), "head must stay trainable"


def check_head_reset_changes_output_size(case: BackboneCase) -> None:
    other = case.num_classes + 4
    small, large = case.build(), case.build(other)
    x = case.inputs()
    small.model.eval()
    large.model.eval()
    with torch.no_grad():
        assert forward(small.model, x).shape == (case.batch, case.num_classes)
        assert forward(large.model, x).shape == (case.batch, other)
    p_small, p_large = _params(small.model), _params(large.model)
    assert small.head == large.head, "head parameter names depend on num_classes"
    assert sum(p_small[n].numel() for n in small.head) < sum(p_large[n].numel() for n in large.head)
    assert [len(b) for b in small.blocks] == [len(b) for b in large.blocks]


def check_features_classify_match_model(case: BackboneCase) -> None:
    b = case.build()
    b.model.eval()
    x = case.inputs()
    with torch.no_grad():
        logits = forward(b.model, x)
        feats = b.features(b.model, x)
        again = b.classify(b.model, feats)
    assert feats.shape == (case.batch, b.num_features), (
        f"features shape {tuple(feats.shape)}, expected ({case.batch}, {b.num_features})"
    )
    assert torch.allclose(again, logits, atol=case.atol), (
        f"classify(features(x)) differs from model(x) by {(again - logits).abs().max():.2e}"
    )


def check_split_forward_matches_whole(case: BackboneCase) -> None:
    """For every declared point k: ``suffix(prefix(x, k), k) == features(x)``
    within :data:`SPLIT_ATOL`, and the prefix does not change when the
    parameters of ``blocks[k:]`` and the head do (it reads only the first k
    blocks). A backbone without a split forward passes."""
    b = case.build()
    split = b.split
    if split is None:
        return
    assert isinstance(split, SplitForward), f"split is a {type(split).__name__}"
    points = list(split.points)
    n = len(b.blocks)
    assert points == sorted(set(points)), f"split points {points} not ascending and unique"
    assert all(1 <= k <= n for k in points), f"split points {points} outside 1..{n}"
    b.model.eval()
    x = case.inputs()
    with torch.no_grad():
        whole = b.features(b.model, x).float()
        prefixes = {}
        for k in points:
            state = split.prefix(b.model, x, k)
            got = split.suffix(b.model, state, k).float()
            assert got.shape == whole.shape, f"k={k}: suffix shape {tuple(got.shape)}"
            err = (got - whole).abs().max().item()
            assert err <= SPLIT_ATOL, f"k={k}: prefix then suffix differs by {err:.2e}"
            prefixes[k] = state
        params = _params(b.model)
        for k in points:
            later = {name for block in b.blocks[k:] for name in block} | set(b.head)
            saved = {name: params[name].detach().clone() for name in later}
            for name in later:
                params[name].add_(1.0)
            again = split.prefix(b.model, x, k)
            for name in later:
                params[name].copy_(saved[name])
            for a, c in zip(_tensors(prefixes[k]), _tensors(again), strict=True):
                assert torch.equal(a, c), f"k={k}: the prefix reads parameters of later blocks"


def _tensors(state: object) -> list[torch.Tensor]:
    if isinstance(state, dict):
        return [state[key] for key in sorted(state)]
    assert isinstance(state, torch.Tensor), f"a prefix state is a {type(state).__name__}"
    return [state]


def check_preprocessing_is_valid(case: BackboneCase) -> None:
    b = case.build()
    pre = b.preprocessing
    if isinstance(pre, TextPreprocessing):
        _check_text_preprocessing(b, pre)
        return
    assert len(pre.mean) == 3 and len(pre.std) == 3, "mean/std need 3 channels"
    assert all(0.0 <= m <= 1.0 and math.isfinite(m) for m in pre.mean), f"mean {pre.mean}"
    assert all(0.0 < s <= 1.0 and math.isfinite(s) for s in pre.std), f"std {pre.std}"
    assert pre.interpolation in INTERPOLATIONS, f"interpolation {pre.interpolation!r}"


def _check_text_preprocessing(b: Backbone, pre: TextPreprocessing) -> None:
    assert pre.max_length >= 4, f"max_length {pre.max_length}"
    assert pre.tokenizer.pad_token_id is not None, "the tokenizer has no padding token"
    ids = pre.encode([" ".join(SENTENCES) * 50])[0]
    assert len(ids) == pre.max_length, "encode() does not truncate to max_length"
    tables = [(n, m) for n, m in b.model.named_modules() if isinstance(m, nn.Embedding)]
    words = [m for n, m in tables if "word" in n or "token" in n] or [m for _, m in tables]
    assert words, "no token embedding in the model"
    embeddings = words[0]
    assert max(ids) < embeddings.num_embeddings, (
        f"token id {max(ids)} outside the embedding's {embeddings.num_embeddings} rows: "
        "the tokenizer is not the model's"
    )
    assert len(pre.tokenizer) <= embeddings.num_embeddings, (
        f"tokenizer vocabulary {len(pre.tokenizer)} > {embeddings.num_embeddings} embeddings"
    )
    positions = [
        m.num_embeddings for n, m in b.model.named_modules()
        if isinstance(m, nn.Embedding) and "position" in n
    ]
    if positions:
        assert pre.max_length <= max(positions), (
            f"max_length {pre.max_length} > {max(positions)} position embeddings"
        )
    x = forward(b.model.eval(), pad([ids], pre.pad_token_id))
    assert torch.isfinite(x).all(), "a max-length text gives non-finite logits"
    assert len(pre.fingerprint) == 64


def check_list_models_filter(case: BackboneCase) -> None:
    family = case.family_instance()
    names = family.list_models()
    assert all(isinstance(n, str) for n in names)
    if not names:  # an open-ended family (a hub): nothing to list
        return
    assert case.model in names, f"{case.model} is built but not listed"
    assert case.model in family.list_models(case.model)
    pattern = case.model[:2] + "*"
    assert set(family.list_models(pattern)) == {n for n in names if fnmatch.fnmatch(n, pattern)}


def check_weights_sources(case: BackboneCase) -> None:
    family = case.family_instance()
    sources = family.weights_sources
    assert isinstance(sources, tuple) and sources, (
        f"weights_sources is {sources!r}: declare a non-empty tuple of the named sources "
        "the family accepts, e.g. ('pretrained', 'none')"
    )
    assert all(isinstance(s, str) and s and "/" not in s for s in sources), (
        f"weights_sources {sources!r}: each source is a name (str without '/'); local "
        "paths need no declaration"
    )
    if case.weights in NAMED_WEIGHTS or case.weights in sources:
        assert case.weights in sources, (
            f"the case builds with weights {case.weights!r}, which the family does not "
            f"declare in weights_sources {sources!r}: add it there or choose another; "
            "autotransfer refuses undeclared named sources before build()"
        )


def check_exports_to_torchscript_and_onnx(case: BackboneCase) -> None:
    """The built model (with its new head) traces to TorchScript and exports to
    ONNX through the export's own code, both within :data:`EXPORT_TOLERANCE`."""
    from autotransfer.exceptions import AutotransferError
    from autotransfer.export.writer import write_programs

    if not case.export:
        return
    b = case.build()
    with tempfile.TemporaryDirectory(prefix="autotransfer-conformance-") as tmp:
        try:
            diffs = write_programs(b, Path(tmp), case.image_size, tolerance=EXPORT_TOLERANCE)
        except AutotransferError as exc:
            raise AssertionError(
                f"{case.id}: {exc}. The exported programs must compute what the model "
                "computes in eval mode: no randomness or training-only branches in "
                "eval, no Python decisions on tensor values"
            ) from exc
        except Exception as exc:
            raise AssertionError(
                f"{case.id} does not export: {type(exc).__name__}: {exc}. model(x) must "
                "trace with torch.jit.trace and export with torch.onnx.export (opset "
                "17): take tensors and return one logits tensor, no data-dependent "
                "shapes or Python control flow on tensor values, only ONNX-exportable ops"
            ) from exc
    assert set(diffs) >= {"torchscript_max_abs_diff", "onnx_max_abs_diff"}


def check_all(case: BackboneCase) -> None:
    """Every check, in order; raises AssertionError at the first failure."""
    for check in (
        check_builds, check_forward_cpu, check_backward_reaches_every_block,
        check_blocks_cover_trunk_exactly_once, check_freezing_k_blocks,
        check_head_reset_changes_output_size, check_features_classify_match_model,
        check_preprocessing_is_valid, check_list_models_filter, check_weights_sources,
        check_exports_to_torchscript_and_onnx,
        check_split_forward_matches_whole,
    ):
        check(case)


# -- the tests (need a ``backbone_case`` fixture) -------------------------------


def test_builds(backbone_case: BackboneCase) -> None:
    check_builds(backbone_case)


def test_forward_cpu(backbone_case: BackboneCase) -> None:
    check_forward_cpu(backbone_case)


def test_backward_reaches_every_block(backbone_case: BackboneCase) -> None:
    check_backward_reaches_every_block(backbone_case)


def test_blocks_cover_trunk_exactly_once(backbone_case: BackboneCase) -> None:
    check_blocks_cover_trunk_exactly_once(backbone_case)


def test_freezing_k_blocks(backbone_case: BackboneCase) -> None:
    check_freezing_k_blocks(backbone_case)


def test_head_reset_changes_output_size(backbone_case: BackboneCase) -> None:
    check_head_reset_changes_output_size(backbone_case)


def test_features_classify_match_model(backbone_case: BackboneCase) -> None:
    check_features_classify_match_model(backbone_case)


def test_preprocessing_is_valid(backbone_case: BackboneCase) -> None:
    check_preprocessing_is_valid(backbone_case)


def test_list_models_filter(backbone_case: BackboneCase) -> None:
    check_list_models_filter(backbone_case)


def test_weights_sources(backbone_case: BackboneCase) -> None:
    check_weights_sources(backbone_case)


def test_exports_to_torchscript_and_onnx(backbone_case: BackboneCase) -> None:
    check_exports_to_torchscript_and_onnx(backbone_case)


def test_split_forward_matches_whole(backbone_case: BackboneCase) -> None:
    check_split_forward_matches_whole(backbone_case)
