"""Broken plugins never take the command line down.

Each kind of broken plugin (raising or wrong-typed registration, a ``build()``
that returns a bare module, a raising ``list_models``) is installed beside a good
one through the host's test seam (fake entry points, no pip): the host
quarantines it, ``autotransfer plugins`` lists it with its hook and reason, every
other command keeps working with the good family, and using the broken one is
exit code 2 naming the plugin and the fix.
"""

from __future__ import annotations

import fnmatch
import json
import re
import types
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import autotransfer.plugins.host as host_module
from autotransfer.backbones import Backbone, BackboneFamily, Preprocessing
from autotransfer.cli import app
from autotransfer.exceptions import BackboneError, BrokenPluginError
from autotransfer.hookspecs import hookimpl
from autotransfer.plugins.host import DENY_ENV, DISABLE_AUTOLOAD_ENV, PluginHost
from autotransfer.spec.model import BackboneRef

runner = CliRunner()


# -- a good family and broken ones ----------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stem(x)).flatten(1))


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.pool(model.stem(x)).flatten(1)


def _classify(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return model.fc(features)


class GoodFamily(BackboneFamily):
    name = "good"
    weights_sources = ("none",)

    def list_models(self, pattern: str | None = None) -> list[str]:
        return [m for m in ["net"] if pattern is None or fnmatch.fnmatch(m, pattern)]

    def build(self, model: str, *, weights: str, num_classes: int, image_size: int) -> Backbone:
        net = TinyNet(num_classes)
        return Backbone(
            name=f"{self.name}:{model}", weights=weights, model=net,
            blocks=[["stem.0.weight", "stem.0.bias"]], head=["fc.weight", "fc.bias"],
            features=_features, classify=_classify, num_features=4,
            preprocessing=Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        )


class BareModuleFamily(GoodFamily):
    name = "bare"

    def build(self, model: str, *, weights: str, num_classes: int, image_size: int) -> Backbone:
        return TinyNet(num_classes)  # type: ignore[return-value]  # the bug under test


class RaisingListFamily(GoodFamily):
    name = "badlist"

    def list_models(self, pattern: str | None = None) -> list[str]:
        raise RuntimeError("model index unreachable")


class CrashingNet(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("kaboom in forward")
        return super().forward(x)


class CrashingFamily(GoodFamily):
    """Builds fine, raises inside a trial (a plugin bug at training time)."""

    name = "crash"

    def build(self, model: str, *, weights: str, num_classes: int, image_size: int) -> Backbone:
        backbone = super().build(model, weights=weights, num_classes=num_classes,
                                 image_size=image_size)
        backbone.model = CrashingNet(num_classes)
        return backbone


def _module(name: str, register: Callable[[], object]) -> types.ModuleType:
    module = types.ModuleType(f"fake_{name}")

    @hookimpl
    def autotransfer_register_backbone_families():  # type: ignore[no-untyped-def]
        return register()

    module.autotransfer_register_backbone_families = autotransfer_register_backbone_families
    return module


def _raise() -> object:
    raise RuntimeError("registration exploded")


BROKEN = {
    # plugin name: (module, hook it breaks in, words of the reason)
    "raises": (_module("raises", _raise), "autotransfer_register_backbone_families",
               "raised RuntimeError: registration exploded"),
    "instance": (_module("instance", lambda: [BareModuleFamily()]),
                 "autotransfer_register_backbone_families",
                 "returned an instance of BareModuleFamily, not the class"),
    "notfamily": (_module("notfamily", lambda: [nn.Linear]),
                  "autotransfer_register_backbone_families",
                  "not a subclass of autotransfer.backbones.BackboneFamily"),
    "bare": (_module("bare", lambda: [BareModuleFamily]), "build",
             "expected autotransfer.backbones.Backbone"),
    "badlist": (_module("badlist", lambda: [RaisingListFamily]), "list_models",
                "raised RuntimeError: model index unreachable"),
}


class _Dist:
    def __init__(self, name: str) -> None:
        self.name, self.version = name, "1.0"


class _EntryPoint:
    def __init__(self, name: str, module: types.ModuleType) -> None:
        self.name, self.dist, self.module = name, _Dist(f"plugin-{name}"), module

    def load(self) -> types.ModuleType:
        return self.module


@pytest.fixture
def installed(monkeypatch) -> Iterator[Callable[..., PluginHost]]:
    """``installed(*names)``: the good plugin and the named broken ones are the
    installed third-party entry points; the process-wide host is reloaded."""
    real = list(host_module.entry_points(group=host_module.ENTRY_POINT_GROUP))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)

    def install(*names: str, extra: tuple[_EntryPoint, ...] = ()) -> PluginHost:
        fakes = [_EntryPoint("good", _module("good", lambda: [GoodFamily])), *extra]
        fakes += [_EntryPoint(n, BROKEN[n][0]) for n in names]
        monkeypatch.setattr(host_module, "entry_points", lambda group: [*real, *fakes])
        host_module.get_plugin_host.cache_clear()
        return host_module.get_plugin_host()

    yield install
    host_module.get_plugin_host.cache_clear()


def _plugins_json() -> dict[str, dict]:
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    return {r["name"]: r for r in json.loads(result.stdout)}


# -- each kind, beside a good plugin -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_plugin_is_quarantined_and_the_others_work(installed, name) -> None:
    module, hook, reason = BROKEN[name]
    host = installed(name)
    assert "good" in host.families and {"timm", "torchvision", "hf"} <= set(host.families)
    host.build(BackboneRef.parse("good:net@none"), num_classes=2, image_size=16)

    listing = runner.invoke(app, ["backbones", "--json"])
    assert listing.exit_code == 0, listing.output
    assert "good" in {r["family"] for r in json.loads(listing.stdout)}

    if name == "bare":  # only building shows it: the search's check before any trial
        assert host.info(name).status == "loaded"
        with pytest.raises(BrokenPluginError) as err:
            host.build(BackboneRef.parse("bare:net@none"), num_classes=2, image_size=16)
        message = str(err.value)
    else:
        family = {"instance": "bare", "badlist": "badlist"}.get(name, name)
        used = runner.invoke(app, ["backbones", "--family", family])
        assert used.exit_code == 2, used.output
        message = used.stderr
        assert "\n" not in message.strip() and "Traceback" not in message

    info = _plugins_json()[name]
    assert (info["status"], info["hook"], info["distribution"]) == ("broken", hook,
                                                                    f"plugin-{name}")
    assert reason in info["error"] and "\n" not in info["error"]
    assert f"plugin '{name}'" in message
    if name in ("raises", "notfamily"):  # the family name is unknown: point at the list
        assert "(broken), see `autotransfer plugins`" in message
    else:
        assert reason in message
        assert f"pip uninstall plugin-{name}" in message and f"{DENY_ENV}={name}" in message
    table = runner.invoke(app, ["plugins"])
    assert table.exit_code == 0 and "broken" in table.stdout
    assert f"plugin '{name}' (plugin-{name} 1.0) is broken and not in use" in table.stderr


def test_every_command_works_beside_all_broken_plugins(
    installed, write_spec, storage_url, tmp_path
) -> None:
    installed(*BROKEN)
    for args in (["plugins"], ["backbones"], ["backbones", "--filter", "n*"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    spec = write_spec(**{"search.backbones": ["good:net@none"], "n_trials": 1,
                         "train.epochs": 1})
    done = runner.invoke(app, ["search", str(spec), "--storage", storage_url, "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["best_params"]["backbone"] == "good:net@none"

    for backbone, words in (
        ("bare:net@none", "returned test_broken_plugins.TinyNet, expected "
                          "autotransfer.backbones.Backbone"),
        ("good:net@pretrained", "family 'good' has no 'pretrained' weights (its sources: none"),
    ):
        spec = write_spec(**{"search.backbones": [backbone]})
        bad = runner.invoke(app, ["search", str(spec), "--storage", storage_url])
        assert bad.exit_code == 2, bad.output
        assert words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_declared_weights_sources_are_enforced_before_build(installed) -> None:
    built = []

    class Spy(GoodFamily):
        name = "spy"

        def build(self, model, *, weights, num_classes, image_size):  # type: ignore[no-untyped-def]
            built.append(weights)
            return super().build(model, weights=weights, num_classes=num_classes,
                                 image_size=image_size)

    host = installed(extra=(_EntryPoint("spy", _module("spy", lambda: [Spy])),))
    for weights in ("pretrained", "packaged"):
        with pytest.raises(BackboneError, match=f"no '{weights}' weights"):
            host.build(BackboneRef.parse(f"spy:net@{weights}"), num_classes=2, image_size=16)
    assert built == []  # never reached the family
    host.build(BackboneRef.parse("spy:net@none"), num_classes=2, image_size=16)
    host.build(BackboneRef.parse("spy:net@/some/local/weights.pt"), num_classes=2, image_size=16)
    assert built == ["none", "/some/local/weights.pt"]  # a path is the family's to check


def test_denied_plugin_is_reported_as_denied(installed, monkeypatch) -> None:
    monkeypatch.setenv(DENY_ENV, "good")
    host = installed()
    assert "good" not in host.families
    info = _plugins_json()["good"]
    assert (info["status"], info["hook"]) == ("denied", None)
    assert info["error"] == f"not loaded: denied by {DENY_ENV}"
    table = runner.invoke(app, ["plugins"])
    assert table.exit_code == 0 and "denied" in table.stdout
    assert "broken" not in table.stderr and "failed" not in table.stderr
    used = runner.invoke(app, ["backbones", "--family", "good"])
    assert used.exit_code == 2 and "plugin 'good' (denied)" in used.stderr


# -- a plugin that raises inside a trial ------------------------------------------------

CRASH_PLUGIN = '''
import torch
from torch import nn
from autotransfer.backbones import Backbone, BackboneFamily, Preprocessing
from autotransfer.hookspecs import hookimpl


class Net(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, n)

    def forward(self, x):
        return self.fc(features(self, x))


def features(model, x):
    if model.training:
        raise RuntimeError("kaboom in forward " + "x" * 200)
    return model.stem(x).mean((2, 3))


def classify(model, f):
    return model.fc(f)


class CrashFamily(BackboneFamily):
    name = "crash"
    weights_sources = ("none",)

    def list_models(self, pattern=None):
        return ["net"]

    def build(self, model, *, weights, num_classes, image_size):
        return Backbone(
            name=f"crash:{model}", weights=weights, model=Net(num_classes),
            blocks=[["stem.weight", "stem.bias"]], head=["fc.weight", "fc.bias"],
            features=features, classify=classify, num_features=4,
            preprocessing=Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        )


@hookimpl
def autotransfer_register_backbone_families():
    return [CrashFamily]
'''


def test_a_plugin_raising_in_a_trial_is_one_line_and_trials_shows_it(
    tmp_path, write_spec, storage_url
) -> None:
    """A real entry point (a dist-info on PYTHONPATH, no pip) in a fresh process,
    so Optuna's own logging reaches stderr as it would for a user."""
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    info = site / "crash_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crash-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[autotransfer]\ncrash = crash_plugin\n")
    (site / "crash_plugin.py").write_text(CRASH_PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    spec = write_spec(**{"search.backbones": ["crash:net@none"], "n_trials": 1,
                         "train.epochs": 1})

    done = subprocess.run(
        [sys.executable, "-m", "autotransfer", "search", str(spec), "--storage", storage_url],
        capture_output=True, text=True, env=env, check=False,
    )
    assert done.returncode == 1, done.stderr  # no trial completed
    lines = done.stderr.splitlines()
    failed = [line for line in lines if "trial 0 fail:" in line]
    assert len(failed) == 1, done.stderr
    assert "plugin_error" in failed[0] and "plugin 'crash'" in failed[0]
    assert "kaboom in forward" in failed[0]
    assert "Traceback" not in done.stderr and "failed with parameters" not in done.stderr
    assert lines[-1].startswith("error: no successful trials")


    table = runner.invoke(app, ["trials", "--storage", storage_url])
    assert table.exit_code == 0, table.output
    assert "failure" in table.stdout and "plugin_error" in table.stdout
    assert "RuntimeError: kaboom" in table.stdout, table.stdout
    assert "x" * 100 not in table.stdout
    records = json.loads(runner.invoke(app, ["trials", "--storage", storage_url,
                                              "--json"]).stdout)["trials"]
    assert "kaboom in forward " + "x" * 200 in records[0]["fail_message"]


@pytest.mark.parametrize("debug", [False, True])
def test_optuna_failed_trial_warning_only_with_debug(debug: bool) -> None:
    """Optuna's "Trial N failed" warning and traceback (after our own one line)
    pass only with --debug; errors that are not ours always pass."""
    import logging

    import optuna

    from autotransfer.engine.trainer import TrialError
    from autotransfer.store.optuna_internals import OPTIMIZE_LOGGER
    from autotransfer.tuning.progress import Progress, quiet_failed_trials

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger(OPTIMIZE_LOGGER)
    logger.addHandler(handler)

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:
            raise TrialError("plugin_error", "RuntimeError: kaboom")
        raise ValueError("not ours")

    study = optuna.create_study()
    try:
        with quiet_failed_trials(Progress(debug=debug)):
            study.optimize(objective, n_trials=1, catch=(TrialError,))
            with pytest.raises(ValueError):
                study.optimize(objective, n_trials=1)
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in seen]
    ours = [m for m in messages if m.startswith("Trial 0 failed")]
    assert len(ours) == (2 if debug else 0), messages
    assert len([m for m in messages if m.startswith("Trial 1 failed")]) == 2, messages


# -- the conformance suite says what to fix -----------------------------------------------


class DictNet(TinyNet):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"logits": super().forward(x)}


class NotExportable(GoodFamily):
    def build(self, model: str, *, weights: str, num_classes: int, image_size: int) -> Backbone:
        b = super().build(model, weights=weights, num_classes=num_classes, image_size=image_size)
        b.model = DictNet(num_classes)
        return b


class MisnamedFamily(GoodFamily):
    def build(self, model: str, *, weights: str, num_classes: int, image_size: int) -> Backbone:
        b = super().build(model, weights=weights, num_classes=num_classes, image_size=image_size)
        b.name = model
        return b


@pytest.mark.parametrize(("family", "weights", "check", "words"), [
    (GoodFamily, "none", "check_all", None),
    (NotExportable, "none", "check_exports_to_torchscript_and_onnx",
     "does not export: "),
    (MisnamedFamily, "none", "check_builds", "Backbone.name is 'net': set it to 'good:net'"),
    (GoodFamily, "pretrained", "check_weights_sources",
     "does not declare in weights_sources ('none',)"),
])
def test_conformance_suite_names_the_fix(family, weights, check, words) -> None:
    from autotransfer.testing import backbone_family as suite

    case = suite.BackboneCase(family, "net", weights=weights, image_size=16)
    if words is None:
        suite.check_all(case)  # the good family passes every check, export included
        return
    with pytest.raises(AssertionError, match=re.escape(words)):
        getattr(suite, check)(case)
