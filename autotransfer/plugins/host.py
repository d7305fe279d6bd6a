"""The plugin host: loads plugins from the ``autotransfer`` entry-point group.

Built-in families (``timm``) are entry points of the ``autotransfer``
distribution itself, loaded by the same code as third-party plugins. Callers use
:class:`PluginHost` (typed methods); nothing else touches ``pm.hook``.

Set ``AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD=1`` to load the built-ins only;
``AUTOTRANSFER_PLUGINS_ALLOW`` / ``AUTOTRANSFER_PLUGINS_DENY`` (comma-separated
entry-point names) choose which third-party plugins load; a refused plugin is
never imported. A
plugin that fails to import is reported (``autotransfer plugins``) and the others
keep working.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

from autotransfer import hookspecs
from autotransfer.backbones import Backbone, BackboneFamily
from autotransfer.exceptions import BackboneError, PluginError
from autotransfer.spec.model import BackboneRef

ENTRY_POINT_GROUP = "autotransfer"
DISABLE_AUTOLOAD_ENV = "AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_ENV = "AUTOTRANSFER_PLUGINS_ALLOW"
DENY_ENV = "AUTOTRANSFER_PLUGINS_DENY"
BUILTIN_DISTRIBUTION = "autotransfer"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool
    hooks: tuple[str, ...] = ()
    error: str | None = None


@dataclass
class PluginHost:
    """Loaded plugins and the backbone families they registered."""

    pm: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)
    families: dict[str, BackboneFamily] = field(default_factory=dict)
    family_plugins: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, autoload: bool | None = None) -> PluginHost:
        """Load built-in plugins, and third-party ones unless autoload is off."""
        if autoload is None:
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").lower() in ("", "0", "false")
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        host = cls(pm=pm)
        eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        for ep in eps:
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            builtin = dist == BUILTIN_DISTRIBUTION
            if not builtin and not autoload:
                continue
            skipped = None if builtin else _policy_refuses(ep.name)
            if skipped:  # never imported: its code does not run
                host.plugins.append(PluginInfo(ep.name, dist, version, builtin, error=skipped))
                continue
            try:
                with _installed_code_only():
                    module = ep.load()
                pm.register(module, name=ep.name)
            except Exception as exc:  # a broken plugin must not break the others
                host.plugins.append(
                    PluginInfo(
                        ep.name, dist, version, builtin, error=f"{type(exc).__name__}: {exc}"
                    )
                )
                continue
            hooks = tuple(sorted(h.name for h in pm.get_hookcallers(module) or ()))
            host.plugins.append(PluginInfo(ep.name, dist, version, builtin, hooks))
        if not any(p.builtin and p.error is None for p in host.plugins):
            raise PluginError(
                "built-in plugins not found: autotransfer is not installed; run `pip install -e .`"
            )
        pm.check_pending()
        host._collect_families()
        return host

    def _collect_families(self) -> None:
        for impl in self.pm.hook.autotransfer_register_backbone_families.get_hookimpls():
            for family_cls in impl.function() or []:
                name = family_cls.name
                if name in self.families:
                    other = type(self.families[name])
                    raise PluginError(
                        f"backbone family '{name}' is provided twice: "
                        f"{other.__module__}.{other.__qualname__} (plugin "
                        f"'{self.family_plugins[name]}') and "
                        f"{family_cls.__module__}.{family_cls.__qualname__} (plugin "
                        f"'{impl.plugin_name}'); uninstall one of them"
                    )
                self.families[name] = family_cls()
                self.family_plugins[name] = impl.plugin_name

    def family(self, name: str) -> BackboneFamily:
        """The family called ``name``; an unknown name lists the valid ones."""
        try:
            return self.families[name]
        except KeyError:
            known = ", ".join(sorted(self.families)) or "none"
            raise BackboneError(
                f"unknown backbone family '{name}'; installed families: {known}"
            ) from None

    def build(self, ref: BackboneRef, *, num_classes: int, image_size: int) -> Backbone:
        """Build the backbone ``ref`` with a head for ``num_classes``."""
        family = self.family(ref.family)
        # Remote-code options exist for the hf family only (the spec refuses them
        # elsewhere), so other families keep the plain build signature.
        remote = (
            {"trust_remote_code": ref.trust_remote_code, "revision": ref.revision}
            if ref.trust_remote_code or ref.revision
            else {}
        )
        backbone = family.build(
            ref.model, weights=ref.weights, num_classes=num_classes, image_size=image_size,
            **remote,
        )
        backbone.plugin = backbone.plugin or self.family_plugins[ref.family]
        return backbone


@contextlib.contextmanager
def _installed_code_only() -> Iterator[None]:
    """Load plugin modules from installed distributions only: while an entry point
    is imported, the working directory is not on ``sys.path`` (``python -m`` puts it
    there), so a stray ``plugin.py`` in the current folder can never be loaded."""
    cwd = os.path.realpath(os.getcwd())
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if p and os.path.realpath(p) != cwd]
    try:
        yield
    finally:
        sys.path[:] = saved


def _names(env: str) -> set[str] | None:
    value = os.environ.get(env)
    if value is None or not value.strip():
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _policy_refuses(name: str) -> str | None:
    """Why the third-party plugin ``name`` must not load (allow/deny lists), or None.

    ``AUTOTRANSFER_PLUGINS_DENY`` (comma-separated entry-point names) wins over
    ``AUTOTRANSFER_PLUGINS_ALLOW``; with an allow list set, only the plugins it
    names load. Built-in plugins are not subject to either list.
    """
    deny, allow = _names(DENY_ENV), _names(ALLOW_ENV)
    if deny is not None and name in deny:
        return f"not loaded: denied by {DENY_ENV}"
    if allow is not None and name not in allow:
        return f"not loaded: not in {ALLOW_ENV} ({', '.join(sorted(allow))})"
    return None


@functools.cache
def get_plugin_host() -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    return PluginHost.load()
