"""The Optuna range autotransfer supports holds: the installed Optuna is inside
the ``optuna`` range in pyproject.toml, the private names
``autotransfer/store/optuna_internals.py`` relies on still work, and no other
module of the package reaches into Optuna's private names."""

from __future__ import annotations

import logging
import re
import time
import warnings
from pathlib import Path

import optuna
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from autotransfer.store import optuna_internals
from autotransfer.store.storage import Heartbeat, open_storage

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = re.compile(
    r"\._(storage|study_id|trial_id|backend|get_stale_trial_ids|heartbeat|protocol)\b"
    r"|\boptuna(\.[a-z]\w*)*\._(?!_)\w+"
)


def _optuna_requirement() -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return next(r for r in map(Requirement, project["dependencies"]) if r.name == "optuna")


def test_installed_optuna_is_in_the_supported_range() -> None:
    spec = _optuna_requirement().specifier
    assert any(s.operator == "<" for s in spec), "the optuna range needs an upper bound"
    assert Version(optuna.__version__) in spec, (
        f"optuna {optuna.__version__} is outside {spec}; check "
        "autotransfer/store/optuna_internals.py against it, then widen the range"
    )


def test_the_private_names_still_work(tmp_path: Path) -> None:
    """Each helper on a real heartbeat storage: a trial that stops beating is
    seen as stale, by its storage id."""
    storage = open_storage(
        f"sqlite:///{tmp_path / 'o.db'}",
        Heartbeat(interval=1, grace_period=1, stale_trial_callback=lambda study, trial: None),
    )
    study = optuna.create_study(storage=storage, study_name="o")
    with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize"
        warnings.simplefilter("ignore", UserWarning)
        trial = study.ask()
    tid = optuna_internals.trial_id(trial)
    assert tid == optuna_internals.trial_id(study.trials[0])
    assert optuna_internals.storage_of(study).get_trial(tid).number == trial.number
    assert optuna_internals.heartbeat_enabled(study)
    assert optuna_internals.grace_period(study) == 1
    storage.record_heartbeat(tid)
    assert optuna_internals.stale_trial_ids(study) == []
    time.sleep(2.5)  # past the grace period (SQLite counts whole seconds): worker lost
    assert optuna_internals.stale_trial_ids(study) == [tid]
    study_read = optuna.load_study(study_name="o", storage=open_storage(storage.url))
    assert not optuna_internals.heartbeat_enabled(study_read)
    optimize = logging.getLogger(optuna_internals.OPTIMIZE_LOGGER)
    import optuna.study._optimize as optimize_module

    assert optimize_module._logger is optimize


def test_no_other_module_uses_optuna_private_names() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "autotransfer").rglob("*.py"))
        if path.name != "optuna_internals.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not found, (
        "Optuna private names outside autotransfer/store/optuna_internals.py; use a public "
        "API or add a helper there with its reason:\n" + "\n".join(found)
    )
    assert PRIVATE.search("study._storage") and PRIVATE.search("optuna.storages._heartbeat")
    assert not PRIVATE.search("optuna.__version__")
