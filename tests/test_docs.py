"""docs/plugins.md keeps step with autotransfer/hookspecs.py: every hook is
documented with its signature."""

from __future__ import annotations

import inspect
from pathlib import Path

from autotransfer import hookspecs

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def _hookspecs() -> dict[str, str]:
    out = {}
    for name, fn in vars(hookspecs).items():
        if name.startswith("autotransfer_") and callable(fn):
            assert hasattr(fn, "autotransfer_spec"), f"{name} is not marked @hookspec"
            sig = inspect.signature(fn)
            params = ", ".join(str(p) for p in sig.parameters.values())
            ret = sig.return_annotation
            out[name] = f"{name}({params})" + (f" -> {ret}" if ret is not sig.empty else "")
    return out


def test_hookspecs_exist_and_are_named_by_convention() -> None:
    specs = _hookspecs()
    assert specs
    assert all(name.startswith("autotransfer_") for name in specs)


def test_every_hookspec_is_documented_with_its_signature() -> None:
    text = DOC.read_text(encoding="utf-8")
    for _name, signature in _hookspecs().items():
        assert f"### `{signature}`" in text, f"docs/plugins.md lacks the heading ### `{signature}`"


def test_docs_name_no_hook_that_does_not_exist() -> None:
    import re

    text = DOC.read_text(encoding="utf-8")
    documented = set(re.findall(r"^### `(autotransfer_\w+)\(", text, flags=re.M))
    assert documented == set(_hookspecs())


def test_every_hookspec_docstring_is_in_the_docs() -> None:
    """The hook reference in docs/plugins.md carries each hook's docstring."""
    text = " ".join(DOC.read_text(encoding="utf-8").split())
    for name in _hookspecs():
        doc = " ".join(inspect.getdoc(getattr(hookspecs, name)).split())
        assert doc in text, f"docs/plugins.md lacks the docstring of {name}"
