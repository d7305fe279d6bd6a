"""`autotransfer predict` and `autotransfer.load`: agreement with the trained model,
CLI vs API, both runtimes, JSON shape, bad inputs (exit 2), no unpickling."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _export_helpers import COLOURS, TinyExport, tiny_export, write_images
from PIL import Image
from typer.testing import CliRunner

import autotransfer
from autotransfer.backbones import Preprocessing
from autotransfer.cli import app
from autotransfer.data.augment import normalise
from autotransfer.data.datasets import load_dataset
from autotransfer.exceptions import DataError, ExportError
from autotransfer.plugins.host import get_plugin_host
from autotransfer.store.checkpoints import load_trial_backbone
from autotransfer.store.records import ARTIFACTS_ATTR
from autotransfer.store.storage import artifact_store
from autotransfer.store.summary import best_trial

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def new_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out images (3 per class, non-square, in class sub-folders)."""
    return write_images(tmp_path_factory.mktemp("new") / "images", per_class=3, seed=7)


def test_predict_matches_the_trained_model(tiny: TinyExport, new_images: Path) -> None:
    """Decoding + normalisation in predict equal the training path, end to end."""
    data = load_dataset(tiny.spec.data.model_copy(update={"path": str(new_images)}))
    trial = best_trial(tiny.study)
    store = artifact_store(Path(tiny.study.user_attrs[ARTIFACTS_ATTR]))
    backbone = load_trial_backbone(trial, get_plugin_host(), store, num_classes=3, image_size=32)
    with torch.no_grad():
        ref = torch.softmax(
            backbone.model.eval()(normalise(data.images, backbone.preprocessing)), dim=1
        ).numpy()
    for runtime in ("onnx", "torchscript"):
        got = autotransfer.load(tiny.export, runtime=runtime).predict(new_images, top_k=3)
        assert len(got) == 9
        probs = np.array([[t["probability"] for t in sorted(p.top_k, key=lambda t: t["label"])]
                          for p in got])
        assert np.abs(probs - ref).max() <= 1e-5, runtime
        assert [p.label for p in got] == [data.classes[i] for i in ref.argmax(1)]


def test_cli_json_agrees_with_api(tiny: TinyExport, new_images: Path) -> None:
    one = new_images / "red" / "000.png"
    result = runner.invoke(app, ["predict", str(tiny.export), str(one), str(new_images / "blue"),
                                 "--json", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"export", "runtime", "predictions"} and out["runtime"] == "onnx"
    preds = out["predictions"]
    assert [p["input"] for p in preds] == [str(one)] + [
        str(new_images / "blue" / f"{i:03d}.png") for i in range(3)
    ]
    for p in preds:
        assert set(p) == {"input", "label", "probability", "top_k"}
        assert len(p["top_k"]) == 2 and p["top_k"][0]["label"] == p["label"]
        assert p["top_k"][0]["probability"] >= p["top_k"][1]["probability"]
        assert p["label"] in COLOURS and 0 <= p["probability"] <= 1
    api = autotransfer.load(tiny.export).predict([one, new_images / "blue"], top_k=2)
    assert [p.to_dict() for p in api] == preds


def test_table_output_and_runtimes_agree(tiny: TinyExport, new_images: Path) -> None:
    result = runner.invoke(app, ["predict", str(tiny.export), str(new_images), "--top-k", "9"])
    assert result.exit_code == 0, result.output
    assert "probability" in result.stdout and "top 3" in result.stdout  # k capped at 3
    assert result.stdout.count(".png") == 9
    a = autotransfer.load(tiny.export, "onnx").predict(new_images, top_k=3)
    b = autotransfer.load(tiny.export, "torchscript").predict(new_images, top_k=3)
    assert [p.label for p in a] == [p.label for p in b]
    assert max(abs(x.probability - y.probability) for x, y in zip(a, b, strict=True)) <= 1e-5


def test_pil_images(tiny: TinyExport, new_images: Path) -> None:
    model = autotransfer.load(tiny.export)
    path = new_images / "green" / "001.png"
    with Image.open(path) as im:
        from_pil = model.predict(im.copy())
    from_path = model.predict(path)
    assert from_pil[0].input == "<image 0>"
    assert from_pil[0].label == from_path[0].label
    assert from_pil[0].probability == pytest.approx(from_path[0].probability, abs=1e-6)


def test_normalisation_follows_config(tiny: TinyExport) -> None:
    model = autotransfer.load(tiny.export)
    images = np.full((1, 3, 32, 32), 255, np.uint8)
    pre = model.config["preprocessing"]
    pre = Preprocessing(tuple(pre["mean"]), tuple(pre["std"]))
    expected = normalise(torch.from_numpy(images), pre)
    direct = model._run(expected.numpy())
    assert np.allclose(model.logits(images), direct)


@pytest.fixture
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    empty = tmp_path / "empty"
    empty.mkdir()
    not_export = tmp_path / "not-export"
    not_export.mkdir()
    (not_export / "config.json").write_text('{"hello": 1}')
    return {"text": text, "broken": broken, "empty": empty, "not_export": not_export,
            "missing": tmp_path / "missing.png"}


@pytest.mark.parametrize(
    ("export", "input_key", "message"),
    [
        ("missing-dir", None, "does not exist"),
        ("not_export", None, "not an autotransfer export"),
        ("empty", None, "not an export (no config.json)"),
        (None, "text", "cannot read"),
        (None, "broken", "cannot read"),
        (None, "missing", "does not exist"),
        (None, "empty", "has no images"),
    ],
)
def test_bad_inputs_exit_2(
    tiny: TinyExport, bad_inputs: dict[str, Path], new_images: Path,
    export: str | None, input_key: str | None, message: str,
) -> None:
    if export is None:
        export_dir = tiny.export
    else:
        export_dir = bad_inputs.get(export, bad_inputs["empty"].parent / export)
    target = bad_inputs[input_key] if input_key else new_images
    result = runner.invoke(app, ["predict", str(export_dir), str(target)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert result.stdout == ""


def test_api_errors(tiny: TinyExport, bad_inputs: dict[str, Path]) -> None:
    with pytest.raises(ExportError, match="unknown runtime"):
        autotransfer.load(tiny.export, runtime="tensorflow")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="cannot read"):
        autotransfer.load(tiny.export).predict([bad_inputs["text"]])
    with pytest.raises(DataError, match="top_k"):
        autotransfer.load(tiny.export).predict([bad_inputs["text"]], top_k=0)


def test_loading_never_unpickles(
    tiny: TinyExport, new_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling attempted")

    class NoUnpickler:
        def __init__(self, *args: object, **kwargs: object) -> None:
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    for runtime in ("onnx", "torchscript"):
        preds = autotransfer.load(tiny.export, runtime=runtime).predict(new_images)
        assert len(preds) == 9
