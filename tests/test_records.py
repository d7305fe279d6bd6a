"""Every study and trial attribute name is defined once, in
``autotransfer/store/records.py``, and used by name: a string literal as the
name in ``set_user_attr("...")``, ``user_attrs.get("...")``,
``user_attrs["..."]``, ``set_trial_user_attr(id, "...")`` or the system-attribute
equivalents anywhere in the package fails here, with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

from autotransfer.store import records

PACKAGE = Path(__file__).resolve().parents[1] / "autotransfer"
SETTERS = {"set_user_attr": 0, "set_system_attr": 0,
           "set_trial_user_attr": 1, "set_trial_system_attr": 1}
READERS = {"get", "pop", "setdefault"}
ATTR_MAPS = {"user_attrs", "system_attrs", "get_study_user_attrs", "get_study_system_attrs",
             "get_trial_user_attrs", "get_trial_system_attrs"}


def _is_literal(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _attr_map(node: ast.AST, aliases: set[str]) -> bool:
    """``x.user_attrs``, ``storage.get_study_user_attrs(...)`` or a name bound to one."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr in ATTR_MAPS
    return isinstance(node, ast.Name) and node.id in aliases


def literal_attr_names(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: code`` of every attribute name given as a string literal."""
    tree = ast.parse(source, filename)
    aliases = {
        target.id
        for node in ast.walk(tree) if isinstance(node, ast.Assign) and _attr_map(node.value, set())
        for target in node.targets if isinstance(target, ast.Name)
    }
    found = []
    for node in ast.walk(tree):
        name_arg: ast.AST | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            position = SETTERS.get(node.func.attr)
            if position is not None and len(node.args) > position:
                name_arg = node.args[position]
            elif node.func.attr in READERS and node.args and _attr_map(node.func.value, aliases):
                name_arg = node.args[0]
        elif isinstance(node, ast.Subscript) and _attr_map(node.value, aliases):
            name_arg = node.slice
        if _is_literal(name_arg):
            found.append(f"{filename}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_no_attribute_name_is_a_string_literal() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += literal_attr_names(path.read_text(encoding="utf-8"),
                                    str(path.relative_to(PACKAGE.parent)))
    assert not found, (
        "attribute names given as string literals; define each in "
        "autotransfer/store/records.py and use it by name:\n" + "\n".join(found)
    )


def test_the_check_finds_literals() -> None:
    """The check is live: each form it refuses is found, names are not."""
    source = (
        "trial.set_user_attr('seconds', 1)\n"
        "storage.set_trial_user_attr(trial_id, 'fail_reason', 'x')\n"
        "study.user_attrs.get('spec')\n"
        "frozen.system_attrs['failed_trial']\n"
        "a = best.user_attrs\n"
        "a.get('val_f1')\n"
        "storage.get_study_user_attrs(1).get('target_trials')\n"
        "trial.set_user_attr(SECONDS_ATTR, 1)\n"
        "study.user_attrs.get(SPEC_ATTR)\n"
        "config.get('labels')\n"
    )
    found = literal_attr_names(source)
    assert [line.split(":")[1] for line in found] == ["1", "2", "3", "4", "6", "7"]


def test_each_name_is_defined_once() -> None:
    """records.py holds each stored string once, and no other module defines an
    ``*_ATTR`` name of its own."""
    names = {k: v for k, v in vars(records).items() if k.endswith("_ATTR")}
    assert len(names) >= 20
    assert len(set(names.values())) == len(names), "two names for one stored attribute"
    elsewhere = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "records.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and _is_literal(node.value)
                    and any(isinstance(t, ast.Name) and t.id.endswith("_ATTR")
                            for t in node.targets)):
                elsewhere.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not elsewhere, "attribute names defined outside store/records.py: " + ", ".join(
        elsewhere)
