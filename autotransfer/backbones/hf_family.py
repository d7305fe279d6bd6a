"""The ``hf`` backbone family: Hugging Face ``transformers`` image models.

``hf:<repo id or local dir>``, loaded with ``AutoConfig`` / ``AutoModel`` (the
base model, without its head) under a new linear head. Registered through the
``autotransfer`` entry-point group, exactly like a third-party plugin.

Weights:

- ``pretrained``: a local model directory loads from that directory, offline;
  a repo id downloads from the hub.
- ``none``: the configuration only (from the directory or the hub), random init.
- a local directory (``hf:google/vit-base-patch16-224@/models/vit``): a
  ``save_pretrained`` directory with config and weights, loaded offline.
- a local weights file (``.safetensors``/``.pth``): the configuration from the
  model name, the weights from the file.

Blocks: the embeddings (stem), each encoder layer or stage, then what follows
the encoder (final layer norm, pooler). Features: the CLS token for ViT-style
models, else the model's pooled output (ConvNeXt, Swin, ResNet) or the mean of
the last hidden state. Preprocessing: ``image_mean``/``image_std`` of the
directory's (or the repo's) ``preprocessor_config.json``, else ImageNet's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from autotransfer.backbones._base import Backbone, BackboneFamily, Preprocessing
from autotransfer.backbones._util import blocks_from_paths, expand, param_names
from autotransfer.exceptions import BackboneError
from autotransfer.hookspecs import hookimpl
from autotransfer.weights import SAFE_SUFFIXES, TORCH_SUFFIXES, load_state_dict_file

IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CLS_TOKEN_TYPES = frozenset({"vit", "deit", "vit_msn"})
"""Model types classified from the CLS token (built without their pooler)."""
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
PREPROCESSOR_FILE = "preprocessor_config.json"


class HFImageClassifier(nn.Module):
    """A ``transformers`` base model, pooled, under a linear head."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, cls_token: bool):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(num_features, num_classes)
        self.cls_token = cls_token

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token:
            out = self.backbone(pixel_values=x, interpolate_pos_encoding=True)
            return out.last_hidden_state[:, 0]
        out = self.backbone(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        h = out.last_hidden_state
        return h.mean(1) if h.dim() == 3 else h.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)


def _classify(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return model.classifier(features)


def _require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise BackboneError(
            "the hf backbone family needs the PyPI package 'transformers'; pip install transformers"
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No load report (the dropped pooler is expected) and no progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _preprocessing(source: str, local: bool) -> Preprocessing:
    path: Path | None = Path(source).expanduser() / PREPROCESSOR_FILE if local else None
    if not local:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, PREPROCESSOR_FILE))
        except Exception:  # no file in the repo, or offline: ImageNet defaults
            path = None
    if path is None or not path.is_file():
        return IMAGENET
    cfg = json.loads(path.read_text())
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        return IMAGENET
    return Preprocessing(
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        interpolation=RESAMPLE.get(cfg.get("resample"), "bilinear"),
    )


def _num_features(config: object) -> int:
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    size = getattr(config, "hidden_size", None)
    if size:
        return int(size)
    raise BackboneError(f"cannot tell the feature width of a '{config.model_type}' model")  # type: ignore[attr-defined]


def _blocks(net: HFImageClassifier, head: set[str]) -> list[list[str]]:
    paths: list[str] = []
    for path in expand(net.backbone, "backbone", depth=1):  # splits a ``layers`` list
        if path == "backbone.encoder":  # ``encoder.layer`` / ``encoder.stages``
            paths.extend(expand(net.backbone.encoder, path, depth=2))
        else:
            paths.append(path)
    return blocks_from_paths(net, paths, head)


