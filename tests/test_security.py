"""Security: a storage password never shows (output, logs, errors, trial
attributes, exports); plugin allow/deny lists; export paths stay inside."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autotransfer.cli import app

SECRET = "S3cretPw-7f2e"


def _run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout + result.stderr + repr(result.exception or "")


def _files_holding(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_storage_password_never_appears(
    write_spec, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # SQLite ignores the query (with a warning): a URL that carries a secret and works.
    url = f"sqlite:///{tmp_path / 'study.db'}?password={SECRET}"
    spec = write_spec(**{"train.epochs": 1, "n_trials": 1})
    outputs = []
    code, out = _run("search", spec, "--storage", url, "--export", tmp_path / "model", "--json")
    assert code == 0, out
    outputs.append(out)
    for args in (["trials", "--storage", url], ["trials", "--storage", url, "--json"],
                 ["export", "--storage", url, tmp_path / "model2"],
                 ["report", "--storage", url, tmp_path / "report.html"]):
        code, out = _run(*args)
        assert code == 0, out
        outputs.append(out)
    # Errors: every way a URL with a password can be refused.
    bad_urls = [
        f"sqlite://scott:{SECRET}@/relative.db",  # SQLite takes no password
        f"postgresql+psycopg://scott:{SECRET}@127.0.0.1:1/db",  # no driver, or refused
        f"mysql://scott:{SECRET}@127.0.0.1:1/db",
        f"foo://scott:{SECRET}@host/db",  # unknown scheme
        f"postgres//scott:{SECRET}@host/db",  # not a URL at all
        f"sqlite:///{tmp_path}/no/such/dir/s.db?token={SECRET}",
    ]
    for bad in bad_urls:
        for args in (["search", spec], ["trials"]):
            code, out = _run(*args, "--storage", bad)
            assert code == 2, (bad, out)
            assert "***" in out or "no/such/dir" in out, out
            outputs.append(out)
    # A spec that names a storage URL (not a spec key) does not echo it.
    secret_spec = write_spec(storage=f"postgresql://u:{SECRET}@h/db")
    code, out = _run("search", secret_spec, "--storage", url)
    assert code == 2 and "storage: unknown key" in out, out
    outputs.append(out)

    leaks = [o for o in outputs if SECRET in o]
    assert not leaks, leaks[0]
    assert SECRET not in caplog.text
    # Trial and study attributes, checkpoints, the export (config, model card).
    assert _files_holding(tmp_path, SECRET) == [secret_spec]  # only the user's own file
    assert (tmp_path / "model" / "config.json").exists()
    assert (tmp_path / "report.html").exists()


# ---------------------------------------------------------------- plugins


class _FakeEntryPoint:
    """A third-party entry point; ``load`` records that its code ran."""

    def __init__(self, name: str, loaded: list[str]) -> None:
        import types

        self.name, self.group, self._loaded = name, "autotransfer", loaded
        self.dist = types.SimpleNamespace(name=f"autotransfer-{name}", version="1.0")
        self._module = types.ModuleType(f"fake_{name}")

    def load(self):
        self._loaded.append(self.name)
        return self._module


@pytest.mark.parametrize(
    ("allow", "deny", "expected"),
    [
        (None, None, ["alpha", "beta"]),
        ("alpha", None, ["alpha"]),
        (None, "beta", ["alpha"]),
        ("alpha,beta", " beta ,", ["alpha"]),  # deny wins; spaces and empties ignored
        ("", "", ["alpha", "beta"]),  # empty means unset
    ],
)
def test_plugin_allow_and_deny_lists(monkeypatch, allow, deny, expected) -> None:
    import autotransfer.plugins.host as plugins

    real = plugins.entry_points(group=plugins.ENTRY_POINT_GROUP)
    loaded: list[str] = []
    fakes = [_FakeEntryPoint("alpha", loaded), _FakeEntryPoint("beta", loaded)]
    monkeypatch.setattr(plugins, "entry_points", lambda group: [*real, *fakes])
    for env, value in ((plugins.ALLOW_ENV, allow), (plugins.DENY_ENV, deny)):
        if value is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, value)
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    host = plugins.PluginHost.load()
    assert loaded == expected  # a refused plugin is never imported
    info = {p.name: p for p in host.plugins}
    for name in {"alpha", "beta"} - set(expected):
        assert info[name].error is not None and "not loaded" in info[name].error
    assert "timm" in host.families  # built-ins are not subject to the lists

    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")  # built-ins only
    loaded.clear()
    plugins.PluginHost.load()
    assert loaded == []


# ------------------------------------------------------------ paths stay inside


@pytest.mark.parametrize(
    "artifact_id",
    ["../outside", "../../etc/passwd", "/etc/passwd", "..%2f..%2foutside", "%2e%2e",
     "a/../../b", "..\\\\outside", "", 42],
)
def test_a_tampered_checkpoint_id_is_not_read(artifact_id, plugin_host, tmp_path: Path) -> None:
    import optuna

    from autotransfer.exceptions import StorageError
    from autotransfer.store.checkpoints import load_trial_backbone
    from autotransfer.store.storage import artifact_store

    key = "timm:test_resnet@none"
    trial = optuna.trial.create_trial(
        value=1.0, params={"backbone": key},
        distributions={"backbone": optuna.distributions.CategoricalDistribution([key])},
        user_attrs={"checkpoint": artifact_id})
    (tmp_path / "outside").write_bytes(b"not for you")
    store = artifact_store(tmp_path / "store")
    with pytest.raises(StorageError, match="is not an artifact id"):
        load_trial_backbone(trial, plugin_host, store, num_classes=3, image_size=32)


@pytest.mark.parametrize("kind", ["to an outside dir", "dangling", "to the parent"])
def test_export_to_a_symlink_is_refused(kind: str, tmp_path: Path) -> None:
    from autotransfer.exceptions import ExportError
    from autotransfer.export.writer import check_target

    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "work"
    inside.mkdir()
    link = inside / "model"
    target = {"to an outside dir": outside, "dangling": tmp_path / "gone",
              "to the parent": inside}[kind]
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(ExportError, match="symbolic link"):
        check_target(link)
    assert list(outside.iterdir()) == []


# --- Hugging Face remote code: off unless trusted AND pinned -----------------

_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("backbone", "needle"),
    [
        ({"name": "hf:org/model", "trust_remote_code": True}, "needs a pinned commit"),
        ({"name": "hf:org/model", "trust_remote_code": True, "revision": "main"},
         "not a commit hash"),
        ({"name": "timm:resnet18", "trust_remote_code": True, "revision": _SHA},
         "hf backbones only"),
    ],
)
def test_remote_code_needs_hf_and_a_pinned_commit(backbone: dict, needle: str) -> None:
    from autotransfer.exceptions import SpecError
    from autotransfer.spec.model import validate_spec

    raw = {"name": "s", "data": {"path": "sklearn:digits"}, "search": {"backbones": [backbone]}}
    with pytest.raises(SpecError, match=needle):
        validate_spec(raw)


def test_remote_code_is_off_by_default_and_passed_only_when_pinned(monkeypatch) -> None:
    pytest.importorskip("transformers")
    import transformers

    from autotransfer.exceptions import BackboneError
    from autotransfer.plugins.host import PluginHost
    from autotransfer.spec.model import BackboneRef

    seen: list[dict] = []

    def fake_config(*args, **kwargs):
        seen.append(kwargs)
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_config)
    host = PluginHost.load()
    for ref in (
        BackboneRef(name="hf:org/model"),
        BackboneRef(name="hf:org/model", trust_remote_code=True, revision=_SHA),
    ):
        with pytest.raises(BackboneError, match="could not load hf:org/model"):
            host.build(ref, num_classes=2, image_size=32)
    assert seen[0].get("trust_remote_code") is False and "revision" not in seen[0]
    assert seen[1]["trust_remote_code"] is True and seen[1]["revision"] == _SHA


def test_rebuilding_a_trial_keeps_its_pinned_revision(monkeypatch, tmp_path: Path) -> None:
    """Export and test metrics rebuild a trial's model from the spec's entry, so a
    remote-code hf backbone is rebuilt at the commit the trial trained with."""
    import optuna

    from autotransfer.plugins.host import PluginHost
    from autotransfer.spec.model import BackboneRef
    from autotransfer.store.checkpoints import load_trial_backbone
    from autotransfer.store.storage import artifact_store

    pinned = BackboneRef(name="hf:org/model", trust_remote_code=True, revision=_SHA)
    key = pinned.key
    trial = optuna.trial.create_trial(
        value=1.0, params={"backbone": key},
        distributions={"backbone": optuna.distributions.CategoricalDistribution([key])},
        user_attrs={"checkpoint": "0f" * 16})
    host = PluginHost.load()
    built: list[BackboneRef] = []

    def build(ref, **kwargs):
        built.append(ref)
        raise RuntimeError("stop here")

    monkeypatch.setattr(host, "build", build)
    store = artifact_store(tmp_path / "store")
    for listed in ([pinned], [BackboneRef(name="hf:other/model"), pinned]):
        with pytest.raises(RuntimeError, match="stop here"):
            load_trial_backbone(trial, host, store, num_classes=2, image_size=32, listed=listed)
        assert built[-1].trust_remote_code and built[-1].revision == _SHA
        assert built[-1].name == "hf:org/model" and built[-1].weights == "none"


def test_no_plugin_is_ever_loaded_from_the_working_directory(tmp_path, monkeypatch) -> None:
    import sys
    from importlib.metadata import EntryPoint

    import autotransfer.plugins.host as plugins

    marker = tmp_path / "ran"
    (tmp_path / "cwd_plugin_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", str(tmp_path), *sys.path])
    real = plugins.entry_points
    fake = EntryPoint(name="cwdplugin", value="cwd_plugin_mod", group="autotransfer")
    monkeypatch.setattr(
        plugins, "entry_points", lambda group: [*real(group=group), fake]
    )
    host = plugins.PluginHost.load(autoload=True)
    info = {p.name: p for p in host.plugins}
    assert info["cwdplugin"].error and "ModuleNotFoundError" in info["cwdplugin"].error
    assert not marker.exists()
    assert "timm" in host.families  # the installed plugins still load
