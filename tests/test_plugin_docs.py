"""The examples in docs/plugins.md are complete and correct: every code block
that starts with ``# file: PATH`` is written out as a distribution (its
``pyproject.toml`` declares the entry points), pip-installed into a temporary
folder (not into the shared environment), loaded through its entry points, and
the documented conformance test file is run on it with pytest."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import autotransfer.plugins.host as host_module
from autotransfer.plugins.host import DISABLE_AUTOLOAD_ENV, PluginHost

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
BLOCK = re.compile(r"```(?:python|toml)\n# file: (\S+)\n(.*?)```", re.S)


def documented_files() -> dict[str, str]:
    return {path: body for path, body in BLOCK.findall(DOC.read_text(encoding="utf-8"))}


def test_the_docs_hold_a_whole_distribution() -> None:
    files = documented_files()
    assert {"pyproject.toml", "src/example_families/image.py", "src/example_families/text.py",
            "tests/test_conformance.py"} <= set(files)


def test_documented_examples_install_load_and_pass_the_conformance_suite(
    tmp_path: Path, monkeypatch
) -> None:
    dist, site = tmp_path / "dist", tmp_path / "site"
    for path, body in documented_files().items():
        (dist / path).parent.mkdir(parents=True, exist_ok=True)
        (dist / path).write_text(body, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install",
         "--no-deps", "--no-build-isolation", "--target", str(site), str(dist)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr

    # In this process: both entry points load and register their families.
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    importlib.invalidate_caches()
    try:
        host = PluginHost.load()
        info = {p.name: p for p in host.plugins}
        for name in ("tinycnn", "bagtext"):
            assert info[name].status == "loaded", info[name]
            assert info[name].distribution == "autotransfer-example-families"
        assert host.list_models("tinycnn") == ["cnn-m", "cnn-s"]
        assert host.list_models("bagtext", "bag-*") == ["bag-m", "bag-s"]
    finally:
        for module in [m for m in sys.modules if m.startswith("example_families")]:
            del sys.modules[module]
        host_module.get_plugin_host.cache_clear()

    # The documented test file, as the plugin's author would run it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    tests = dist / "tests" / "test_conformance.py"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(dist), str(tests)],
        capture_output=True, text=True, check=False, env=env, cwd=dist,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    from autotransfer.testing import backbone_family as suite

    checks = [name for name in suite.__all__ if name.startswith("test_")]
    assert passed and int(passed.group(1)) == 3 * len(checks), run.stdout[-2000:]
