"""Freeze depth: freeze the first k of a backbone's ordered blocks.

The search samples a fraction f in [0, 1]; ``k = round(f * n_blocks)`` so the
same parameter means the same thing for every backbone.
"""

from __future__ import annotations

import math

from torch import nn


def freeze_depth(fraction: float, n_blocks: int) -> int:
    """Blocks to freeze for ``fraction`` of ``n_blocks`` (half rounds up)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"freeze fraction must lie in [0, 1], got {fraction}")
    return min(n_blocks, math.floor(fraction * n_blocks + 0.5))


def freeze(model: nn.Module, blocks: list[list[str]], k: int) -> list[nn.Module]:
    """Turn off gradients for the parameters of ``blocks[:k]``.

    Returns:
        The normalisation modules whose parameters are all frozen: they must
        stay in eval mode (running statistics unchanged) while training; call
        :func:`train_mode` instead of ``model.train()``.
    """
    frozen = {name for block in blocks[:k] for name in block}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    norms = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._NormBase):
            continue
        names = [f"{mod_name}.{n}" for n, _ in module.named_parameters(recurse=False)]
        if names and all(n in frozen for n in names):
            norms.append(module)
    return norms


def train_mode(model: nn.Module, frozen_norms: list[nn.Module]) -> None:
    """``model.train()``, except frozen normalisation layers stay in eval mode."""
    model.train()
    for m in frozen_norms:
        m.eval()
