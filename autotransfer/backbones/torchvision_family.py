"""The ``torchvision`` backbone family: any classification model in torchvision.

Registered through the ``autotransfer`` entry-point group, exactly like a
third-party plugin. ``pretrained`` is torchvision's own download of the model's
default weights (``Weights.DEFAULT``); ``none`` is random init; anything else is a
local weights file.

Blocks (stem first, head excluded, every trunk parameter exactly once):

- Vision transformers: ``conv_proj`` + ``class_token`` + position embedding as
  the stem, each encoder layer, the final ``ln`` (and ``pre_logits`` if any).
- Models with a ``features`` (or ``layers``) Sequential (MobileNet, EfficientNet,
  ConvNeXt, Swin, DenseNet, VGG, MNASNet): its children, stages split into their
  blocks, then what lies between it and the head (final norm, hidden layers).
- Anything else (ResNet, RegNet, ShuffleNet, GoogLeNet): the model's children in
  order, stages (``layer1``, ``trunk_output``) split into their blocks.

A normalisation layer right after a single layer joins its block (``conv1`` +
``bn1``). The head is the last ``nn.Linear`` of ``heads``/``head``/``fc``/
``classifier``; ``features()`` is that layer's input (pooled pre-logits).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from torch import nn

from autotransfer.backbones._base import Backbone, BackboneFamily, Preprocessing
from autotransfer.backbones._split import AllButLast, Module, Pool, Step, steps_or_whole
from autotransfer.backbones._util import (
    HeadCall,
    HeadInput,
    blocks_from_paths,
    expand,
    has_params,
    param_names,
    set_submodule,
)
from autotransfer.backbones.weights import load_state_dict_file
from autotransfer.exceptions import BackboneError
from autotransfer.hookspecs import hookimpl

IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
HEAD_ATTRS = ("heads", "head", "fc", "classifier")
TRUNK_ATTRS = ("features", "layers")
NO_AUX = ("googlenet", "inception_v3")
"""Models built without auxiliary classifiers (their training output is a tuple)."""


def _default_weights(model: str) -> object | None:
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(model).DEFAULT
    except Exception:  # a model without registered weights
        return None


def _preprocessing(weights_enum: object | None) -> tuple[Preprocessing, dict[str, object]]:
    if weights_enum is None:
        return IMAGENET, {}
    try:
        t = weights_enum.transforms()  # type: ignore[attr-defined]
        pre = Preprocessing(
            mean=tuple(float(v) for v in t.mean),
            std=tuple(float(v) for v in t.std),
            interpolation=getattr(t.interpolation, "value", "bilinear"),
        )
        return pre, {"resize_size": list(t.resize_size), "crop_size": list(t.crop_size)}
    except Exception:  # a preset without mean/std
        return IMAGENET, {}


def _head_path(net: nn.Module) -> str:
    """Path of the classification layer: the last Linear of the head container."""
    for attr in HEAD_ATTRS:
        sub = getattr(net, attr, None)
        if not isinstance(sub, nn.Module):
            continue
        linears = [n for n, m in sub.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            return f"{attr}.{linears[-1]}" if linears[-1] else attr
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    raise BackboneError(f"cannot find the classification layer of {type(net).__name__}")


def _linear_head_squeezenet(net: nn.Module) -> None:
    """SqueezeNet's head is a 1x1 conv then ReLU and pooling: make it pool -> Linear."""
    conv = net.classifier[1]
    dropout = net.classifier[0]
    net.classifier = nn.Sequential(
        dropout,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(conv.in_channels, conv.out_channels),
    )


def _blocks(net: nn.Module, head: set[str]) -> list[list[str]]:
    from torchvision.models import VisionTransformer

    if isinstance(net, VisionTransformer):
        stem = param_names(net, "conv_proj") + ["class_token", "encoder.pos_embedding"]
        paths = ["conv_proj"] + [
            f"encoder.layers.{n}" for n, _ in net.encoder.layers.named_children()
        ]
        paths += ["encoder.ln"] + (["heads.pre_logits"] if hasattr(net.heads, "pre_logits") else [])
        return blocks_from_paths(net, paths, head, first=stem)
    trunk = next((a for a in TRUNK_ATTRS if isinstance(getattr(net, a, None), nn.Sequential)), None)
    if trunk is not None:
        paths: list[str] = []
        for name, child in net.named_children():
            if name == trunk:
                paths.extend(expand(child, name, depth=1))
            elif has_params(child):
                paths.append(name)
    else:
        paths = expand(net, "", depth=2)
    return blocks_from_paths(net, paths, head)


