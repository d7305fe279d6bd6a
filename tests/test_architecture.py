"""The package's layers hold: import-linter checks the contracts in pyproject.toml
(``[tool.importlinter]``; the picture is docs/architecture.md). An upward import
or an import circle between modules of one package fails here with a message
that names the modules and the import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("import-linter is missing; .ci/run installs the test extra, which has it")
        pytest.skip("import-linter is not installed (test extra: pip install -e '.[test]')")
    return exe


def _run(exe: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def test_layer_contracts_are_kept() -> None:
    result = _run(_lint_imports(), ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Layers import only downward KEPT" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The contracts are live: a copy of the package where the engine imports
    the CLI, and where two store modules import each other, is refused, and the
    message names both offences."""
    exe = _lint_imports()
    shutil.copytree(ROOT / "autotransfer", tmp_path / "autotransfer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    trainer = tmp_path / "autotransfer" / "engine" / "trainer.py"
    trainer.write_text(trainer.read_text() + "\nimport autotransfer.cli.render  # noqa\n")
    (tmp_path / "autotransfer" / "store" / "ring_a.py").write_text(
        "import autotransfer.store.ring_b  # noqa\n")
    (tmp_path / "autotransfer" / "store" / "ring_b.py").write_text(textwrap.dedent(
        "import autotransfer.store.ring_a  # noqa\n"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = _run(exe, tmp_path, env)
    assert result.returncode != 0
    assert "autotransfer.engine is not allowed to import autotransfer.cli" in result.stdout
    assert "No cycles are allowed in autotransfer.store" in result.stdout
