"""Moving decoded data and batches to the device a trial trains on.

The one place that decides where a worker's decoded data lives:

- :func:`place_dataset`: an image set's uint8 tensor moves to the device once
  per worker when it fits within a memory budget (then every batch is gathered,
  normalised and augmented there, with no host copy per batch); otherwise it
  stays on the host as it is (the shared, mapped decoded file: not copied per
  worker).
- :func:`to_device`: a batch (or labels) to the device; bound for a GPU it goes
  through pinned memory and the copy is non-blocking, so it overlaps the
  previous step's work.

On the CPU both return their input unchanged.
"""

from __future__ import annotations

import torch

from autotransfer.data.datasets import Dataset, ImageSet


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for a GPU goes through pinned
    memory with a non-blocking copy."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def nbytes(data: Dataset) -> int:
    """Bytes of a data set's decoded images (0 for texts)."""
    if isinstance(data, ImageSet):  # counted from the store: a subset is not gathered
        return len(data) * data.store[:1].numel() * data.store.element_size()
    return 0


def place_dataset(data: Dataset, device: torch.device, budget: int) -> Dataset:
    """``data`` with its images (and labels) on ``device`` if they take at most
    ``budget`` bytes; else left on the host, where each batch is gathered and
    pinned on its way (:func:`to_device`): the whole set is not copied into
    pinned memory, so workers keep sharing the mapped decoded file
    (:mod:`autotransfer.data.decoded`) and a set larger than memory still
    streams from it. Texts are tokenized per batch and stay where they are
    (their ids are small)."""
    if device.type == "cpu" or not isinstance(data, ImageSet):
        return data
    if nbytes(data) <= budget:
        return ImageSet(data.images.to(device), data.labels.to(device), data.classes)
    return data
