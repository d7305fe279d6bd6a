"""Export and predict for a text model (tiny random-init BERT, its own tokenizer):
layout and config, parity of ONNX Runtime and TorchScript with the PyTorch model on
held-out texts, use without autotransfer or transformers, `autotransfer predict`
(--text, text/CSV files, --json, --top-k), `autotransfer.load(dir).predict([...])`,
and wrong-modality inputs (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from _export_helpers import TinyExport, tiny_export
from _text_helpers import save_tiny_bert, sentences, write_csv
from test_bad_input import assert_bad_input
from typer.testing import CliRunner

import autotransfer
from autotransfer.cli import app
from autotransfer.data.batches import pad
from autotransfer.exceptions import DataError
from autotransfer.plugins.host import get_plugin_host
from autotransfer.store.checkpoints import load_trial_backbone
from autotransfer.store.records import ARTIFACTS_ATTR
from autotransfer.store.storage import artifact_store
from autotransfer.store.summary import best_trial

pytest.importorskip("transformers")
runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
HELD_OUT = [
    "i really like golf",
    "nobody expected the snow and the wind and the hail and the frost and the fog",
    "pizza",
    "we talked about tennis yesterday and the rugby today",
    "there was a lot of rain",
]


@dataclass
class TextExport:
    study: optuna.Study
    export: Path


@pytest.fixture(scope="module")
def text_export(tmp_path_factory: pytest.TempPathFactory) -> TextExport:
    """A 1-trial, 2-epoch study on the tiny BERT, exported (once per module)."""
    import autotransfer.tuning.search as search_mod
    from autotransfer.export.writer import export_trial
    from autotransfer.spec.model import validate_spec
    from autotransfer.tuning.progress import Progress

    root = tmp_path_factory.mktemp("text-export")
    model = save_tiny_bert(root / "bert")
    data = write_csv(root / "topics.csv", sentences(12))
    spec = validate_spec({
        "name": "text-export",
        "data": {"path": str(data), "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "retention": "distill",
        "search": {"backbones": [f"hf:{model}@pretrained"], "freeze": 0.0, "lr": 1e-2,
                   "batch_size": 8, "alpha": 0.1},
        "train": {"epochs": 2, "threads": 2},
        "pruner": {"type": "none"}, "sampler": {"type": "random"}, "n_trials": 1,
        # the trial's checkpoint, compared with the programs
        "export": {"refit": False, "ensemble": False},
    })
    outcome = search_mod.run_search(spec, f"sqlite:///{root / 'db.sqlite'}",
                                    root / "artifacts", Progress(epochs=2))
    return TextExport(outcome.study, export_trial(outcome.study, root / "export").path)


@pytest.fixture(scope="module")
def image_export(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory.getbasetemp())


def _model(text_export: TextExport):
    study = text_export.study
    store = artifact_store(Path(study.user_attrs[ARTIFACTS_ATTR]))
    return load_trial_backbone(best_trial(study), get_plugin_host(), store, num_classes=3,
                               image_size=64)


def test_layout_and_config(text_export: TextExport) -> None:
    root = text_export.export
    assert sorted(p.name for p in root.iterdir()) == [
        "README.md", "config.json", "model.onnx", "model.safetensors", "model.torchscript.pt",
        "tokenizer",
    ]
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    c = json.loads((root / "config.json").read_text())
    assert c["task"] == "text-classification" and c["labels"] == ["food", "sport", "weather"]
    assert c["input"]["names"] == ["input_ids", "attention_mask"]
    assert c["input"]["dtype"] == "int64" and c["input"]["shape"] == ["batch", "sequence"]
    pre = c["preprocessing"]
    assert pre["tokenizer_file"] == "tokenizer/tokenizer.json" and pre["max_length"] == 64
    assert pre["pad_token_id"] == 0 and len(pre["tokenizer_sha256"]) == 64
    assert c["files"]["tokenizer"] == "tokenizer/tokenizer.json"
    assert c["backbone"]["pooling"] == "mean" and c["data"]["text_column"] == "text"
    v = c["verification"]
    assert v["input"] == "texts" and v["onnx_max_abs_diff"] <= 1e-4
    assert v["torchscript_max_abs_diff"] <= 1e-4
    card = (root / "README.md").read_text()
    assert "Text classifier (3 classes)" in card and "input_ids" in card
    assert "Tokenizer.from_file" in card and "tokenizer/" in card


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_programs_match_the_pytorch_model_on_held_out_texts(text_export: TextExport) -> None:
    """ONNX Runtime and TorchScript within 1e-4 of the PyTorch model (fp32), on texts
    the study never saw, of other lengths and another batch size than the traced
    ones; the exported tokenizer file gives the training tokenizer's ids."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from autotransfer.export.predict import encode_texts

    backbone = _model(text_export)
    pre = backbone.preprocessing
    batch = pad(pre.encode(HELD_OUT), pre.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tok = Tokenizer.from_file(str(text_export.export / "tokenizer" / "tokenizer.json"))
    plain_ids, plain_mask = encode_texts(tok, HELD_OUT, pre.max_length, pre.pad_token_id)
    assert np.array_equal(plain_ids, ids.numpy()) and np.array_equal(plain_mask, mask.numpy())
    assert ids.shape[0] == 5 and (mask == 0).any()  # padded, not the traced batch of 2
    model = backbone.model.eval()
    with torch.no_grad():
        ref = model(ids, mask).numpy()
        ts = torch.jit.load(str(text_export.export / "model.torchscript.pt"))(ids, mask).numpy()
    session = ort.InferenceSession(str(text_export.export / "model.onnx"))
    onnx_out = session.run(["logits"], {"input_ids": ids.numpy(),
                                        "attention_mask": mask.numpy()})[0]
    assert np.abs(onnx_out - ref).max() <= 1e-4
    assert np.abs(ts - ref).max() <= 1e-4
    one = session.run(["logits"], {"input_ids": ids[:1, :8].numpy(),
                                   "attention_mask": mask[:1, :8].numpy()})[0]
    with torch.no_grad():
        assert np.abs(one - model(ids[:1, :8], mask[:1, :8]).numpy()).max() <= 1e-4


def test_runs_without_autotransfer_or_transformers(text_export: TextExport) -> None:
    root = text_export.export
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "transformers", "autotransfer"):
            sys.modules[name] = None  # importing them now fails
        import json, numpy as np, onnxruntime as ort
        from tokenizers import Tokenizer
        c = json.load(open({str(root / "config.json")!r}))
        tok = Tokenizer.from_file({str(root)!r} + "/" + c["preprocessing"]["tokenizer_file"])
        tok.enable_truncation(max_length=c["preprocessing"]["max_length"])
        tok.enable_padding(pad_id=c["preprocessing"]["pad_token_id"])
        enc = tok.encode_batch(["i really like golf", "rain"])
        feed = {{"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}}
        a = ort.InferenceSession({str(root / "model.onnx")!r}).run(["logits"], feed)[0]
        del sys.modules["torch"]
        import torch
        m = torch.jit.load({str(root / "model.torchscript.pt")!r})
        b = m(*(torch.from_numpy(feed[k]) for k in c["input"]["names"])).detach().numpy()
        assert "transformers" not in [k for k, v in sys.modules.items() if v is not None]
        print(a.shape, float(np.abs(a - b).max()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    shape, diff = out.stdout.strip().rsplit(" ", 1)
    assert shape == "(2, 3)" and float(diff) <= 1e-4


def test_predict_api_and_cli_agree_with_the_model(
    text_export: TextExport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autotransfer.export import predict as predict_module

    backbone = _model(text_export)
    pre = backbone.preprocessing
    with torch.no_grad():
        probs = torch.softmax(backbone.model.eval()(**pad(pre.encode(HELD_OUT),
                                                             pre.pad_token_id)), 1)
    labels = ["food", "sport", "weather"]
    expected = [labels[i] for i in probs.argmax(1).tolist()]
    for runtime in ("onnx", "torchscript"):
        got = autotransfer.load(text_export.export, runtime).predict(HELD_OUT, top_k=2)
        assert [p.label for p in got] == expected
        assert [p.input for p in got] == HELD_OUT
        np.testing.assert_allclose([p.probability for p in got], probs.max(1).values,
                                   atol=1e-4)
        assert all(len(p.top_k) == 2 for p in got)
    # batches of 2, shortest texts first: the predictions still come in input order
    monkeypatch.setattr(predict_module, "BATCH_SIZE", 2)
    got = autotransfer.load(text_export.export).predict(HELD_OUT)
    assert [p.input for p in got] == HELD_OUT and [p.label for p in got] == expected
    np.testing.assert_allclose([p.probability for p in got], probs.max(1).values, atol=1e-4)
    monkeypatch.undo()
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join(HELD_OUT[:3]) + "\n\n")
    csv = write_csv(tmp_path / "more.csv", [(t, "?") for t in HELD_OUT[3:]])
    result = runner.invoke(app, ["predict", str(text_export.export), str(txt), str(csv),
                                 "--json", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["predictions"]
    assert [p["input"] for p in out] == HELD_OUT
    assert [p["label"] for p in out] == expected and len(out[0]["top_k"]) == 3
    table = runner.invoke(app, ["predict", str(text_export.export), "--text", HELD_OUT[0],
                                "-t", HELD_OUT[2]])
    assert table.exit_code == 0, table.output
    assert HELD_OUT[0] in table.stdout and expected[2] in table.stdout


def test_wrong_modality_is_one_line_exit_2(text_export: TextExport, image_export: TinyExport,
                                           tmp_path: Path) -> None:
    png = next(image_export.data.rglob("*.png"))
    assert_bad_input(runner.invoke(app, ["predict", str(text_export.export), str(png)]),
                     png.name, "is an image", "classifies text")
    notes = tmp_path / "notes.txt"
    notes.write_text("i really like golf\n")
    assert_bad_input(runner.invoke(app, ["predict", str(image_export.export), str(notes)]),
                     "notes.txt", "is a text file", "classifies images")
    assert_bad_input(runner.invoke(app, ["predict", str(image_export.export), "--text", "hi"]),
                     "--text 'hi'", "classifies images")
    assert_bad_input(runner.invoke(app, ["predict", str(text_export.export)]), "no inputs")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x89PNG")
    assert_bad_input(runner.invoke(app, ["predict", str(text_export.export), str(binary)]),
                     "blob.txt", "not UTF-8")
    model = autotransfer.load(text_export.export)
    with pytest.raises(DataError, match="classifies text"):
        model.predict([png])
    with pytest.raises(DataError, match="not a text"):
        model.predict(["fine", "  "])


def test_text_refit_export(text_export: TextExport, tmp_path: Path) -> None:
    """A refit of the text trial (distill retention) trains on train + val and exports."""
    from autotransfer.export.writer import export_trial

    result = export_trial(text_export.study, tmp_path / "refit", refit=True)
    c = result.config
    assert c["model"]["kind"] == "refit" and c["model"]["trained_on"] == "train+val"
    assert c["model"]["train_examples"] == 3 * (6 + 3)  # 12 texts per class, 50 % + 25 %
    assert c["model"]["examples_seen"] == c["model"]["epochs"] * c["model"]["train_examples"]
    assert c["metrics"]["test"]["n"] == 3 * 3 and "trial_test" in c["metrics"]
    assert c["verification"]["onnx_max_abs_diff"] <= 1e-3
    assert "(27 texts)" in (result.path / "README.md").read_text()


def test_a_text_ensemble_exports_and_predicts(text_export: TextExport, tmp_path: Path) -> None:
    """The ensemble wrapper traces with (input_ids, attention_mask) like one model."""
    import autotransfer
    from autotransfer.export.writer import export_trial

    result = export_trial(text_export.study, tmp_path / "ens", ensemble=True)
    assert result.config["model"]["kind"] == "ensemble"
    got = autotransfer.load(result.path).predict(HELD_OUT, top_k=2)
    assert len(got) == len(HELD_OUT) and all(len(p.top_k) == 2 for p in got)
