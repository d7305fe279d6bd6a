"""The contract every backbone family fulfils, built-in or third-party."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


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
        preprocessing: mean/std (and interpolation) the weights expect.
        plugin: the plugin (module) that built it, for error reports.
    """

    name: str
    weights: str
    model: nn.Module
    blocks: list[list[str]]
    head: list[str]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    classify: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    num_features: int
    preprocessing: Preprocessing
    plugin: str = ""
    extra: dict[str, object] = field(default_factory=dict)


class BackboneFamily(abc.ABC):
    """A family of backbones (timm, torchvision, hf, or a plugin's own).

    Subclasses set ``name`` and ``modality`` and implement :meth:`list_models`
    and :meth:`build`. A family is instantiated once per process.
    """

    name: ClassVar[str]
    """The ``family`` prefix in ``family:model`` (e.g. ``timm``)."""
    modality: ClassVar[str] = "image"
    """``image`` or ``text``."""
    weights_sources: ClassVar[tuple[str, ...]] = ("pretrained", "none")
    """Named weight sources besides local paths."""

    @abc.abstractmethod
    def list_models(self, pattern: str | None = None) -> list[str]:
        """Model names this family can build, optionally filtered by a glob."""

    @abc.abstractmethod
    def build(self, model: str, *, weights: str, num_classes: int, image_size: int) -> Backbone:
        """Build ``model`` with ``weights`` and a new head of ``num_classes``.

        Raises:
            autotransfer.exceptions.BackboneError: unknown model or weights that
                cannot be had (say which, and what to use instead).
        """
