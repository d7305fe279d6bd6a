"""The contract every backbone family fulfils, built-in or third-party."""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

MODALITIES = ("image", "text")
"""What a built backbone classifies."""


@dataclass(frozen=True)
class Preprocessing:
    """How inputs are prepared for this backbone's weights.

    Travels with the weights: a packaged or local checkpoint brings its own
    mean/std, never another model's.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, object]:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}


@dataclass(frozen=True, eq=False)
class TextPreprocessing:
    """How texts become model inputs: the weights' own tokenizer and a max length.

    The tokenizer is loaded from the same directory (or hub repository) as the
    weights, so a local or packaged checkpoint never gets another model's
    vocabulary. ``tokenizer`` is a ``transformers`` *fast* tokenizer (its
    ``backend_tokenizer`` is what the export writes as ``tokenizer.json``).

    Attributes:
        tokenizer: the tokenizer object.
        max_length: texts are truncated to this many tokens (special tokens
            included); the study's ``data.max_length`` may lower it.
        source: where the tokenizer was loaded from (a directory or repo id).
    """

    tokenizer: Any
    max_length: int
    source: str = ""

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer (vocabulary, normaliser, rules),
        without its per-call truncation and padding settings."""
        state = json.loads(self.tokenizer.backend_tokenizer.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        text = json.dumps(state, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens added, truncated to ``max_length``."""
        out = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding=False
        )
        return [list(ids) for ids in out["input_ids"]]

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": "text",
            "tokenizer": self.source,
            "max_length": self.max_length,
            "tokenizer_sha256": self.fingerprint,
        }

class SplitForward(abc.ABC):
    """Optional capability: run a backbone's first ``k`` blocks, then the rest.

    ``suffix(model, prefix(model, x, k), k)`` equals ``features(model, x)`` (the
    pooled pre-logit features) in eval mode, for every ``k`` in :attr:`points`;
    ``prefix(model, x, k)`` reads only the parameters (and buffers) of
    ``blocks[:k]``. The trainer runs the frozen prefix once per input and keeps
    its output (the feature cache); ``retention: distill``'s teacher runs only
    the suffix. Both take the model as an argument (the teacher is a copy).

    A family that does not provide it still works: its trials are not cached.
    """

    points: tuple[int, ...]
    """The depths ``k`` (1 .. number of blocks, ascending) at which it splits."""

    @abc.abstractmethod
    def prefix(self, model: nn.Module, x: Any, k: int) -> Any:
        """The output of ``blocks[:k]`` on input batch ``x``: a tensor whose first
        dimension is the batch, or (text) a dict of such tensors."""

    @abc.abstractmethod
    def suffix(self, model: nn.Module, state: Any, k: int) -> torch.Tensor:
        """The pooled features (batch, num_features) from a :meth:`prefix` output."""

    def point_at_most(self, k: int) -> int:
        """The deepest split point ``<= k`` (0: none; run the whole model)."""
        return max((p for p in self.points if p <= k), default=0)


@dataclass
class Backbone:
    """A built backbone with a fresh head for the target classes.

    Attributes:
        name: ``family:model``.
        weights: where the weights came from (``pretrained``, ``packaged``,
            ``none`` or a path).
        model: the whole classifier; ``model(x)`` returns logits.
        blocks: the trunk as ordered blocks (stem first, head excluded), each a
            list of parameter names of ``model``. Freeze depth k freezes the
            parameters of the first k blocks. Every trunk parameter is in exactly
            one block; head parameters are in none.
        head: parameter names of the classification head.
        features: ``features(model, x)`` returns the pooled pre-logit features
            (batch, num_features), used by the ``distill`` and ``source``
            retention losses.
        classify: ``classify(model, features)`` returns the logits, so that
            ``classify(model, features(model, x)) == model(x)`` in eval mode.
        num_features: width of those features.
        preprocessing: mean/std (and interpolation) the weights expect, or for
            a text backbone its tokenizer and max length.
        plugin: the plugin (module) that built it, for error reports.
        modality: ``image`` (``model(x)`` takes a float NCHW batch) or ``text``
            (``model(input_ids, attention_mask)``, both (batch, length) int64;
            a batch is the dict of the two, see :mod:`autotransfer.data.batches`).
        split: how to run the first k blocks and the rest apart
            (:class:`SplitForward`), or None when the family cannot.
    """

    name: str
    weights: str
    model: nn.Module
    blocks: list[list[str]]
    head: list[str]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    classify: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    num_features: int
    preprocessing: Preprocessing | TextPreprocessing
    plugin: str = ""
    extra: dict[str, object] = field(default_factory=dict)
    modality: str = "image"
    split: SplitForward | None = None


class BackboneFamily(abc.ABC):
    """A family of backbones (timm, torchvision, hf, or a plugin's own).

    Subclasses set ``name`` and ``modality`` and implement :meth:`list_models`
    and :meth:`build`. A family is instantiated once per process.
    """

    name: ClassVar[str]
    """The ``family`` prefix in ``family:model`` (e.g. ``timm``)."""
    modality: ClassVar[str] = "image"
    """``image``, ``text``, or ``image+text`` for a family that builds both (each
    built :class:`Backbone` then says which in its own ``modality``)."""
    weights_sources: ClassVar[tuple[str, ...]] = ("pretrained", "none")
    """Named weight sources besides local paths."""

    @abc.abstractmethod
    def list_models(self, pattern: str | None = None) -> list[str]:
        """Model names this family can build, optionally filtered by a glob."""

    @abc.abstractmethod
    def build(self, model: str, *, weights: str, num_classes: int, image_size: int) -> Backbone:
        """Build ``model`` with ``weights`` and a new head of ``num_classes``.

        ``image_size`` is the study's image side; text backbones ignore it (the
        study's ``data.max_length`` is applied to their preprocessing after the
        build).

        Raises:
            autotransfer.exceptions.BackboneError: unknown model or weights that
                cannot be had (say which, and what to use instead).
        """
