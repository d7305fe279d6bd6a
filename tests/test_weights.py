"""Weight files are loaded without running code: safetensors, or weights_only."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from autotransfer.backbones.weights import load_state_dict_file
from autotransfer.exceptions import BackboneError


class _WritesFile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # noqa: D105 - the payload a malicious checkpoint would carry
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with evil.open("wb") as f:
        pickle.dump({"w": _WritesFile(str(marker))}, f)
    with pytest.raises(BackboneError, match="weights_only=True"):
        load_state_dict_file(evil)
    assert not marker.exists()


def test_safetensors_and_torch_state_dicts_load(tmp_path: Path) -> None:
    state = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = load_state_dict_file(tmp_path / name)
        assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], state["a"])


def test_missing_or_unknown_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="not found"):
        load_state_dict_file(tmp_path / "nope.safetensors")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(BackboneError, match="unknown suffix"):
        load_state_dict_file(tmp_path / "w.txt")
