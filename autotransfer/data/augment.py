"""Batch preprocessing on tensors: random resized crop, flip, normalise.

Done once per batch (not per sample) on whatever device the batch is on, so the
same code feeds a CPU trial and a GPU one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autotransfer.backbones import Preprocessing
from autotransfer.spec.model import AugmentSpec

_STATS: dict[tuple[tuple[float, ...], tuple[float, ...], torch.device],
             tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(pre: Preprocessing, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``pre``'s mean and std as (1, 3, 1, 1) tensors on ``device``, made once:
    building them per batch would copy them to a GPU, and wait, every batch."""
    key = (tuple(pre.mean), tuple(pre.std), device)
    found = _STATS.get(key)
    if found is None:
        found = _STATS[key] = (
            torch.tensor(pre.mean, device=device).view(1, 3, 1, 1),
            torch.tensor(pre.std, device=device).view(1, 3, 1, 1),
        )
    return found


def normalise(images: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, scaled to [0, 1] and normalised by mean/std."""
    mean, std = _mean_std(pre, images.device)
    return (images.float().div_(255.0) - mean) / std


DRAWS = 5
"""Uniform numbers one image's augmentation takes (area, ratio, x, y, flip)."""


def is_identity(spec: AugmentSpec) -> bool:
    """Whether ``spec`` leaves images unchanged (no crop, no flip)."""
    return spec.crop_scale == (1.0, 1.0) and not spec.flip


def augmentation_plan(n: int, seed: int, view: int) -> torch.Tensor:
    """The uniform draws (n, :data:`DRAWS`) of augmented view ``view`` of ``n``
    images: the same for every trial with the same seed, so a view's features can
    be computed once (the feature cache) and match an uncached epoch's."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(view)) % 2**63)
    return torch.rand((n, DRAWS), generator=g)


def augment(
    x: torch.Tensor,
    spec: AugmentSpec,
    generator: torch.Generator | None = None,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random resized crop (area in ``spec.crop_scale``, aspect ratio 3/4..4/3)
    and optional horizontal flip, per sample, as one ``grid_sample`` call. The
    randomness: ``draws`` (n, :data:`DRAWS`) uniforms (a slice of
    :func:`augmentation_plan`), or drawn from ``generator``."""
    n = x.shape[0]
    lo, hi = spec.crop_scale
    if is_identity(spec):
        return x
    if draws is None:
        assert generator is not None, "augment needs a generator or draws"
        draws = torch.rand((n, DRAWS), generator=generator)
    u = draws.to(x.device)
    area = lo + (hi - lo) * u[:, 0]
    log_ratio = (u[:, 1] * 2 - 1) * torch.log(torch.tensor(4 / 3))
    ratio = torch.exp(log_ratio.to(x.device))
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (1 - sx) * (u[:, 2] * 2 - 1)
    ty = (1 - sy) * (u[:, 3] * 2 - 1)
    flip = torch.where((u[:, 4] < 0.5) & spec.flip, -1.0, 1.0)
    theta = torch.zeros((n, 2, 3), device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