class HFFamily(BackboneFamily):
    name = "hf"
    modality = "image"
    weights_sources = ("pretrained", "none")

    def list_models(self, pattern: str | None = None) -> list[str]:
        """The hub is open-ended: any repo id or local directory; nothing to list."""
        return []

    def build(
        self,
        model: str,
        *,
        weights: str,
        num_classes: int,
        image_size: int,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> Backbone:
        """Build an hf image model. Remote code stays off unless the spec sets
        ``trust_remote_code`` with a pinned commit ``revision`` (checked there)."""
        _require_transformers()
        from transformers import AutoConfig, AutoModel

        ref = f"hf:{model}"
        model_dir = Path(model).expanduser()
        weights_path = Path(weights).expanduser() if weights not in ("pretrained", "none") else None
        if weights == "packaged":
            raise BackboneError(
                f"no packaged weights for {ref}; use 'pretrained', 'none' or a local dir"
            )
        if weights_path is not None and not weights_path.exists():
            raise BackboneError(
                f"weights '{weights}' not found; use 'pretrained', 'none', a local model "
                "directory (save_pretrained) or a weights file"
            )
        if weights_path is not None and weights_path.is_dir():
            source, local = str(weights_path), True
        elif model_dir.is_dir():
            source, local = str(model_dir), True
        elif model.startswith(("/", ".", "~")):
            raise BackboneError(f"model directory '{model}' not found")
        else:
            source, local = model, False
        hub: dict[str, object] = {"trust_remote_code": trust_remote_code}
        if revision is not None and not local:
            hub["revision"] = revision
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=local, **hub)
        except Exception as exc:
            raise BackboneError(self._unreachable(ref, source, local, exc)) from exc
        if not hasattr(config, "num_channels"):
            raise BackboneError(
                f"{ref} is a '{config.model_type}' model; the hf family builds image models "
                "(ViT, ConvNeXt, Swin, ResNet, ...) for now"
            )
        cls_token = config.model_type in CLS_TOKEN_TYPES
        kwargs: dict[str, object] = {"add_pooling_layer": False} if cls_token else {}
        from_files = weights == "pretrained" or (weights_path is not None and weights_path.is_dir())
        try:
            with _quiet():
                if from_files:
                    base = AutoModel.from_pretrained(
                        source, local_files_only=local, **hub, **kwargs
                    )
                else:
                    base = AutoModel.from_config(
                        config, trust_remote_code=trust_remote_code, **kwargs
                    )
        except Exception as exc:
            raise BackboneError(self._unreachable(ref, source, local, exc)) from exc
        if weights_path is not None and weights_path.is_file():
            self._load_file(base, weights_path, ref)
        net = HFImageClassifier(base, _num_features(base.config), num_classes, cls_token)
        head = param_names(net, "classifier")
        return Backbone(
            name=ref,
            weights=weights,
            model=net,
            blocks=_blocks(net, set(head)),
            head=head,
            features=_features,
            classify=_classify,
            num_features=net.classifier.in_features,
            preprocessing=_preprocessing(source, local),
            plugin=__name__,
            extra={"original_head": None, "model_type": config.model_type},
        )

    @staticmethod
    def _unreachable(ref: str, source: str, local: bool, exc: Exception) -> str:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if local:
            return f"cannot load {ref} from '{source}' ({type(exc).__name__}: {first})"
        return (
            f"could not load {ref} from the Hugging Face hub ({type(exc).__name__}); "
            f"offline, save the model with save_pretrained elsewhere and use "
            f"hf:{source}@/path/to/model-dir"
        )

    @staticmethod
    def _load_file(base: nn.Module, path: Path, ref: str) -> None:
        if path.suffix not in SAFE_SUFFIXES + TORCH_SUFFIXES:
            raise BackboneError(f"weights file '{path}' has an unknown suffix; use .safetensors")
        state = load_state_dict_file(path)
        prefix = getattr(base, "base_model_prefix", "") + "."
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        own = base.state_dict()
        state = {k: v for k, v in state.items() if k in own}
        missing = [k for k in own if k not in state]
        if missing or not state:
            raise BackboneError(
                f"weights '{path}' do not fit {ref}: {len(missing)} missing tensors"
                + (f" (first: {missing[0]})" if missing else "")
            )
        base.load_state_dict(state)


@hookimpl
def autotransfer_register_backbone_families() -> list[type[BackboneFamily]]:
    return [HFFamily]
