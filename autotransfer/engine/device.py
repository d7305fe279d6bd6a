"""Where and how a worker's trials run: device, precision, memory layout.

One :class:`WorkerDevice` per worker process, resolved once from the spec's
``train.device`` and ``train.precision`` and what the machine has
(:class:`Machine`, detected or given by tests); it keeps the worker's decoded
data on the device across trials. For each trial it gives a :class:`Placement`
(the backbone's memory layout and compilation depend on the backbone):
autocast dtype, gradient scaler, channels_last, ``torch.compile``, and giving
memory back after an out-of-memory error.

Resolution (:func:`resolve_device`, :func:`resolve_precision`,
:func:`resolve_channels_last`):

- ``train.device``: ``auto`` is the worker's GPU (``cuda:0``, the one its
  ``CUDA_VISIBLE_DEVICES`` pins) when CUDA is available, else the CPU; ``cuda``
  and ``cuda:N`` need that GPU.
- ``train.precision``: ``auto`` is bf16 autocast on a GPU that supports it,
  fp16 autocast with a gradient scaler on one that does not, fp32 on the CPU;
  ``bf16`` also runs on the CPU (CPU autocast); ``fp16`` needs a GPU.
- ``train.channels_last``: ``auto`` is on for convolutional image backbones on
  a GPU, off elsewhere.
- ``train.compile``: off unless set (no benchmark here shows it pays for
  itself within a trial).

A worker on a GPU also turns on cuDNN autotuning (``cudnn.benchmark``) and TF32
for whatever runs in fp32, as the plain reference loop does. With fp16 the
gradient scaler reads its inf check on the host each step (PyTorch's
``GradScaler.step``); bf16 and fp32 steps never wait for the GPU.

Test-only: the environment variable :data:`SIMULATED_GPUS_ENV` makes
:func:`detect` report that many GPUs (``CUDA_VISIBLE_DEVICES`` narrows them as
on a real machine) while every tensor stays on the CPU, so the multi-GPU worker
logic runs in CI.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autotransfer.backbones import Backbone
from autotransfer.data.datasets import Dataset
from autotransfer.data.placement import place_dataset
from autotransfer.exceptions import SpecError
from autotransfer.spec.model import TrainSpec

SIMULATED_GPUS_ENV = "AUTOTRANSFER_SIMULATED_GPUS"
"""Tests only: pretend this many CUDA GPUs exist; tensors stay on the CPU."""

DATA_MEMORY_FRACTION = 0.25
"""Decoded data moves to a GPU when it takes at most this share of its memory."""

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Machine:
    """What the process can use: CUDA or not, how many GPUs, their names and
    whether they support bf16. ``simulated``: GPUs reported by
    :data:`SIMULATED_GPUS_ENV` (tensors stay on the CPU)."""

    cuda: bool
    count: int = 0
    names: tuple[str, ...] = ()
    bf16: bool = False
    simulated: bool = False
    visible: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES entries, physical ids

    @staticmethod
    def cpu() -> Machine:
        return Machine(cuda=False)


def visible_devices() -> tuple[str, ...] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (None when unset)."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    return tuple(v.strip() for v in raw.split(",") if v.strip())


def detect() -> Machine:
    """The GPUs this process sees (or the simulated ones in tests)."""
    visible = visible_devices()
    simulated = os.environ.get(SIMULATED_GPUS_ENV)
    if simulated:
        count = int(simulated)
        ids = visible if visible is not None else tuple(str(i) for i in range(count))
        ids = tuple(i for i in ids if i.isdigit() and int(i) < count)
        return Machine(
            cuda=bool(ids), count=len(ids), names=tuple("simulated GPU" for _ in ids),
            bf16=True, simulated=True, visible=ids,
        )
    if not torch.cuda.is_available():
        return Machine.cpu()
    count = torch.cuda.device_count()
    names = tuple(torch.cuda.get_device_name(i) for i in range(count))
    ids = visible if visible is not None else tuple(str(i) for i in range(count))
    return Machine(
        cuda=count > 0, count=count, names=names, bf16=torch.cuda.is_bf16_supported(),
        visible=ids[:count],
    )


def resolve_device(setting: str, machine: Machine) -> str:
    """``train.device`` -> ``cpu`` or ``cuda:N``.

    Raises:
        SpecError: a GPU asked for that this process does not have.
    """
    if setting == "cpu" or (setting == "auto" and not machine.cuda):
        return "cpu"
    if setting == "auto":
        return "cuda:0"
    index = 0 if setting == "cuda" else int(setting.split(":", 1)[1])
    if not machine.cuda:
        raise SpecError(
            f"train.device is '{setting}' but this machine has no CUDA GPU (or torch was "
            "built without CUDA); use train.device auto or cpu"
        )
    if index >= machine.count:
        raise SpecError(
            f"train.device is '{setting}' but this process sees {machine.count} GPU(s) "
            f"(cuda:0..cuda:{machine.count - 1}); use one of those or auto"
        )
    return f"cuda:{index}"


def resolve_precision(setting: str, device: str, machine: Machine) -> str:
    """``train.precision`` -> ``fp32``, ``bf16`` or ``fp16`` on ``device``.

    Raises:
        SpecError: fp16 on the CPU, bf16 on a GPU without it.
    """
    on_gpu = device.startswith("cuda")
    if setting == "auto":
        if not on_gpu:
            return "fp32"
        return "bf16" if machine.bf16 else "fp16"
    if setting == "fp16" and not on_gpu:
        raise SpecError(
            "train.precision fp16 needs a GPU (it trains with a gradient scaler there); "
            "on the CPU use bf16 or fp32"
        )
    if setting == "bf16" and on_gpu and not machine.bf16:
        name = machine.names[0] if machine.names else "this GPU"
        raise SpecError(
            f"train.precision bf16: {name} does not support bfloat16; use fp16 or auto"
        )
    return setting


def is_conv_net(model: nn.Module) -> bool:
    """More than one 2-d convolution (a ViT's patch embedding alone does not count)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def resolve_channels_last(setting: str | bool, device: str, backbone: Backbone) -> bool:
    """``train.channels_last`` for ``backbone`` on ``device``: ``auto`` is on
    for convolutional image backbones on a GPU; never for text backbones."""
    if backbone.modality != "image":
        return False
    if setting == "auto":
        return device.startswith("cuda") and is_conv_net(backbone.model)
    return bool(setting)


@dataclass
class Placement:
    """How one trial runs: its device, autocast dtype, gradient scaler,
    memory layout and compilation."""

    device: torch.device
    precision: str
    channels_last: bool
    compile: bool
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: fp32, no autocast)."""
        return PRECISIONS[self.precision]

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for the forward pass and loss (nothing in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 (bf16 and fp32 need none)."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def place_model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (and channels_last), in place."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def place_module(self, module: nn.Module) -> nn.Module:
        """A retention module (source head) to the device."""
        return module.to(self.device)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch already on the device, in the model's memory layout."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def compiled(
        self, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    ) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
        """``fn`` through ``torch.compile`` when ``train.compile`` is on."""
        return torch.compile(fn) if self.compile else fn  # type: ignore[return-value]

    def sync(self) -> None:
        """Wait for the device (for timing)."""
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

    def release(self) -> None:
        """Give cached memory back (after an out-of-memory error or a trial):
        collect garbage, then return the CUDA allocator's cached blocks."""
        gc.collect()
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def reserved(self) -> int:
        """Bytes the CUDA allocator holds on the device (0 on the CPU)."""
        return torch.cuda.memory_reserved(self.device) if self.on_gpu else 0


