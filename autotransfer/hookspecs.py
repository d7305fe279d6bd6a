"""Hook specifications: the contract between autotransfer and its plugins.

A plugin is a module (or object) registered under the ``autotransfer``
entry-point group whose functions carry the ``@autotransfer.hookimpl`` marker.
The built-in families (``timm``) are loaded through that same entry-point path.

Every hook is called with keyword arguments only, through the typed facade in
:mod:`autotransfer.plugins.host`; callers never touch ``pm.hook`` directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from autotransfer.backbones import BackboneFamily

PROJECT = "autotransfer"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def autotransfer_register_backbone_families() -> list[type[BackboneFamily]]:
    """Return the backbone family classes this plugin provides.

    Called once per process, when the plugin host starts (before any study).

    Returns:
        Subclasses of :class:`autotransfer.backbones.BackboneFamily`. Each class
        has a unique ``name`` (the ``family`` in ``family:model`` backbone
        names); two plugins returning the same name is an error that names both.
    """
