"""`autotransfer export`: layout, config.json, parity of the exported programs,
plain-runtime use, refusal of unsafe output paths, `search --export`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _export_helpers import COLOURS, TinyExport, tiny_export, write_images
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.data.augment import normalise
from autotransfer.data.datasets import load_dataset
from autotransfer.exceptions import ExportError, StorageError
from autotransfer.export.writer import check_target, export_trial
from autotransfer.plugins.host import get_plugin_host
from autotransfer.store.checkpoints import load_trial_backbone
from autotransfer.store.records import ARTIFACTS_ATTR, CLASSES_ATTR
from autotransfer.store.storage import artifact_store
from autotransfer.store.summary import best_trial

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def held_out(tiny: TinyExport, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """Images the study never saw, decoded like training data, normalised."""
    folder = write_images(tmp_path_factory.mktemp("held-out"), per_class=3, seed=123)
    data = load_dataset(tiny.spec.data.model_copy(update={"path": str(folder)}))
    config = json.loads((tiny.export / "config.json").read_text())
    from autotransfer.backbones import Preprocessing

    pre = config["preprocessing"]
    return normalise(data.images, Preprocessing(tuple(pre["mean"]), tuple(pre["std"])))


def test_layout_and_config(tiny: TinyExport) -> None:
    names = sorted(p.name for p in tiny.export.iterdir())
    assert names == [
        "README.md", "config.json", "model.onnx", "model.safetensors", "model.torchscript.pt",
    ]
    c = json.loads((tiny.export / "config.json").read_text())
    assert c["format"] == "autotransfer-export"
    assert c["labels"] == sorted(COLOURS) and c["num_classes"] == 3
    expected_input = {
        "name": "input", "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, 32, 32],
        "normalised": True, "normalisation_in_graph": False,
    }
    assert {k: c["input"][k] for k in expected_input} == expected_input
    assert c["output"]["name"] == "logits" and c["output"]["kind"] == "logits"
    pre = c["preprocessing"]
    assert pre["image_size"] == 32 and pre["interpolation"] == "bilinear"
    assert len(pre["mean"]) == 3 and len(pre["std"]) == 3
    assert c["backbone"]["name"] == "timm:test_efficientnet"
    assert c["backbone"]["weights"] == "none"
    best = best_trial(tiny.study)
    assert c["trial"]["number"] == best.number and c["trial"]["params"] == best.params
    assert c["metrics"]["val"]["accuracy"] == pytest.approx(best.value)
    assert set(c["metrics"]["test"]) >= {"accuracy", "macro_f1", "n"}
    assert c["study"] == {"name": "tiny-export", "n_trials": 2, "states": {"complete": 2}}
    assert {"autotransfer", "torch", "timm", "optuna", "onnx", "onnxruntime"} <= set(c["versions"])
    assert c["verification"]["onnx_max_abs_diff"] <= 1e-4
    card = (tiny.export / "README.md").read_text()
    assert "2 trials: 2 complete, 0 pruned" in card
    assert "already normalised" in card and "logits" in card
    # Per class: the test metrics in config.json and the card, and the confusion matrix.
    test = c["metrics"]["test"]
    assert test["classes"] == c["labels"] and set(test["per_class"]) == set(c["labels"])
    assert [sum(row) for row in test["confusion"]] == [
        test["per_class"][name]["support"] for name in c["labels"]]
    assert "### Test set, per class" in card and "### Test set, confusion matrix" in card
    blue = test["per_class"]["blue"]
    assert (f"| blue | {blue['precision']:.4g} | {blue['recall']:.4g} | {blue['f1']:.4g} "
            f"| {blue['support']} |") in card
    assert "| true \\ predicted | blue | green | red |" in card
    assert "| blue | " + " | ".join(map(str, test["confusion"][0])) + " |" in card
    # Where the data came from: the split of data.path, no given sets here.
    assert c["data"]["val"] is None and c["data"]["test"] is None
    assert "split per class train/val/test = 0.5/0.25/0.25 (seed 0)" in card


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_programs_match_the_pytorch_model(tiny: TinyExport, held_out: torch.Tensor) -> None:
    import onnxruntime as ort

    trial = best_trial(tiny.study)
    store = artifact_store(Path(tiny.study.user_attrs[ARTIFACTS_ATTR]))
    model = load_trial_backbone(
        trial, get_plugin_host(), store, num_classes=3, image_size=32
    ).model.eval()
    with torch.no_grad():
        ref = model(held_out).numpy()
        ts = torch.jit.load(str(tiny.export / "model.torchscript.pt"))(held_out).numpy()
    session = ort.InferenceSession(str(tiny.export / "model.onnx"))
    onnx_out = session.run(["logits"], {"input": held_out.numpy()})[0]
    assert held_out.shape[0] == 9  # a batch size other than the traced one (2)
    assert np.abs(onnx_out - ref).max() <= 1e-4
    assert np.abs(ts - ref).max() <= 1e-4
    from safetensors.torch import load_file

    weights = load_file(str(tiny.export / "model.safetensors"))
    state = model.state_dict()
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)


def test_programs_run_without_autotransfer_or_timm(tiny: TinyExport) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "timm", "autotransfer"):
            sys.modules[name] = None  # importing them now fails
        import numpy as np, onnxruntime as ort
        x = np.zeros((1, 3, 32, 32), np.float32)
        a = ort.InferenceSession({str(tiny.export / "model.onnx")!r}).run(None, {{"input": x}})[0]
        del sys.modules["torch"]
        import torch
        m = torch.jit.load({str(tiny.export / "model.torchscript.pt")!r})
        b = m(torch.from_numpy(x)).detach().numpy()
        assert "timm" not in [k for k, v in sys.modules.items() if v is not None]
        print(a.shape, float(np.abs(a - b).max()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    shape, diff = out.stdout.strip().rsplit(" ", 1)
    assert shape == "(1, 3)" and float(diff) <= 1e-4


def test_refuses_non_empty_dir_symlink_and_file(tmp_path: Path, tiny: TinyExport) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        check_target(tmp_path / "full")
    with pytest.raises(ExportError, match="no previous export"):
        check_target(tmp_path / "full", force=True)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ExportError, match="symbolic link"):
        check_target(tmp_path / "link", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        check_target(tmp_path / "file")
    check_target(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty")
    check_target(tiny.export, force=True)  # a previous export may be replaced


def test_cli_export_trial_force_and_errors(tiny: TinyExport, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    args = ["export", "--storage", tiny.storage, "--trial", "0", str(out)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "exported trial 0" in first.stdout
    assert json.loads((out / "config.json").read_text())["trial"]["number"] == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "not empty" in again.stderr
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "exp"]
    assert leftovers == []  # no temporary or old directories left behind
    missing = runner.invoke(
        app, ["export", "--storage", tiny.storage, "--trial", "99", str(tmp_path / "x")]
    )
    assert missing.exit_code == 2 and "no trial 99" in missing.stderr
    assert not (tmp_path / "x").exists()


def test_class_names_fall_back_to_the_data_set(tiny: TinyExport, tmp_path: Path) -> None:
    tiny.study.set_user_attr(CLASSES_ATTR, None)  # a study made before classes were stored
    try:
        result = export_trial(tiny.study, tmp_path / "exp")
    finally:
        tiny.study.set_user_attr(CLASSES_ATTR, sorted(COLOURS))
    assert result.config["labels"] == sorted(COLOURS)


def test_chosen_trial_must_be_complete(tiny: TinyExport, tmp_path: Path) -> None:
    import optuna

    study = tiny.study
    pruned = study.ask()
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    with pytest.raises(StorageError, match="PRUNED"):
        export_trial(study, tmp_path / "exp", pruned.number)
    assert not (tmp_path / "exp").exists()


def test_search_export_option(tmp_path: Path, tiny: TinyExport) -> None:
    spec = tmp_path / "spec.yaml"
    raw = tiny.spec.model_dump(mode="json") | {"name": "search-export", "n_trials": 1}
    spec.write_text(yaml.safe_dump(raw))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    refused = runner.invoke(app, ["search", str(spec), "--storage", storage,
                                  "--export", str(tmp_path / "busy")])
    assert refused.exit_code == 2 and "not empty" in refused.stderr
    assert not (tmp_path / "db.sqlite").exists()  # refused before the search started
    done = runner.invoke(app, ["search", str(spec), "--storage", storage, "--json",
                               "--export", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    best = json.loads(done.stdout)["best_trial"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["trial"]["number"] == best
    assert config["labels"] == sorted(COLOURS)
    assert os.access(tmp_path / "out" / "model.onnx", os.R_OK)


def test_card_names_given_sets_and_leaves_a_large_confusion_matrix_to_config() -> None:
    from autotransfer.engine.trainer import Metrics
    from autotransfer.export.card import CONFUSION_MAX_CLASSES, _per_class, _split_line

    data = {"path": "/d/photos", "split": {"train": 0.6, "val": 0.2, "test": 0.2},
            "val": "/d/photos-val", "test": None, "path_split": {"train": 0.75, "test": 0.25},
            "seed": 3}
    assert _split_line(data) == ("`/d/photos`, split per class train/test = 0.75/0.25 "
                                 "(seed 3); validation set `/d/photos-val` (given)")
    n = CONFUSION_MAX_CLASSES + 1
    classes = [f"c{i}" for i in range(n)]
    confusion = [[5 if i == j else 0 for j in range(n)] for i in range(n)]
    card = _per_class(Metrics(1.0, 1.0, 0.0, confusion).record(classes))
    assert card.count("| 1 | 1 | 1 | 5 |") == n  # every class in the per-class table
    assert f"The confusion matrix ({n} classes) is in `config.json`" in card
    assert _per_class({"accuracy": 0.9, "macro_f1": 0.9, "n": 10}) == ""  # an older study