def _steps(net: nn.Module) -> list[Step] | None:
    """Split-forward steps of ResNet, MobileNetV3 and EfficientNet (their
    ``forward`` up to the head's input); other models split only after the
    whole trunk."""
    from torchvision.models import EfficientNet, MobileNetV3, ResNet

    if isinstance(net, ResNet):
        stem = Step(("conv1", "bn1"), tuple(Module(p) for p in ("conv1", "bn1", "relu", "maxpool")))
        layers = [Step((p,), (Module(p),)) for i in range(1, 5)
                  for p in expand(net, "", depth=2) if p.startswith(f"layer{i}.")]
        return [stem, *layers, Step((), (Pool(),))]
    if isinstance(net, MobileNetV3 | EfficientNet):
        trunk = [Step((p,), (Module(p),)) for p in expand(net.features, "features", depth=1)]
        return [*trunk, Step(("classifier",), (Pool(), AllButLast("classifier")))]
    return None


def _load(
    net: nn.Module, state: dict[str, torch.Tensor], head_path: str, ref: str, weights: str
) -> None:
    from torchvision.models import VisionTransformer

    own = net.state_dict()
    if isinstance(net, VisionTransformer) and "encoder.pos_embedding" in state:
        if state["encoder.pos_embedding"].shape != own["encoder.pos_embedding"].shape:
            from torchvision.models.vision_transformer import interpolate_embeddings

            state = interpolate_embeddings(net.image_size, net.patch_size, state)
    head_keys = {k for k in own if k == head_path or k.startswith(head_path + ".")}
    # A fine-tuned checkpoint may carry a head for other classes: the head is replaced anyway.
    state = {k: v for k, v in state.items() if not (k in head_keys and v.shape != own[k].shape)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    bad = [k for k in missing if k not in head_keys]
    if bad or unexpected:
        raise BackboneError(
            f"weights '{weights}' do not fit {ref}: {len(bad)} missing and "
            f"{len(unexpected)} unexpected tensors (first: {(bad + list(unexpected))[0]})"
        )


class TorchvisionFamily(BackboneFamily):
    name = "torchvision"
    modality = "image"
    weights_sources = ("pretrained", "none")

    def list_models(self, pattern: str | None = None) -> list[str]:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]

    def build(self, model: str, *, weights: str, num_classes: int, image_size: int) -> Backbone:
        import torchvision
        from torchvision.models import get_model

        ref = f"torchvision:{model}"
        known = self.list_models()
        if model not in known:
            close = [n for n in known if n.startswith(model[:3])][:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise BackboneError(
                f"torchvision has no classification model '{model}'{hint} "
                "(see `autotransfer backbones --family torchvision`)"
            )
        if weights == "packaged":
            raise BackboneError(
                f"no packaged weights for {ref}; use 'pretrained', 'none' or a local file"
            )
        default = _default_weights(model)
        preprocessing, meta = _preprocessing(default)
        kwargs: dict[str, object] = {}
        if model in NO_AUX:
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = False if weights != "none" else True
        if model.startswith("vit_"):
            patch = int(model.rsplit("_", 1)[1])
            if image_size % patch:
                raise BackboneError(
                    f"{ref} needs an image size divisible by its patch size {patch}, "
                    f"got {image_size}"
                )
        state: dict[str, torch.Tensor] | None = None
        if weights == "pretrained":
            if default is None:
                raise BackboneError(f"torchvision has no pretrained weights for {ref}; use 'none'")
            try:
                state = get_model(model, weights=default, **kwargs).state_dict()
            except Exception as exc:  # no network, no cached file
                url = getattr(default, "url", "")
                raise BackboneError(
                    f"could not download pretrained weights for {ref} ({type(exc).__name__}); "
                    f"offline, fetch {url} elsewhere and use {ref}@/path/to/weights.pth"
                ) from exc
        elif weights != "none":
            state = load_state_dict_file(Path(weights))
        if model.startswith("vit_"):
            kwargs["image_size"] = image_size
        net = get_model(model, weights=None, **kwargs)
        if model.startswith("squeezenet"):
            _linear_head_squeezenet(net)
            if state is not None:  # the conv head is not kept
                state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        head_path = _head_path(net)
        if state is not None:
            _load(net, state, head_path, ref, weights)
        original = net.get_submodule(head_path)
        new_head = nn.Linear(original.in_features, num_classes)
        set_submodule(net, head_path, new_head)
        head = param_names(net, head_path)
        blocks = _blocks(net, set(head))
        return Backbone(
            name=ref,
            weights=weights,
            model=net,
            blocks=blocks,
            head=head,
            features=HeadInput(head_path),
            classify=HeadCall(head_path),
            num_features=int(original.in_features),
            preprocessing=preprocessing,
            plugin=__name__,
            split=steps_or_whole(net, blocks, _steps(net), HeadInput(head_path)),
            extra={
                "original_head": original
                if state is not None and not model.startswith("squeezenet")
                else None,
                "original_classes": int(original.out_features),
                "torchvision_version": torchvision.__version__,
                **meta,
            },
        )


@hookimpl
def autotransfer_register_backbone_families() -> list[type[BackboneFamily]]:
    return [TorchvisionFamily]
