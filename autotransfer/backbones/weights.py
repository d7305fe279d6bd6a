"""Loading weight files safely: safetensors, or torch files with weights_only."""

from __future__ import annotations

from pathlib import Path

import torch

from autotransfer.exceptions import BackboneError

SAFE_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file.

    Torch files are read with ``weights_only=True`` and no fallback: a file that
    needs arbitrary code to unpickle is refused.

    Raises:
        BackboneError: the file is missing, of an unknown kind or not a state dict.
    """
    path = path.expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in SAFE_SUFFIXES + TORCH_SUFFIXES)
        if not found:
            raise BackboneError(f"no weights file (*.safetensors, *.pth) in directory '{path}'")
        path = found[0]
    if not path.is_file():
        raise BackboneError(
            f"weights '{path}' not found; use 'pretrained', 'packaged', 'none' or an existing file"
        )
    if path.suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in TORCH_SUFFIXES:
        raise BackboneError(
            f"weights file '{path}' has an unknown suffix; use .safetensors or .pth"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(
            f"weights file '{path}' cannot be loaded safely (weights_only=True): {exc}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"weights file '{path}' does not hold a state dict of tensors")
    return state
