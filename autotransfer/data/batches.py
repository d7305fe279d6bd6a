"""Model inputs from a data set: one batch of images or of texts.

An image batch is a float tensor (N, 3, S, S), normalised (and augmented when
training). A text batch is a dict ``{"input_ids", "attention_mask"}`` of int64
tensors (N, L), padded to the longest text of the batch (not to the max length),
from token ids computed once per tokenizer (:meth:`autotransfer.data.datasets.TextSet.encoded`).
Callers use :func:`forward` and :func:`take` and never look inside a batch.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from autotransfer.backbones import Backbone, TextPreprocessing
from autotransfer.data.augment import augment, normalise
from autotransfer.data.datasets import Dataset, TextSet
from autotransfer.data.placement import to_device
from autotransfer.spec.model import AugmentSpec, DataSpec

Batch = torch.Tensor | dict[str, torch.Tensor]


def make_batch(
    data: Dataset,
    idx: torch.Tensor | slice,
    backbone: Backbone,
    augment_spec: AugmentSpec | None = None,
    generator: torch.Generator | None = None,
    draws: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> Batch:
    """The inputs of ``data[idx]`` for ``backbone`` on ``device`` (default: where
    the data is); images are augmented when ``augment_spec`` and ``generator``
    or ``draws`` (the batch's rows of an
    :func:`~autotransfer.data.augment.augmentation_plan`) are given (training),
    texts never are. Images are normalised and augmented on the device
    (:mod:`autotransfer.data.placement` moves them)."""
    pre = backbone.preprocessing
    if isinstance(data, TextSet):
        if not isinstance(pre, TextPreprocessing):
            raise TypeError(f"{backbone.name} is an image backbone; it cannot read texts")
        ids = data.encoded(pre)
        rows = range(len(data))[idx] if isinstance(idx, slice) else idx.tolist()
        batch = pad([ids[i] for i in rows], pre.pad_token_id)
        return batch if device is None else {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(pre, TextPreprocessing):
        raise TypeError(f"{backbone.name} is a text backbone; it cannot read images")
    images = data.take(idx)
    if device is not None:
        images = to_device(images, device)
        draws = None if draws is None else to_device(draws, device)
    x = normalise(images, pre)
    if augment_spec is not None and (generator is not None or draws is not None):
        x = augment(x, augment_spec, generator, draws)
    return x


def pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token id lists -> ``input_ids`` and ``attention_mask`` (N, longest)."""
    length = max((len(s) for s in sequences), default=1)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def forward(model: nn.Module, x: Batch) -> torch.Tensor:
    """``model(x)`` for an image batch, ``model(**x)`` for a text batch."""
    return model(**x) if isinstance(x, dict) else model(x)


def take(x: Batch, index: slice) -> Batch:
    """Rows ``index`` of a batch (a micro-batch)."""
    if isinstance(x, dict):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def fit_to_data(backbone: Backbone, data: DataSpec) -> Backbone:
    """Apply the study's ``data.max_length`` to a text backbone (the lower of it and
    the model's own limit); image backbones are returned unchanged."""
    pre = backbone.preprocessing
    if isinstance(pre, TextPreprocessing) and data.max_length < pre.max_length:
        backbone.preprocessing = dataclasses.replace(pre, max_length=data.max_length)
    return backbone
