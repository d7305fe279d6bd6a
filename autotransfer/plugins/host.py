"""The plugin host: loads plugins from the ``autotransfer`` entry-point group.

Built-in families (``timm``) are entry points of the ``autotransfer``
distribution itself, loaded by the same code as third-party plugins. Callers use
:class:`PluginHost` (typed methods); nothing else touches ``pm.hook``.

Set ``AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD=1`` to load the built-ins only;
``AUTOTRANSFER_PLUGINS_ALLOW`` / ``AUTOTRANSFER_PLUGINS_DENY`` (comma-separated
entry-point names) choose which third-party plugins load; a refused plugin is
never imported.

Every value a hook or a family method returns is checked where it enters the
host. A plugin that fails to import, raises in a hook, or returns the wrong kind
of value is *quarantined*: unregistered, listed by ``autotransfer plugins`` with
the hook and a one-line reason, and its families (where known) answer with
:class:`~autotransfer.exceptions.BrokenPluginError` (exit code 2) naming the
plugin and the fix. The other plugins keep working.

Long because every value a hook returns is checked here, where it enters the
host, beside the loading that the checks guard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy
from torch import nn

from autotransfer import hookspecs
from autotransfer.backbones import (
    MODALITIES,
    Backbone,
    BackboneFamily,
    Preprocessing,
    TextPreprocessing,
)
from autotransfer.exceptions import AutotransferError, BackboneError, BrokenPluginError, PluginError
from autotransfer.spec.model import BackboneRef

ENTRY_POINT_GROUP = "autotransfer"
DISABLE_AUTOLOAD_ENV = "AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_ENV = "AUTOTRANSFER_PLUGINS_ALLOW"
DENY_ENV = "AUTOTRANSFER_PLUGINS_DENY"
BUILTIN_DISTRIBUTION = "autotransfer"
REGISTER_HOOK = "autotransfer_register_backbone_families"
NAMED_WEIGHTS = ("pretrained", "packaged", "none")
"""The weight sources autotransfer itself names; a family declares which of them
(and any names of its own) it accepts in ``weights_sources``. Any other value is
a local file or directory, handed to ``build()`` as given."""
FAMILY_MODALITIES = (*MODALITIES, "image+text")

LOADED, BROKEN, DENIED = "loaded", "broken", "denied"
"""A plugin's ``status``: in use; quarantined (``hook`` and ``error`` say where and
why); not imported because the allow or deny list refuses it."""


@dataclass(frozen=True)
class PluginInfo:
    """One entry point of the ``autotransfer`` group and what became of it.

    Attributes:
        status: ``loaded``, ``broken`` or ``denied``.
        hook: where a broken plugin failed: ``import``, ``register``, a hook name,
            or a family method (``build``, ``list_models``).
        error: one line: why it is broken or denied; None when loaded.
    """

    name: str
    distribution: str
    version: str
    builtin: bool
    hooks: tuple[str, ...] = ()
    error: str | None = None
    status: str = LOADED
    hook: str | None = None

    @property
    def label(self) -> str:
        """``plugin 'NAME' (distribution 'DIST VERSION')``, for messages."""
        return f"plugin '{self.name}' (distribution '{self.distribution} {self.version}')"


class _Broken(Exception):
    """A hook's return value broke the contract: the one-line reason, and the
    family names the plugin meant to provide where they are known."""

    def __init__(self, reason: str, families: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.families = families


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _what(value: object) -> str:
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    return f"{type(value).__name__} {value!r}"[:120]


@dataclass
class PluginHost:
    """Loaded plugins and the backbone families they registered."""

    pm: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)
    families: dict[str, BackboneFamily] = field(default_factory=dict)
    family_plugins: dict[str, str] = field(default_factory=dict)
    broken_families: dict[str, str] = field(default_factory=dict)
    """Family names a broken plugin would have provided (where known) -> plugin name."""

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
            info = PluginInfo(ep.name, dist, version, builtin)
            skipped = None if builtin else _policy_refuses(ep.name)
            if skipped:  # never imported: its code does not run
                host.plugins.append(dataclasses.replace(info, status=DENIED, error=skipped))
                continue
            host.plugins.append(info)
            try:
                with _installed_code_only():
                    module = ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                host.quarantine(ep.name, "import", _one_line(exc))
                continue
            try:
                pm.register(module, name=ep.name)
                unknown = sorted(
                    h.name for h in pm.get_hookcallers(module) or () if not h.has_spec()
                )
                if unknown:
                    raise _Broken(
                        f"implements hooks that do not exist: {', '.join(unknown)} "
                        "(misspelt, or written for another autotransfer version)"
                    )
            except Exception as exc:
                reason = str(exc) if isinstance(exc, _Broken) else _one_line(exc)
                host.quarantine(ep.name, "register", reason)
                continue
            hooks = tuple(sorted(h.name for h in pm.get_hookcallers(module) or ()))
            host._replace(ep.name, hooks=hooks)
        if not any(p.builtin and p.status == LOADED for p in host.plugins):
            raise PluginError(
                "built-in plugins not found: autotransfer is not installed; run `pip install -e .`"
            )
        host._collect_families()
        return host

    # -- quarantine ------------------------------------------------------------

    def info(self, plugin: str) -> PluginInfo | None:
        return next((p for p in self.plugins if p.name == plugin), None)

    def _replace(self, plugin: str, **changes: Any) -> None:
        self.plugins = [
            dataclasses.replace(p, **changes) if p.name == plugin else p for p in self.plugins
        ]

    def quarantine(
        self, plugin: str, hook: str, reason: str, families: tuple[str, ...] = ()
    ) -> None:
        """Take ``plugin`` out of use: unregister it, drop its families (or mark
        ``families``, the names it would have provided) as broken, and record
        ``hook`` and the one-line ``reason`` for ``autotransfer plugins``."""
        with contextlib.suppress(Exception):
            if self.pm.get_plugin(plugin) is not None:
                self.pm.unregister(name=plugin)
        for name, owner in list(self.family_plugins.items()):
            if owner == plugin:
                del self.families[name], self.family_plugins[name]
                self.broken_families[name] = plugin
        for name in families:
            self.broken_families.setdefault(name, plugin)
        self._replace(plugin, status=BROKEN, hook=hook, error=reason)

    def plugin_label(self, family: str) -> str:
        """``plugin 'NAME' (distribution 'DIST VERSION')`` behind ``family``."""
        name = self.family_plugins.get(family) or self.broken_families.get(family, "?")
        info = self.info(name)
        return info.label if info else f"plugin '{name}'"

    def _broken_family_error(self, family: str) -> BrokenPluginError:
        info = self.info(self.broken_families[family])
        assert info is not None
        return BrokenPluginError(
            f"backbone family '{family}' is unusable: {info.label} is broken "
            f"({info.hook}: {info.error}); {_fix(info)}"
        )

    def _broken_contract(
        self, family: str, hook: str, reason: str
    ) -> BrokenPluginError:
        """Quarantine the plugin of ``family`` for a wrong value from ``hook``."""
        plugin = self.family_plugins.get(family, "?")
        self.quarantine(plugin, hook, reason, (family,))
        return self._broken_family_error(family)

    # -- registration ----------------------------------------------------------

    def _collect_families(self) -> None:
        hook = getattr(self.pm.hook, REGISTER_HOOK)
        for impl in hook.get_hookimpls():
            plugin = impl.plugin_name
            try:
                found = _family_classes(impl.function())
                instances = [(family_cls, _instantiate(family_cls)) for family_cls in found]
            except _Broken as exc:
                self.quarantine(plugin, REGISTER_HOOK, str(exc), exc.families)
                continue
            except Exception as exc:
                self.quarantine(plugin, REGISTER_HOOK, f"raised {_one_line(exc)}")
                continue
            for family_cls, family in instances:
                name = family_cls.name
                if name in self.families:
                    other = type(self.families[name])
                    raise PluginError(
                        f"backbone family '{name}' is provided twice: "
                        f"{other.__module__}.{other.__qualname__} (plugin "
                        f"'{self.family_plugins[name]}') and "
                        f"{family_cls.__module__}.{family_cls.__qualname__} (plugin "
                        f"'{plugin}'); uninstall one of them"
                    )
                self.families[name] = family
                self.family_plugins[name] = plugin

    # -- the typed facade --------------------------------------------------------

    def family(self, name: str) -> BackboneFamily:
        """The family called ``name``; an unknown name lists the valid ones.

        Raises:
            BrokenPluginError: the family's plugin is broken.
            BackboneError: no plugin provides ``name``.
        """
        try:
            return self.families[name]
        except KeyError:
            pass
        if name in self.broken_families:
            raise self._broken_family_error(name)
        known = ", ".join(sorted(self.families)) or "none"
        unused = [p for p in self.plugins if p.status != LOADED]
        hint = (
            "; not in use: " + ", ".join(f"plugin '{p.name}' ({p.status})" for p in unused)
            + ", see `autotransfer plugins`"
            if unused else ""
        )
        raise BackboneError(f"unknown backbone family '{name}'; installed families: {known}{hint}")

    def list_models(self, family: str, pattern: str | None = None) -> list[str]:
        """The models ``family`` can build whose names match the glob ``pattern``.

        Raises:
            BrokenPluginError: ``list_models`` raised or did not return a list of str.
        """
        fam = self.family(family)
        try:
            names = fam.list_models(pattern)
        except AutotransferError:
            raise
        except Exception as exc:
            raise self._broken_contract(family, "list_models", f"raised {_one_line(exc)}") from exc
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise self._broken_contract(
                family, "list_models",
                f"returned {_what(names)}, expected a list of model names (str)",
            )
        return list(names)

    def build(self, ref: BackboneRef, *, num_classes: int, image_size: int) -> Backbone:
        """Build the backbone ``ref`` with a head for ``num_classes``.

        Raises:
            BackboneError: the family does not offer the named weights source.
            BrokenPluginError: ``build()`` returned something that is not a
                valid :class:`Backbone`.
            Exception: whatever the family's ``build()`` raised (callers name
                the plugin: :meth:`plugin_label`).
        """
        family = self.family(ref.family)
        _check_weights(ref, family)
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
        problem = _backbone_problem(backbone, family, ref)
        if problem:
            raise self._broken_contract(ref.family, "build", problem)
        backbone.plugin = backbone.plugin or self.family_plugins[ref.family]
        return backbone


def _fix(info: PluginInfo) -> str:
    if info.builtin:
        return "reinstall autotransfer (pip install --force-reinstall autotransfer)"
    return (
        f"upgrade or fix the plugin, uninstall it (pip uninstall {info.distribution}), "
        f"or switch it off with {DENY_ENV}={info.name}"
    )


def _family_classes(value: object) -> list[type[BackboneFamily]]:
    """The family classes a registration hook returned, or :class:`_Broken`."""
    if value is None:
        return []
    if isinstance(value, type) or not isinstance(value, (list, tuple)):
        raise _Broken(
            f"returned {_what(value)}, expected a list of BackboneFamily subclasses "
            "(return [MyFamily])"
        )
    out = []
    for item in value:
        if isinstance(item, BackboneFamily):
            cls = type(item).__qualname__
            name = getattr(item, "name", None)
            raise _Broken(
                f"returned an instance of {cls}, not the class: return [{cls}], not [{cls}()]",
                (name,) if isinstance(name, str) else (),
            )
        if not (isinstance(item, type) and issubclass(item, BackboneFamily)):
            raise _Broken(
                f"returned {_what(item)}, which is not a subclass of "
                "autotransfer.backbones.BackboneFamily"
            )
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name or any(c in name for c in ":@/ "):
            raise _Broken(
                f"{item.__qualname__}.name is {name!r}: set a class attribute name, a "
                "non-empty str without ':', '@', '/' or spaces (the family in family:model)"
            )
        names = (name,)
        if item.modality not in FAMILY_MODALITIES:
            raise _Broken(
                f"{item.__qualname__}.modality is {item.modality!r}, expected one of "
                f"{', '.join(FAMILY_MODALITIES)}", names,
            )
        sources = item.weights_sources
        if not isinstance(sources, (tuple, list)) or not all(isinstance(s, str) for s in sources):
            raise _Broken(
                f"{item.__qualname__}.weights_sources is {sources!r}, expected a tuple of "
                f"str (e.g. ('pretrained', 'none'))", names,
            )
        if getattr(item, "__abstractmethods__", None):
            missing = ", ".join(sorted(item.__abstractmethods__))
            raise _Broken(f"{item.__qualname__} does not implement {missing}", names)
        out.append(item)
    return out


def _instantiate(family_cls: type[BackboneFamily]) -> BackboneFamily:
    try:
        return family_cls()
    except Exception as exc:
        raise _Broken(
            f"{family_cls.__qualname__}() raised {_one_line(exc)} (a family is "
            "instantiated once, with no arguments)", (family_cls.name,),
        ) from exc


def _check_weights(ref: BackboneRef, family: BackboneFamily) -> None:
    """A named weights source must be one the family declares."""
    if ref.weights in NAMED_WEIGHTS and ref.weights not in family.weights_sources:
        offered = ", ".join(family.weights_sources) or "no named source"
        raise BackboneError(
            f"backbone {ref.key}: family '{family.name}' has no '{ref.weights}' weights "
            f"(its sources: {offered}, or a local weights file or directory); "
            f"use {ref.name}@{family.weights_sources[0] if family.weights_sources else '<path>'}"
        )


def _backbone_problem(backbone: object, family: BackboneFamily, ref: BackboneRef) -> str | None:
    """What is wrong with the value ``build()`` returned, or None."""
    cls = type(family).__qualname__
    if not isinstance(backbone, Backbone):
        return (
            f"{cls}.build() returned {type(backbone).__module__}.{type(backbone).__qualname__}, "
            "expected autotransfer.backbones.Backbone (wrap the model: Backbone(name=..., "
            "model=..., blocks=..., head=..., ...))"
        )
    expected = f"{family.name}:{ref.model}"
    if backbone.name != expected:
        return f"{cls}.build() returned a Backbone named {backbone.name!r}, expected {expected!r}"
    if not isinstance(backbone.model, nn.Module):
        return (
            f"{cls}.build() returned a Backbone whose model is "
            f"{type(backbone.model).__qualname__}, expected a torch.nn.Module"
        )
    if not isinstance(backbone.preprocessing, (Preprocessing, TextPreprocessing)):
        return (
            f"{cls}.build() returned a Backbone whose preprocessing is "
            f"{type(backbone.preprocessing).__qualname__}, expected Preprocessing "
            "(image) or TextPreprocessing (text)"
        )
    if not (callable(backbone.features) and callable(backbone.classify)):
        return f"{cls}.build() returned a Backbone whose features or classify is not callable"
    if backbone.modality not in MODALITIES:
        return (
            f"{cls}.build() returned a Backbone with modality {backbone.modality!r}, "
            f"expected one of {', '.join(MODALITIES)}"
        )
    return None


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
