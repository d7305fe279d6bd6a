"""Backbones: the families that build them and what a built one exposes."""

from autotransfer.backbones._base import (
    MODALITIES,
    Backbone,
    BackboneFamily,
    Preprocessing,
    SplitForward,
    TextPreprocessing,
)

__all__ = ["MODALITIES", "Backbone", "BackboneFamily", "Preprocessing",
           "SplitForward", "TextPreprocessing"]
