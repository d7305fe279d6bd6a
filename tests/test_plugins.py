"""The plugin host and the plugin commands: a real third-party distribution
(plugins/autotransfer-toy, pip-installed by a session fixture), name clashes,
autoload switched off, a plugin that fails to import."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from typer.testing import CliRunner

import autotransfer.plugins.host as plugins_module
from autotransfer.backbones import BackboneFamily
from autotransfer.backbones.timm_family import TimmFamily
from autotransfer.cli import app
from autotransfer.exceptions import PluginError
from autotransfer.hookspecs import hookimpl
from autotransfer.plugins.host import DISABLE_AUTOLOAD_ENV, PluginHost

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "plugins" / "autotransfer-toy"
BUILTINS = {"timm", "torchvision", "hf"}
runner = CliRunner()


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True, text=True, check=False,
    )


def _installed() -> bool:
    return any(ep.name == "toy" for ep in entry_points(group="autotransfer"))


@pytest.fixture(scope="session")
def toy_plugin() -> Iterator[None]:
    """pip-installs plugins/autotransfer-toy (no deps, no build isolation: offline)
    for the session, and uninstalls it after unless it was installed before."""
    before = _installed()
    if not before:
        done = _pip("install", "--no-deps", "--no-build-isolation", str(TOY))
        assert done.returncode == 0, done.stderr
        import importlib

        importlib.invalidate_caches()
    plugins_module.get_plugin_host.cache_clear()
    yield
    plugins_module.get_plugin_host.cache_clear()
    if not before:
        _pip("uninstall", "-y", "autotransfer-toy")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command in a fresh process (sees the freshly installed plugin)."""
    return subprocess.run(
        [sys.executable, "-c", "from autotransfer.cli import main; main()", *args],
        capture_output=True, text=True, check=False, env=env,
    )


# -- a real third-party distribution ---------------------------------------------


def test_toy_plugin_loads_through_its_entry_point(toy_plugin: None) -> None:
    host = PluginHost.load()
    info = {p.name: p for p in host.plugins}["toy"]
    assert (info.distribution, info.version, info.builtin, info.error) == (
        "autotransfer-toy", "0.1.0", False, None
    )
    assert info.hooks == ("autotransfer_register_backbone_families",)
    assert host.family_plugins["toy"] == "toy"
    assert host.family("toy").list_models() == ["cnn-m", "cnn-s"]


def test_toy_plugin_passes_the_conformance_suite(toy_plugin: None) -> None:
    from autotransfer.testing.backbone_family import BackboneCase, check_all

    for model in ("cnn-s", "cnn-m"):
        check_all(BackboneCase("toy", model, image_size=32))


