"""Split forwards the built-in families declare (:class:`SplitForward`).

- :class:`WholeTrunk`: one point, every block: the prefix is the pooled
  features themselves (a linear probe). Any backbone has it.
- :class:`Steps`: the trunk's forward written out as steps (module calls and
  parameter-free glue), each reading the parameters under its paths. A step
  boundary is a split point ``k`` when the parameters read so far are exactly
  those of ``blocks[:k]``, so a step list that does not match a model's blocks
  only offers fewer points, never a wrong one.
- :class:`EncoderLayers`: a ``transformers`` encoder split before an encoder
  layer: the prefix stops at that layer's input; the suffix runs the model with
  the earlier layers left out and that input put in, so whatever the model does
  with the attention mask (the extended or SDPA mask) is done as in the whole
  forward.

The op classes are small and picklable (a built backbone is deep-copied).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autotransfer.backbones._base import SplitForward


@dataclass(frozen=True)
class Module:
    """``model.get_submodule(path)(h)``."""

    path: str

    def __call__(self, model: nn.Module, h: Any) -> Any:
        return model.get_submodule(self.path)(h)


@dataclass(frozen=True)
class Method:
    """``getattr(model, name)(h, **kwargs)``."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self, model: nn.Module, h: Any) -> Any:
        return getattr(model, self.name)(h, **dict(self.kwargs))


@dataclass(frozen=True)
class Pool:
    """Global average pooling then flatten (torchvision's ``avgpool`` + ``flatten``)."""

    def __call__(self, model: nn.Module, h: Any) -> Any:
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)


@dataclass(frozen=True)
class AllButLast:
    """The children of the Sequential at ``path`` but its last (a head's hidden
    layers before its final Linear)."""

    path: str

    def __call__(self, model: nn.Module, h: Any) -> Any:
        for layer in list(model.get_submodule(self.path).children())[:-1]:
            h = layer(h)
        return h


@dataclass(frozen=True)
class Step:
    """Ops applied in order; ``reads``: the module/parameter paths whose
    parameters they use (glue steps read none)."""

    reads: tuple[str, ...]
    ops: tuple[Any, ...]


class WholeTrunk(SplitForward):
    """One split point, after every block: prefix = ``features(model, x)``."""

    def __init__(self, features: Any, n_blocks: int) -> None:
        self.features = features
        self.points = (n_blocks,) if n_blocks else ()

    def prefix(self, model: nn.Module, x: Any, k: int) -> Any:
        _check(k, self.points)
        return self.features(model, x)

    def suffix(self, model: nn.Module, state: Any, k: int) -> torch.Tensor:
        _check(k, self.points)
        return state


class Steps(SplitForward):
    """A trunk written out as :class:`Step` s (see the module docstring)."""

    def __init__(self, model: nn.Module, blocks: list[list[str]], steps: Sequence[Step]) -> None:
        self.steps = tuple(steps)
        names = [n for block in blocks for n in block]  # the head is read by none
        done: set[str] = set()
        prefixes: list[frozenset[str]] = []
        acc: set[str] = set()
        for block in blocks:
            acc |= set(block)
            prefixes.append(frozenset(acc))
        self._cut: dict[int, int] = {}  # point k -> number of steps its prefix runs
        for i, step in enumerate(self.steps):
            for path in step.reads:
                done |= {n for n in names if n == path or n.startswith(path + ".")}
            for k, want in enumerate(prefixes, start=1):
                if done == want:
                    self._cut[k] = i + 1  # the last boundary wins: glue joins the prefix
        self.points = tuple(sorted(self._cut))

    def prefix(self, model: nn.Module, x: Any, k: int) -> Any:
        _check(k, self.points)
        return self._run(model, x, self.steps[: self._cut[k]])

    def suffix(self, model: nn.Module, state: Any, k: int) -> torch.Tensor:
        _check(k, self.points)
        return self._run(model, state, self.steps[self._cut[k] :])

    @staticmethod
    def _run(model: nn.Module, h: Any, steps: Sequence[Step]) -> Any:
        for step in steps:
            for op in step.ops:
                h = op(model, h)
        return h


class _Stop(Exception):
    def __init__(self, value: Any) -> None:
        self.value = value


@dataclass
class EncoderLayers(SplitForward):
    """A ``transformers`` encoder split before layer ``k - 1`` (``blocks[0]`` the
    embeddings, ``blocks[1:L+1]`` the layers of ``layers_path``), plus the
    whole trunk. ``features(model, batch)`` runs the model; a text batch is the
    dict ``input_ids``/``attention_mask``, an image batch a tensor.

    The prefix state is ``{"hidden": ..., "attention_mask": ...}`` (text) or
    ``{"hidden": ..., "pixels": ...}`` with a zero image of the batch's shape
    (images); the suffix feeds that to the model with ``layers[:k-1]`` removed
    and ``hidden`` put in as layer ``k - 1``'s input (the embeddings run on the
    dummy ids or pixels and are thrown away: cheap next to the layers skipped).
    """

    features: Any
    layers_path: str
    n_layers: int
    n_blocks: int
    points: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.points = tuple(range(1, self.n_layers + 1)) + (self.n_blocks,)

    def prefix(self, model: nn.Module, x: Any, k: int) -> Any:
        _check(k, self.points)
        if k == self.n_blocks:
            return self.features(model, x)
        layer = model.get_submodule(self.layers_path)[k - 1]

        def stop(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _Stop(args[0] if args else kwargs["hidden_states"])

        handle = layer.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.features(model, x)
        except _Stop as got:
            hidden = got.value
        else:  # pragma: no cover - the layer is always called
            raise RuntimeError(f"{self.layers_path}.{k - 1} was not called")
        finally:
            handle.remove()
        if isinstance(x, dict):
            return {"hidden": hidden, "attention_mask": x["attention_mask"]}
        return {"hidden": hidden, "pixels": torch.zeros_like(x)}

    def suffix(self, model: nn.Module, state: Any, k: int) -> torch.Tensor:
        _check(k, self.points)
        if k == self.n_blocks:
            return state
        parent_path, _, attr = self.layers_path.rpartition(".")
        parent = model.get_submodule(parent_path)
        layers = getattr(parent, attr)
        hidden = state["hidden"]

        def put(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handle = layers[k - 1].register_forward_pre_hook(put, with_kwargs=True)
        # nn.Module.__setattr__ keeps the registered child; restored in finally.
        parent._modules[attr] = nn.ModuleList(list(layers)[k - 1 :])
        try:
            if "attention_mask" in state:
                mask = state["attention_mask"]
                ids = torch.zeros_like(mask)
                return self.features(model, {"input_ids": ids, "attention_mask": mask})
            return self.features(model, state["pixels"])
        finally:
            parent._modules[attr] = layers
            handle.remove()


def steps_or_whole(
    model: nn.Module, blocks: list[list[str]], steps: Sequence[Step] | None, features: Any
) -> SplitForward:
    """:class:`Steps` when ``steps`` reach every block, else :class:`WholeTrunk`."""
    if steps is not None:
        split = Steps(model, blocks, steps)
        if len(blocks) in split.points:
            return split
    return WholeTrunk(features, len(blocks))


def _check(k: int, points: tuple[int, ...]) -> None:
    if k not in points:
        raise ValueError(f"no split point at {k} blocks; points: {list(points)}")
