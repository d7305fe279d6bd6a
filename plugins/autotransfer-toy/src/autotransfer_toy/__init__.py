"""The ``toy`` backbone family: small CNNs, random init (an example plugin)."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from autotransfer.backbones import Backbone, BackboneFamily, Preprocessing
from autotransfer.exceptions import BackboneError
from autotransfer.hookspecs import hookimpl

__version__ = "0.1.0"

WIDTHS = {"cnn-s": (8, 16), "cnn-m": (16, 32, 64)}


class ToyCNN(nn.Module):
    def __init__(self, widths: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers.append(
                nn.Sequential(
                    nn.Conv2d(c_in, w, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                )
            )
            c_in = w
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)


def _classify(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return model.fc(features)


class ToyFamily(BackboneFamily):
    name = "toy"
    modality = "image"
    weights_sources = ("none",)

    def list_models(self, pattern: str | None = None) -> list[str]:
        return [m for m in sorted(WIDTHS) if pattern is None or fnmatch.fnmatch(m, pattern)]

    def build(self, model: str, *, weights: str, num_classes: int, image_size: int) -> Backbone:
        if model not in WIDTHS:
            raise BackboneError(f"toy has no model '{model}'; models: {', '.join(sorted(WIDTHS))}")
        if weights != "none":
            raise BackboneError(f"toy:{model} has random init only; use toy:{model}@none")
        net = ToyCNN(WIDTHS[model], num_classes)
        names = [n for n, _ in net.named_parameters()]
        return Backbone(
            name=f"toy:{model}",
            weights=weights,
            model=net,
            blocks=[
                [n for n in names if n.startswith(f"stages.{i}.")] for i in range(len(net.stages))
            ],
            head=["fc.weight", "fc.bias"],
            features=_features,
            classify=_classify,
            num_features=net.fc.in_features,
            preprocessing=Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        )


@hookimpl
def autotransfer_register_backbone_families() -> list[type[BackboneFamily]]:
    return [ToyFamily]
