"""`autotransfer export --ensemble`: a greedy ensemble of the completed trials,
chosen on validation, exported as one model (autotransfer.tuning.ensemble)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _export_helpers import TinyExport, tiny_export
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.exceptions import ExportError
from autotransfer.export.writer import export_trial
from autotransfer.plugins.host import get_plugin_host
from autotransfer.store.storage import artifact_store
from autotransfer.store.studies import stored_spec
from autotransfer.store.summary import best_trial
from autotransfer.tuning.ensemble import EnsembleModel, greedy_selection
from autotransfer.tuning.refit import refit_trial

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory.getbasetemp())


def test_greedy_selection_adds_only_what_raises_validation() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.55, 0.45]])  # 3 of 4
    b = torch.tensor([[0.4, 0.6], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])  # 3 of 4, worse log-loss
    c = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # all wrong
    chosen = greedy_selection([c, a, b], labels, criterion="accuracy")
    assert chosen[0] == 1 and set(chosen) == {1, 2}  # a + b: 4 of 4; c never
    assert greedy_selection([c, c], labels, criterion="accuracy") == [0]


def test_greedy_selection_on_log_loss_adds_what_lowers_it() -> None:
    """Same accuracy, different confidence: the log-loss greedy adds the member
    whose probabilities lower the mean's log-loss, never one that raises it."""
    labels = torch.tensor([0, 1, 0, 1])
    sure = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.6, 0.4]])  # 3 of 4
    # 3 of 4 (the same miss) and a worse log-loss alone, but sure where `sure` is not
    other = torch.tensor([[0.6, 0.4], [0.45, 0.55], [0.95, 0.05], [0.55, 0.45]])
    bad = torch.tensor([[0.01, 0.99], [0.99, 0.01], [0.01, 0.99], [0.99, 0.01]])
    chosen = greedy_selection([sure, other, bad], labels)
    assert chosen[0] == 0 and 1 in chosen and 2 not in chosen
    assert greedy_selection([sure, other, bad], labels, first=2)[0] == 2  # starts there


def test_ensemble_model_is_the_weighted_mean_of_probabilities() -> None:
    torch.manual_seed(0)
    m1, m2 = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    out = EnsembleModel([m1, m2], [2, 1])(x)
    want = (2 * torch.softmax(m1(x), 1) + torch.softmax(m2(x), 1)) / 3
    assert torch.allclose(torch.softmax(out, 1), want, atol=1e-6)


def test_export_ensemble_writes_one_model_that_predicts(tiny: TinyExport, tmp_path: Path) -> None:
    import autotransfer

    lines: list[str] = []
    result = export_trial(tiny.study, tmp_path / "ens", message=lines.append, ensemble=True)
    c = result.config
    held = c["model"]
    assert result.ensemble and not result.refit and held["kind"] == "ensemble"
    complete = {t.number for t in tiny.study.trials if t.state.name == "COMPLETE"}
    assert {m["trial"] for m in held["members"]} <= complete
    assert held["members"][0]["trial"] == best_trial(tiny.study).number
    assert held["val_accuracy"] >= tiny.study.best_value  # starts from the best trial
    assert c["metrics"]["test"]["n"] > 0 and "trial_test" in c["metrics"]
    assert c["verification"]  # the programs were checked against the ensemble
    card = (result.path / "README.md").read_text()
    assert "**ensemble**" in card and "test, this ensemble" in card
    assert any("export: ensemble of trials" in line for line in lines)
    images = sorted(tiny.data.rglob("*.png"))[:4]
    for runtime in ("onnx", "torchscript"):
        got = autotransfer.load(result.path, runtime).predict([str(p) for p in images])
        assert len(got) == 4 and all(0.0 <= p.probability <= 1.0 for p in got)
    probs = [p.probability for p in autotransfer.load(result.path, "onnx").predict(
        [str(p) for p in images])]
    assert np.all(np.isfinite(probs))


def test_a_refit_ensemble_refits_each_member_with_the_chosen_weights(
    tiny: TinyExport, tmp_path: Path
) -> None:
    """With the refit on, the same members and weights as the checkpoint ensemble,
    each member trained again on train + validation exactly as a single refit."""
    from autotransfer.export.choose import refit_data

    plain = export_trial(tiny.study, tmp_path / "plain", ensemble=True, refit=False)
    lines: list[str] = []
    result = export_trial(tiny.study, tmp_path / "refit", message=lines.append, ensemble=True,
                          refit=True)
    held, before = result.config["model"], plain.config["model"]
    assert result.ensemble and result.refit and held["kind"] == "ensemble"
    assert held["trained_on"] == "train+val" and before["trained_on"] == "train"
    assert [(m["trial"], m["weight"]) for m in held["members"]] == [
        (m["trial"], m["weight"]) for m in before["members"]]
    assert all(m["epochs"] >= 1 for m in held["members"])
    splits, source = refit_data(stored_spec(tiny.study))
    assert held["train_examples"] == len(splits.train) + len(splits.val)
    assert held["val_accuracy"] == before["val_accuracy"]  # the selection's score
    assert sum("refitting member" in line for line in lines) == len(held["members"])
    assert "each trained again" in (result.path / "README.md").read_text()

    # member 1 is the single refit of its trial, bit for bit
    from safetensors.torch import load_file

    first = next(t for t in tiny.study.trials if t.number == held["members"][0]["trial"])
    spec = stored_spec(tiny.study)
    alone = refit_trial(first, spec, get_plugin_host(),
                        artifact_store(Path(tiny.study.user_attrs["artifacts"])), splits, source)
    weights = load_file(str(result.path / "model.safetensors"))
    mine = {k.removeprefix("members.0."): v for k, v in weights.items()
            if k.startswith("members.0.")}
    theirs = alone.backbone.model.state_dict()
    assert mine and mine.keys() <= theirs.keys()
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k
    checkpoint = load_file(str(plain.path / "model.safetensors"))
    assert any(not torch.equal(v, checkpoint[k]) for k, v in weights.items()
               if k.startswith("members.0.") and v.is_floating_point())


def test_cli_flag_and_its_conflict_with_trial(tiny: TinyExport, tmp_path: Path) -> None:
    args = ["export", "--storage", tiny.storage, "--study-name", "tiny-export"]
    ok = runner.invoke(app, [*args, str(tmp_path / "a"), "--ensemble"])
    assert ok.exit_code == 0, ok.output
    assert "ensemble of trials" in ok.stdout
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model"]["kind"] == "ensemble"
    bad = runner.invoke(app, [*args, str(tmp_path / "b"), "--ensemble", "--trial", "0"])
    assert bad.exit_code == 2 and "exclude each other" in bad.output
    with pytest.raises(ExportError, match="exclude each other"):
        export_trial(tiny.study, tmp_path / "c", 0, ensemble=True)


def test_a_spec_that_asks_for_an_ensemble_still_exports_a_trial_by_number(
    tiny: TinyExport, tmp_path: Path
) -> None:
    from autotransfer.store.records import SPEC_ATTR

    stored = tiny.study.user_attrs[SPEC_ATTR]
    tiny.study.set_user_attr(SPEC_ATTR, {**stored, "export": {**stored["export"],
                                                              "ensemble": True}})
    try:
        single = export_trial(tiny.study, tmp_path / "one", 0)
        assert not single.ensemble and single.config["model"]["kind"] == "trial"
        assert export_trial(tiny.study, tmp_path / "all").config["model"]["kind"] == "ensemble"
    finally:
        tiny.study.set_user_attr(SPEC_ATTR, stored)
