"""Model inputs from a data set: one batch of images or of texts.

An image batch is a float tensor (N, 3, S, S), normalised (and augmented when
training). A text batch is a dict ``{"input_ids", "attention_mask"}`` of int64
tensors (N, L), padded to the longest text of the batch (not to the max length),
from token ids computed once per tokenizer (:meth:`autotransfer.data.datasets.TextSet.encoded`).
Callers use :func:`forward` and :func:`take` and never look inside a batch.

Padding costs: a batch of texts costs its size times its longest text, so one
long text makes every row of its batch pay for it. :func:`length_groups` splits
a batch's rows into groups of similar length (sorted, cut where the padding
saved pays for another forward pass); training accumulates the groups' gradients
into one optimiser step and evaluation scores each group, so the results are
those of the whole batch, at a fraction of the cost on texts of mixed lengths.
"""

from __future__ import annotations

import dataclasses

import numpy as np
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


CPU_GROUP_OVERHEAD_TOKENS = 128
"""What one more forward and backward pass costs on the CPU, in padded tokens per
thread (torch's intra-op threads): a pass's fixed cost stays while its per-token
cost falls with more threads. Measured with all-MiniLM-L6-v2 on 2 cores
(bench/text_groups.py, results/text_groups.*): the best cost was 128-256 at one
thread and about 256-512 at two."""
ACCELERATOR_GROUP_OVERHEAD_TOKENS = 2048
"""The same on an accelerator, which runs a pass's tokens in parallel and pays
mostly per kernel launch: only long stragglers get their own group there (not
yet measured on a GPU)."""


def group_overhead(device: torch.device | str | None) -> int:
    """The padded-token cost of one more group on ``device`` (default: the CPU)."""
    if device is None or torch.device(device).type == "cpu":
        return CPU_GROUP_OVERHEAD_TOKENS * torch.get_num_threads()
    return ACCELERATOR_GROUP_OVERHEAD_TOKENS


def cheapest_cuts(lengths: list[int], overhead: int) -> list[int]:
    """Where to cut ascending ``lengths`` into groups so that the padded tokens
    (each group's size times its longest) plus ``overhead`` per group are least:
    the end index of every group. Dynamic programming over the prefixes,
    O(n²) in numpy."""
    n = len(lengths)
    if n == 0:
        return []
    longest = np.asarray(lengths, dtype=np.int64)
    best = np.zeros(n + 1, dtype=np.int64)
    back = np.zeros(n + 1, dtype=np.int64)
    starts = np.arange(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        # a last group of rows start..j-1 costs (j - start) * lengths[j-1] + overhead
        costs = best[:j] + (j - starts[:j]) * longest[j - 1] + overhead
        back[j] = int(np.argmin(costs))
        best[j] = costs[back[j]]
    cuts = []
    j = n
    while j > 0:
        cuts.append(j)
        j = int(back[j])
    return cuts[::-1]


def length_groups(
    data: Dataset, idx: torch.Tensor | slice, backbone: Backbone, overhead: int
) -> list[torch.Tensor | slice]:
    """Rows ``idx`` of ``data`` as groups of similar token length (see the module
    docstring), shortest first; ``[idx]`` for images, or when one group is
    cheapest. Every row is in exactly one group."""
    pre = backbone.preprocessing
    if not isinstance(data, TextSet) or not isinstance(pre, TextPreprocessing):
        return [idx]
    rows = torch.arange(len(data))[idx] if isinstance(idx, slice) else idx
    ids = data.encoded(pre)
    lengths = torch.tensor([len(ids[i]) for i in rows.tolist()], dtype=torch.long)
    order = torch.argsort(lengths, stable=True)
    cuts = cheapest_cuts(lengths[order].tolist(), overhead)
    if len(cuts) <= 1:
        return [idx]
    order = order.to(rows.device)
    return [rows[order[a:b]] for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]


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
