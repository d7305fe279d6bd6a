"""The feature cache: a trial's frozen prefix computed once, reused after.

A trial frozen at depth k runs the backbone's first ``j <= k`` blocks (the
deepest split point, :class:`autotransfer.backbones.SplitForward`) on every
image of a split. Those outputs depend only on the frozen weights, the input
and its preprocessing, so a worker keeps them (one tensor per split and view)
and every later epoch, and every later trial with the same key, starts from
them instead of from pixels.

Keys (:class:`CacheKey`) hold the backbone, a fingerprint of the prefix's own
parameters and buffers (so a different weights file, random init or depth never
hits another's entry), the split point, the preprocessing, the data set and
image size, and the view: ``eval`` for validation inputs, or training view v of
the augmentation (its seed and spec included).

Memory: entries live where the trunk ran (CPU or GPU) and their total stays
within a budget (``train.feature_cache``: a size in GiB, or half the free
memory); the least recently used entries are evicted first. An entry that would
not fit, or whose allocation fails, is not stored: the trial then computes its
prefix per batch, as without the cache (never an out-of-memory error caused by
the cache).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

GIB = 1024**3
AUTO_SHARE = 0.5
"""``feature_cache: true`` allows this share of the memory free when the cache starts."""
HEADROOM = 0.1
"""An entry is stored only while this share of the device's memory stays free after it."""


@dataclass(frozen=True)
class CacheKey:
    """What one cached tensor depends on (see the module docstring)."""

    backbone: str
    weights: str
    prefix_sha256: str
    point: int
    preprocessing: str
    data: str
    split: str
    view: str


def prefix_fingerprint(model: nn.Module, blocks: list[list[str]], point: int) -> str:
    """sha256 of the parameters of ``blocks[:point]`` and the buffers of the
    modules that own them (BatchNorm statistics), names and shapes included."""
    names = {n for block in blocks[:point] for n in block}
    owners = {n.rpartition(".")[0] for n in names}
    h = hashlib.sha256()
    tensors = [(n, p) for n, p in model.named_parameters() if n in names]
    tensors += [(n, b) for n, b in model.named_buffers() if n.rpartition(".")[0] in owners]
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def free_memory_bytes(device: torch.device) -> int:
    """Memory free now on ``device`` (the GPU's free memory, or the host's
    available memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def total_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    import os

    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class FeatureCache:
    """Per-worker LRU store of prefix outputs within a byte budget.

    Args:
        budget_gib: the budget in GiB; None: :data:`AUTO_SHARE` of the free
            memory of the device of the first entry.
    """

    def __init__(self, budget_gib: float | None = None) -> None:
        self.budget = int(budget_gib * GIB) if budget_gib is not None else None
        self._entries: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.refused = 0

    @property
    def bytes(self) -> int:
        return sum(_nbytes(t) for t in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def get(self, key: CacheKey) -> torch.Tensor | None:
        """The entry (now the most recently used), or None."""
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def _budget(self, device: torch.device) -> int:
        if self.budget is None:
            self.budget = int(AUTO_SHARE * free_memory_bytes(device))
        return self.budget

    def reserve(self, nbytes: int, device: torch.device) -> bool:
        """Make room for ``nbytes`` more, evicting least recently used entries;
        False when it cannot fit the budget or the device's free memory."""
        budget = self._budget(device)
        if nbytes > budget:
            self.refused += 1
            return False
        while self._entries and self.bytes + nbytes > budget:
            self._entries.popitem(last=False)
            self.evictions += 1
        if free_memory_bytes(device) - nbytes < HEADROOM * total_memory_bytes(device):
            self.refused += 1
            return False
        return True

    def put(self, key: CacheKey, value: torch.Tensor) -> bool:
        """Store ``value`` (after :meth:`reserve`); False if it does not fit."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        if not self.reserve(_nbytes(value), value.device):
            return False
        self._entries[key] = value
        return True

    def get_or_compute(
        self, key: CacheKey, n: int, batches: Callable[[], Iterator[tuple[slice, torch.Tensor]]]
    ) -> torch.Tensor | None:
        """The entry for ``key``, computing it when missing from ``batches()``:
        ``(rows, prefix output)`` pairs covering rows ``0..n``. None when it does
        not fit (nothing is kept; the caller computes per batch)."""
        found = self.get(key)
        if found is not None:
            return found
        out: torch.Tensor | None = None
        for rows, state in batches():
            if out is None:
                nbytes = n * _nbytes(state[:1])
                if not self.reserve(nbytes, state.device):
                    return None
                try:
                    out = torch.empty((n, *state.shape[1:]), dtype=state.dtype,
                                      device=state.device)
                except (torch.OutOfMemoryError, MemoryError, RuntimeError):
                    self.refused += 1
                    return None
            out[rows] = state
        if out is None:
            return None
        self._entries[key] = out
        return out

    def clear(self) -> None:
        self._entries.clear()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
