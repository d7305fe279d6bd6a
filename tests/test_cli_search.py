"""A whole study through the command line, on tiny data; `trials` output."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.engine.trainer import evaluate
from autotransfer.store.checkpoints import load_trial_backbone
from autotransfer.store.storage import artifact_store
from autotransfer.store.studies import load_study, stored_spec
from autotransfer.tuning.search import prepare_data

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_study(tmp_path_factory, tiny_images: Path, spec_dict):
    """One tiny study run through `autotransfer search --json` (3 trials, 2 epochs,
    Hyperband pruning), shared by the tests of this module, which only read it."""
    import yaml

    root = tmp_path_factory.mktemp("cli-study")
    spec = root / "study.yaml"
    raw = spec_dict(tiny_images, **{
        "name": "cli-tiny", "n_trials": 3,
        "pruner": {"type": "hyperband", "min_resource": 1, "reduction_factor": 3},
        "sampler": {"type": "tpe", "n_startup_trials": 2},
        "search.backbones": ["timm:test_resnet@none", "timm:test_vit@none"],
    })
    spec.write_text(yaml.safe_dump(raw))
    storage = f"sqlite:///{root / 'studies.db'}"
    result = invoke("search", spec, "--storage", storage, "--json")
    return result, storage, root


def test_search_runs_a_whole_study(cli_study) -> None:
    result, storage, root = cli_study
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # stdout is only the JSON document
    assert out["study"] == "cli-tiny" and out["new_trials"] == 3
    trials = out["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert all(t["state"] in ("COMPLETE", "PRUNED") for t in trials)
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert complete
    # the highest validation accuracy; ties: the lowest validation loss, then the earliest
    best = max(complete, key=lambda t: (t["value"], -t["val_loss"], -t["number"]))
    assert out["best_trial"] == best["number"] and out["val_accuracy"] == best["value"]
    assert out["best_params"] == best["params"]
    assert set(out["best_params"]) == {"backbone", "freeze", "lr", "trunk_lr_scale", "weight_decay",
                                       "batch_size", "retention", "alpha", "probe_fraction"}
    assert out["test"]["n"] == 9 and 0 <= out["test"]["accuracy"] <= 1
    for t in complete:
        assert t["checkpoint"] and t["best_epoch"] in (1, 2) and t["epochs_run"] == 2
        assert 0 <= t["frozen_blocks"] <= t["n_blocks"]
        assert t["value"] == t["val_accuracy"]
    for t in trials:
        if t["state"] == "PRUNED":
            assert t["pruned_at_epoch"] == 1 and t["checkpoint"] is None
    # Progress went to stderr, one line per epoch at least; no warnings or tracebacks.
    err = result.stderr
    assert "study 'cli-tiny': 0 trial(s) stored" in err and "trial 0 epoch 1/2" in err
    assert "Warning" not in err and "Traceback" not in err
    assert (root / "autotransfer-artifacts").is_dir()  # checkpoints beside the SQLite file
    # The images, decoded once into a file there that the trials read (mapped).
    assert len(list((root / "autotransfer-artifacts" / "decoded").glob("images-32px-*/"))) == 1


def test_values_are_best_epochs_and_checkpoints_reload(cli_study, plugin_host) -> None:
    _, storage, root = cli_study
    study = load_study(storage, "cli-tiny")
    spec = stored_spec(study)
    splits, _ = prepare_data(spec)
    store = artifact_store(root / "autotransfer-artifacts")
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        assert t.value == max(t.intermediate_values.values())
        backbone = load_trial_backbone(t, plugin_host, store, num_classes=3, image_size=32)
        assert evaluate(backbone, splits.val).accuracy == t.value


def test_trials_json(cli_study) -> None:
    search_result, storage, _ = cli_study
    result = invoke("trials", "--storage", storage, "--json")  # the only study: no name needed
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    searched = json.loads(search_result.stdout)
    assert out["study"] == "cli-tiny"
    assert out["best_trial"] == searched["best_trial"]
    assert out["trials"] == searched["trials"]
    test = out["test_metrics"][str(out["best_trial"])]
    assert test == searched["test"] and test["accuracy"] == searched["test"]["accuracy"]
    # Per class: precision, recall, F1 and support, and the confusion matrix (rows: true
    # class, columns: predicted), consistent with the accuracy over the 9 test images.
    assert test["classes"] == ["blue", "green", "red"] and test["n"] == 9
    assert [m["support"] for m in test["per_class"].values()] == [3, 3, 3]
    confusion = test["confusion"]
    assert [sum(row) for row in confusion] == [3, 3, 3]
    assert sum(confusion[i][i] for i in range(3)) / 9 == pytest.approx(test["accuracy"])
    for i, name in enumerate(test["classes"]):
        m = test["per_class"][name]
        assert m["recall"] == pytest.approx(confusion[i][i] / 3)
        predicted = sum(row[i] for row in confusion)
        assert m["precision"] == pytest.approx(confusion[i][i] / predicted if predicted else 0)
    f1 = [m["f1"] for m in test["per_class"].values()]
    assert sum(f1) / 3 == pytest.approx(test["macro_f1"])
    expected_keys = {"number", "state", "value", "params", "frozen_blocks", "n_blocks",
                     "val_accuracy", "val_f1", "best_epoch", "epochs_run", "pruned_at_epoch",
                     "fail_reason", "seconds", "checkpoint"}
    assert all(expected_keys <= set(t) for t in out["trials"])


def test_trials_table(cli_study) -> None:
    _, storage, _ = cli_study
    result = invoke("trials", "--storage", storage, "--study-name", "cli-tiny")
    assert result.exit_code == 0, result.output
    assert "study cli-tiny" in result.stdout and "◀ best" in result.stdout
    assert "timm:test_" in result.stdout


def test_search_again_with_flags_resumes(write_spec, tmp_path: Path, tiny_images: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    spec = write_spec(**{"name": "resume-cli"})
    flags = ["--n-trials", "1", "--epochs", "1", "--backbones", "timm:test_vit@none",
             "--data", tiny_images, "--seed", "3", "--storage", storage]
    first = invoke("search", spec, *flags, "--json")
    assert first.exit_code == 0, first.output
    second = invoke("search", spec, *flags, "--json")
    assert second.exit_code == 0, second.output
    out = json.loads(second.stdout)
    assert out["study"] == "resume-cli" and out["new_trials"] == 1
    assert len(out["trials"]) == 2
    assert out["trials"][0] == json.loads(first.stdout)["trials"][0]
    assert "resume-cli': 1 trial(s) stored" in second.stderr
    assert all(t["params"]["backbone"] == "timm:test_vit@none" for t in out["trials"])
    assert all(t["epochs_run"] == 1 for t in out["trials"])
    # --study-name starts a separate study in the same storage.
    other = invoke("search", spec, *flags, "--study-name", "other")
    assert other.exit_code == 0, other.output
    assert "best: trial 0" in other.stdout
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == ["other", "resume-cli"]
