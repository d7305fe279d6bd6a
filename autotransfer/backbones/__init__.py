"""Backbones: the families that build them and what a built one exposes."""

from autotransfer.backbones._base import Backbone, BackboneFamily, Preprocessing

__all__ = ["Backbone", "BackboneFamily", "Preprocessing"]
