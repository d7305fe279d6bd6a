"""The final refit on train + validation (`export.refit`, `autotransfer export --refit`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _export_helpers import TinyExport, tiny_export
from safetensors.torch import load_file
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.data.datasets import load_splits
from autotransfer.engine.trainer import evaluate
from autotransfer.export.writer import export_trial
from autotransfer.plugins.host import get_plugin_host
from autotransfer.store.checkpoints import load_trial_backbone
from autotransfer.store.records import ARTIFACTS_ATTR, BEST_EPOCH_ATTR, SPEC_ATTR
from autotransfer.store.storage import artifact_store
from autotransfer.store.studies import spec_changes
from autotransfer.store.summary import best_trial

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory.getbasetemp())


def test_refit_trains_on_train_and_val_and_reports_its_test_metrics(
    tiny: TinyExport, tmp_path: Path
) -> None:
    lines: list[str] = []
    result = export_trial(tiny.study, tmp_path / "refit", message=lines.append, refit=True)
    assert result.refit
    c = result.config
    splits = load_splits(tiny.spec.data)
    best = best_trial(tiny.study)
    epochs = best.user_attrs[BEST_EPOCH_ATTR]
    n = len(splits.train) + len(splits.val)
    assert len(splits.val) > 0
    assert c["model"]["kind"] == "refit" and c["model"]["trained_on"] == "train+val"
    assert c["model"]["epochs"] == epochs
    assert c["model"]["train_examples"] == n
    assert c["model"]["examples_seen"] == epochs * n  # every train and val example, each epoch
    assert any("train + validation" in line for line in lines)

    # The test metrics are the exported weights' own, not the trial's.
    test = c["metrics"]["test"]
    assert test["n"] == len(splits.test)
    store = artifact_store(Path(tiny.study.user_attrs[ARTIFACTS_ATTR]))
    backbone = load_trial_backbone(
        best, get_plugin_host(), store, num_classes=3, image_size=32,
        listed=tiny.spec.search.backbones,
    )
    trial_state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    exported = load_file(str(result.path / "model.safetensors"))
    assert any(not (exported[k] == trial_state[k]).all() for k in trial_state)
    backbone.model.load_state_dict(exported)
    m = evaluate(backbone, splits.test).record(list(splits.classes))
    assert m["accuracy"] == pytest.approx(test["accuracy"])
    assert m["confusion"] == test["confusion"]
    trial_test = json.loads((tiny.export / "config.json").read_text())["metrics"]["test"]
    assert c["metrics"]["trial_test"] == trial_test

    card = (result.path / "README.md").read_text()
    assert "**refit**" in card and f"for {epochs} epoch(s)" in card
    assert f"train + validation ({n} images)" in card
    assert "test, this refit model" in card and "test, trial" in card


def test_a_refit_ensemble_is_the_default(tiny: TinyExport, tmp_path: Path) -> None:
    """A spec that says nothing exports the greedy ensemble, its members refit; the
    stored spec's own choice wins (the fixture's says neither)."""
    from autotransfer.spec.model import ExportSpec

    assert ExportSpec().refit is True and ExportSpec().ensemble is True
    stored = tiny.study.user_attrs[SPEC_ATTR]
    tiny.study.set_user_attr(SPEC_ATTR, {k: v for k, v in stored.items() if k != "export"})
    try:
        result = export_trial(tiny.study, tmp_path / "default")
    finally:
        tiny.study.set_user_attr(SPEC_ATTR, stored)
    assert result.refit and result.ensemble
    assert result.config["model"]["kind"] == "ensemble"
    assert result.config["model"]["trained_on"] == "train+val"


def test_no_refit_export_holds_the_trial_weights(tiny: TinyExport) -> None:
    c = json.loads((tiny.export / "config.json").read_text())
    best = best_trial(tiny.study)
    assert c["model"] == {
        "kind": "trial", "trained_on": "train", "epochs": best.user_attrs[BEST_EPOCH_ATTR],
    }
    assert "trial_test" not in c["metrics"]
    card = (tiny.export / "README.md").read_text()
    assert f"trial {best.number}'s best checkpoint" in card and "**refit**" not in card


def test_cli_follows_the_spec_and_the_flag_overrides_it(tiny: TinyExport, tmp_path: Path) -> None:
    """`export.refit: true` in the stored spec makes `autotransfer export` refit;
    `--no-refit` exports the trial's weights instead."""
    args = ["export", "--storage", tiny.storage, "--study-name", "tiny-export"]
    stored = tiny.study.user_attrs[SPEC_ATTR]
    tiny.study.set_user_attr(SPEC_ATTR, {**stored, "export": {"refit": True, "ensemble": False}})
    try:
        refit = runner.invoke(app, [*args, str(tmp_path / "a")])
        plain = runner.invoke(app, [*args, str(tmp_path / "b"), "--no-refit"])
    finally:
        tiny.study.set_user_attr(SPEC_ATTR, stored)
    assert refit.exit_code == 0, refit.output
    assert "refit on train+val for" in refit.stdout and "test_acc" in refit.stdout
    assert "'s own weights: test_acc" in refit.stdout
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model"]["kind"] == "refit"
    assert plain.exit_code == 0, plain.output
    assert "trial weights)" in plain.stdout and "refit on" not in plain.stdout
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model"]["kind"] == "trial"


def test_export_refit_may_change_on_resume(tiny: TinyExport) -> None:
    stored = tiny.spec.model_dump(mode="json")
    assert stored["export"] == {"refit": False, "ensemble": False}
    changed = tiny.spec.model_copy(
        update={"export": tiny.spec.export.model_copy(update={"refit": True, "ensemble": True})}
    )
    assert spec_changes(stored, changed.model_dump(mode="json")) == []