CPU = Placement(torch.device("cpu"), "fp32", False, False, {"device": "cpu", "precision": "fp32"})
"""The plain CPU placement (trainers built without a worker device)."""


class WorkerDevice:
    """One worker's device, resolved once from ``train``; holds the worker's
    decoded data on that device across trials.

    Raises:
        SpecError: a device or precision this machine cannot give.
    """

    def __init__(self, train: TrainSpec, machine: Machine | None = None) -> None:
        self.machine = machine if machine is not None else detect()
        self.train = train
        self.name = resolve_device(train.device, self.machine)
        self.precision = resolve_precision(train.precision, self.name, self.machine)
        # Simulated GPUs are named like real ones but compute on the CPU.
        on_cuda = self.name.startswith("cuda") and not self.machine.simulated
        self.torch_device = torch.device(self.name if on_cuda else "cpu")
        if on_cuda:
            # Fixed shapes within a trial: let cuDNN pick its fastest convolutions
            # (as the reference loop does); TF32 for whatever runs in fp32.
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._data: dict[int, tuple[Dataset, Dataset]] = {}

    @classmethod
    def for_evaluation(cls, train: TrainSpec) -> WorkerDevice:
        """The device for evaluating a stored model (test metrics, export
        checks): the study's ``train.device`` and precision if this machine has
        them, else ``auto`` (a study trained on a GPU, exported on a laptop)."""
        try:
            return cls(train)
        except SpecError:
            return cls(train.model_copy(update={"device": "auto", "precision": "auto"}))

    @property
    def gpu_index(self) -> int | None:
        return int(self.name.split(":")[1]) if self.name.startswith("cuda") else None

    def describe(self) -> dict[str, Any]:
        """Where trials run, for the trial's ``device`` attribute."""
        out: dict[str, Any] = {"device": self.name, "precision": self.precision}
        index = self.gpu_index
        if index is not None:
            out["gpu"] = self.machine.names[index] if index < len(self.machine.names) else "?"
            if index < len(self.machine.visible):
                out["gpu_id"] = self.machine.visible[index]  # the physical id
            if self.machine.simulated:
                out["simulated"] = True
        return out

    def placement(self, backbone: Backbone) -> Placement:
        """The placement of one trial of ``backbone``."""
        channels_last = resolve_channels_last(self.train.channels_last, self.name, backbone)
        record = {**self.describe(), "channels_last": channels_last}
        if self.train.compile:
            record["compile"] = True
        return Placement(
            self.torch_device, self.precision, channels_last, self.train.compile, record
        )

    def data(self, data: Dataset) -> Dataset:
        """``data`` on this worker's device (moved once, then reused by every
        trial) when it fits within :data:`DATA_MEMORY_FRACTION` of the GPU's
        memory; see :func:`autotransfer.data.placement.place_dataset`."""
        if self.torch_device.type == "cpu":
            return data
        cached = self._data.get(id(data))
        if cached is not None and cached[0] is data:
            return cached[1]
        total = torch.cuda.get_device_properties(self.torch_device).total_memory
        placed_bytes = sum(
            p.images.numel() for _, p in self._data.values() if hasattr(p, "images")
            and p.images.device.type == "cuda"
        )
        budget = int(total * DATA_MEMORY_FRACTION) - placed_bytes
        placed = place_dataset(data, self.torch_device, budget)
        self._data[id(data)] = (data, placed)
        return placed