def test_toy_study_through_the_cli(toy_plugin: None, write_spec, storage_url: str) -> None:
    spec = write_spec(**{"search.backbones": ["toy:cnn-s@none", "toy:cnn-m@none"],
                         "train.epochs": 1, "n_trials": 2})
    done = _cli("search", str(spec), "--storage", storage_url, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["best_params"]["backbone"].startswith("toy:cnn-")
    assert len(out["trials"]) == 2 and all(t["state"] == "COMPLETE" for t in out["trials"])


def test_cli_lists_toy_plugin_and_models(toy_plugin: None) -> None:
    done = _cli("plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["toy"]["distribution"] == "autotransfer-toy" and rows["toy"]["families"] == ["toy"]
    assert BUILTINS <= set(rows)
    done = _cli("backbones", "--family", "toy", "--json")
    assert done.returncode == 0, done.stderr
    assert [(r["name"], r["plugin"], r["version"]) for r in json.loads(done.stdout)] == [
        ("toy:cnn-m", "toy", "0.1.0"), ("toy:cnn-s", "toy", "0.1.0")
    ]


def test_autoload_off_loads_builtins_only(toy_plugin: None, monkeypatch) -> None:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    host = PluginHost.load()
    assert {p.name for p in host.plugins} == BUILTINS
    assert all(p.builtin for p in host.plugins)
    assert "toy" not in host.families


# -- simulated plugins -------------------------------------------------------------


class _FakeDist:
    def __init__(self, name: str) -> None:
        self.name, self.version = name, "9.9"


class _FakeEntryPoint:
    def __init__(self, name: str, load: types.ModuleType | Exception) -> None:
        self.name, self.dist, self._load = name, _FakeDist(f"fake-{name}"), load

    def load(self) -> types.ModuleType:
        if isinstance(self._load, Exception):
            raise self._load
        return self._load


def _with_extra_entry_points(monkeypatch, *extra: _FakeEntryPoint) -> None:
    real = list(entry_points(group="autotransfer"))
    monkeypatch.setattr(plugins_module, "entry_points", lambda group: [*real, *extra])


def _module_with_family(family_name: str) -> tuple[types.ModuleType, type[BackboneFamily]]:
    cls = type("ImpostorFamily", (TimmFamily,), {"name": family_name, "__module__": "impostor"})
    module = types.ModuleType("impostor")

    @hookimpl
    def autotransfer_register_backbone_families() -> list[type[BackboneFamily]]:
        return [cls]

    module.autotransfer_register_backbone_families = autotransfer_register_backbone_families
    return module, cls


def test_two_plugins_with_one_family_name_is_an_error_naming_both(monkeypatch) -> None:
    module, _ = _module_with_family("timm")
    _with_extra_entry_points(monkeypatch, _FakeEntryPoint("impostor", module))
    with pytest.raises(PluginError) as err:
        PluginHost.load(autoload=True)
    message = str(err.value)
    assert "autotransfer.backbones.timm_family.TimmFamily" in message
    assert "impostor.ImpostorFamily" in message
    assert "'timm'" in message


def test_autoload_env_skips_third_party_entry_points(monkeypatch) -> None:
    loaded = []
    module, _ = _module_with_family("other")

    class Spy(_FakeEntryPoint):
        def load(self):
            loaded.append(self.name)
            return super().load()

    _with_extra_entry_points(monkeypatch, Spy("spy", module))
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    host = PluginHost.load()
    assert loaded == [] and set(host.families) == BUILTINS
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "0")
    assert "other" in PluginHost.load().families and loaded == ["spy"]


@pytest.fixture
def broken_dist(tmp_path: Path, monkeypatch) -> str:
    """A real (temporary) installed distribution whose entry point cannot import."""
    info = tmp_path / "autotransfer_broken-0.3.dist-info"
    info.mkdir()
    meta = "Metadata-Version: 2.1\nName: autotransfer-broken\nVersion: 0.3\n"
    (info / "METADATA").write_text(meta)
    (info / "entry_points.txt").write_text("[autotransfer]\nbroken = autotransfer_broken_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "broken"


def test_plugin_that_fails_to_import_is_reported_and_others_work(broken_dist, monkeypatch) -> None:
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    host = PluginHost.load()
    info = {p.name: p for p in host.plugins}[broken_dist]
    assert info.distribution == "autotransfer-broken" and info.version == "0.3"
    assert info.error and "ModuleNotFoundError" in info.error and not info.hooks
    assert (info.status, info.hook) == ("broken", "import")
    assert BUILTINS <= set(host.families)
    host.build(_ref("timm:test_resnet@none"), num_classes=2, image_size=32)

    monkeypatch.setattr(plugins_module, "get_plugin_host", lambda: host)
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0
    assert "broken" in result.stdout and "ModuleNotFoundError" in result.stdout
    assert "plugin 'broken' (autotransfer-broken 0.3) is broken and not in use: import: " \
        "ModuleNotFoundError" in result.stderr


def _ref(text: str):
    from autotransfer.spec.model import BackboneRef

    name, _, weights = text.partition("@")
    return BackboneRef(name=name, weights=weights)


# -- the listing commands (built-ins only) ---------------------------------------


def test_backbones_lists_families_with_plugin_and_version(monkeypatch) -> None:
    monkeypatch.setattr(plugins_module, "get_plugin_host", lambda: PluginHost.load(autoload=False))
    result = runner.invoke(app, ["backbones", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["family"]: r for r in json.loads(result.stdout)}
    assert set(rows) == BUILTINS
    assert rows["torchvision"]["models"] > 50 and rows["timm"]["models"] > 500
    assert rows["timm"]["distribution"] == "autotransfer" and rows["timm"]["version"]
    table = runner.invoke(app, ["backbones"])
    assert table.exit_code == 0 and "torchvision" in table.stdout


def test_backbones_filter_and_family(monkeypatch) -> None:
    monkeypatch.setattr(plugins_module, "get_plugin_host", lambda: PluginHost.load(autoload=False))
    result = runner.invoke(app, ["backbones", "--family", "torchvision", "--filter", "resnet1*",
                                 "--json"])
    assert result.exit_code == 0, result.output
    names = [r["name"] for r in json.loads(result.stdout)]
    assert names == ["torchvision:resnet101", "torchvision:resnet152", "torchvision:resnet18"]
    result = runner.invoke(app, ["backbones", "--filter", "resnet18", "--json"])
    assert {r["name"] for r in json.loads(result.stdout)} == {"timm:resnet18",
                                                              "torchvision:resnet18"}
    bad = runner.invoke(app, ["backbones", "--family", "nope"])
    assert bad.exit_code == 2 and "installed families: hf, timm, torchvision" in bad.stderr
