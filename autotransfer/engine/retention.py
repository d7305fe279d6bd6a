"""L_pre, the retention term of ``L = alpha * L_pre + (1 - alpha) * L_fine``.

- ``l2sp``: squared distance of the trainable trunk weights from their
  pretrained values (L2-SP). No extra forward pass.
- ``distill``: mean squared distance between the student's pooled features and
  those of the frozen pretrained model on the same batch (LwF / DELTA style);
  a batch of images or of texts (:mod:`autotransfer.data.batches`).
- ``source``: cross-entropy on batches of a source data set through a source
  head (the original head when the source has as many classes, else a new one).
  Images only: the spec refuses it for text data.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from autotransfer.backbones import Backbone
from autotransfer.data.augment import normalise
from autotransfer.data.batches import Batch
from autotransfer.data.datasets import ImageSet
from autotransfer.data.placement import to_device


class Retention:
    """Base: computes L_pre for one training batch."""

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable parameters (e.g. a source head)."""
        return []

    def loss(self, x: Batch, features: torch.Tensor, point: int = 0) -> torch.Tensor:
        """L_pre of a batch: ``x`` is the model's input, or with ``point`` > 0 the
        output of the backbone's first ``point`` (frozen) blocks on it."""
        raise NotImplementedError


class L2SP(Retention):
    def __init__(self, backbone: Backbone) -> None:
        head = set(backbone.head)
        self.params = [
            (p, p.detach().clone())
            for n, p in backbone.model.named_parameters()
            if p.requires_grad and n not in head
        ]

    def loss(self, x: Batch, features: torch.Tensor, point: int = 0) -> torch.Tensor:
        if not self.params:
            return features.new_zeros(())
        return sum((p - p0).pow(2).sum() for p, p0 in self.params)  # type: ignore[return-value]


class Distill(Retention):
    """The teacher is the pretrained model; teacher and student share the frozen
    prefix, so given the prefix's output (``point`` > 0) the teacher runs only
    the blocks after it (:class:`autotransfer.backbones.SplitForward`)."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.teacher = copy.deepcopy(backbone.model).eval().requires_grad_(False)

    def loss(self, x: Batch, features: torch.Tensor, point: int = 0) -> torch.Tensor:
        with torch.no_grad():
            if point:
                assert self.backbone.split is not None
                target = self.backbone.split.suffix(self.teacher, x, point)
            else:
                target = self.backbone.features(self.teacher, x)
        return F.mse_loss(features, target)


class SourceTask(Retention):
    def __init__(
        self,
        backbone: Backbone,
        source: ImageSet,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | None = None,
        channels_last: bool = False,
    ) -> None:
        self.backbone = backbone
        self.channels_last = channels_last
        self.source = source
        n_classes = len(source.classes)
        original = backbone.extra.get("original_head")
        if isinstance(original, nn.Linear) and original.out_features == n_classes:
            self.head: nn.Module = copy.deepcopy(original).requires_grad_(True)
        else:
            self.head = nn.Linear(backbone.num_features, n_classes)
        if device is not None:
            self.head.to(device)
        self.batch_size = batch_size
        self.generator = generator
        self._batches = self._cycle()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def _cycle(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            # Gathered where the source set is (a host index into device tensors
            # is a copy the host waits for).
            order = torch.randperm(len(self.source), generator=self.generator).to(
                self.source.labels.device
            )
            for i in range(0, len(order), self.batch_size):
                idx = order[i : i + self.batch_size]
                yield self.source.take(idx), self.source.labels[idx]

    def loss(self, x: Batch, features: torch.Tensor, point: int = 0) -> torch.Tensor:
        images, labels = next(self._batches)
        device = features.device
        xs = normalise(to_device(images, device), self.backbone.preprocessing)
        if self.channels_last:  # the model's memory layout
            xs = xs.contiguous(memory_format=torch.channels_last)
        logits = self.head(self.backbone.features(self.backbone.model, xs))
        return F.cross_entropy(logits.float(), to_device(labels, device))


def make_retention(
    kind: str,
    backbone: Backbone,
    *,
    source: ImageSet | None,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | None = None,
    channels_last: bool = False,
) -> Retention:
    """The retention term ``kind`` for ``backbone`` (already on its device:
    the L2-SP reference weights and the distill teacher are copies made there;
    the source head moves to ``device``, source images take the model's memory
    layout when ``channels_last``)."""
    if kind == "l2sp":
        return L2SP(backbone)
    if kind == "distill":
        return Distill(backbone)
    if kind == "source":
        assert source is not None, "spec validation guarantees a source set"
        return SourceTask(backbone, source, batch_size, generator, device, channels_last)
    raise ValueError(f"unknown retention '{kind}'")
