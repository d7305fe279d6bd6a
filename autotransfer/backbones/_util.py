"""Helpers shared by the built-in families: head lookup, blocks from module paths."""

from __future__ import annotations

import torch
from torch import nn


class _Captured(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class HeadInput:
    """``features(model, x)``: the input of the head module at ``head_path``.

    Runs ``model(x)`` and stops at the head (a forward pre-hook), so the features
    are exactly what the head sees: ``head(features(model, x)) == model(x)`` when
    the head is the last operation. A class rather than a closure so that a
    :class:`~autotransfer.backbones.Backbone` can be deep-copied and pickled.
    """

    def __init__(self, head_path: str) -> None:
        self.head_path = head_path

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        head = model.get_submodule(self.head_path)

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            raise _Captured(args[0])

        handle = head.register_forward_pre_hook(hook)
        try:
            model(x)
        except _Captured as got:
            return got.value
        finally:
            handle.remove()
        raise RuntimeError(f"the head '{self.head_path}' was not called by the model's forward")


class HeadCall:
    """``classify(model, features)``: the head module at ``head_path`` applied to features."""

    def __init__(self, head_path: str) -> None:
        self.head_path = head_path

    def __call__(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        return model.get_submodule(self.head_path)(features)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def param_names(model: nn.Module, path: str) -> list[str]:
    """Parameter names of ``model`` under the module or parameter ``path``."""
    return [n for n, _ in model.named_parameters() if n == path or n.startswith(path + ".")]


def has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm)


def is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def blocks_from_paths(
    model: nn.Module, paths: list[str], head: set[str], *, first: list[str] = ()
) -> list[list[str]]:
    """Ordered blocks from module paths; loose trunk parameters join the first block.

    A normalisation layer that directly follows a single layer (``conv1``,
    ``bn1``) joins that layer's block. Parameters of ``first`` and any trunk
    parameter under none of ``paths`` (a class token, a position embedding) go to
    the first block; head parameters are in no block.
    """
    blocks: list[list[str]] = []
    prev_leaf = False
    for path in paths:
        module = model.get_submodule(path)
        names = [n for n in param_names(model, path) if n not in head]
        if not names:
            continue
        if blocks and prev_leaf and is_leaf(module) and is_norm(module):
            blocks[-1].extend(names)
        else:
            blocks.append(names)
        prev_leaf = is_leaf(module)
    covered = {n for b in blocks for n in b}
    loose = [n for n, _ in model.named_parameters() if n not in covered and n not in head]
    loose_first = [n for n in first if n in loose] + [n for n in loose if n not in first]
    if loose_first:
        if blocks:
            blocks[0] = loose_first + blocks[0]
        else:
            blocks.append(loose_first)
    return blocks


def expand(module: nn.Module, prefix: str, depth: int) -> list[str]:
    """Child paths of ``module`` that hold parameters, in order.

    A stage (a Sequential/ModuleList/ModuleDict of containers, like ResNet's
    ``layer1``) is split into its blocks, down to ``depth`` levels.
    """
    out: list[str] = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if not has_params(child):
            continue
        param_children = [c for c in child.children() if has_params(c)]
        if (
            depth > 0
            and isinstance(child, nn.Sequential | nn.ModuleList | nn.ModuleDict)
            and len(param_children) >= 2
            and all(not is_leaf(c) for c in param_children)
        ):
            out.extend(expand(child, path, depth - 1))
        else:
            out.append(path)
    return out
