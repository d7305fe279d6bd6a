"""One study over the three built-in image families at once, from the command
line: timm, torchvision and a Hugging Face model directory in one Optuna study.
Each family's trial exports (the export checks its ONNX and TorchScript programs
against PyTorch) and its export predicts. Also: how a new study queues one trial
per listed backbone (``sampler.try_each_backbone``)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.store.studies import create_or_resume

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_one_study_mixes_timm_torchvision_and_hf(
    write_spec, hf_model_dirs: dict[str, Path], tiny_images: Path, tmp_path: Path
) -> None:
    keys = [
        "timm:test_resnet@none",
        "torchvision:mobilenet_v3_small@none",
        f"hf:{hf_model_dirs['vit']}@pretrained",  # a save_pretrained directory, offline
    ]
    spec = write_spec(**{"name": "mixed", "n_trials": 4, "train.epochs": 1,
                         "search.backbones": keys, "sampler.try_each_backbone": True,
                         "sampler.portfolio": False})
    storage = f"sqlite:///{tmp_path / 'mixed.db'}"
    result = invoke("search", spec, "--storage", storage, "--json")
    assert result.exit_code == 0, result.output
    trials = json.loads(result.stdout)["trials"]
    assert len(trials) == 4 and all(t["state"] == "COMPLETE" for t in trials)
    # The first trials take each listed backbone once, in order; then the sampler picks.
    assert [t["params"]["backbone"] for t in trials[:3]] == keys
    assert trials[3]["params"]["backbone"] in keys

    image = next((tiny_images / "blue").iterdir())
    for trial, key in zip(trials, keys, strict=False):
        out = tmp_path / f"export-{trial['number']}"
        exported = invoke("export", "--storage", storage, "--trial", trial["number"], out)
        assert exported.exit_code == 0, exported.output
        config = json.loads((out / "config.json").read_text())
        assert config["trial"]["number"] == trial["number"]
        assert f"{config['backbone']['name']}@{config['backbone']['weights']}" == key
        assert config["verification"]["onnx_max_abs_diff"] <= 1e-4
        assert config["verification"]["torchscript_max_abs_diff"] <= 1e-4
        predicted = invoke("predict", out, image, "--json")
        assert predicted.exit_code == 0, predicted.output
        (row,) = json.loads(predicted.stdout)["predictions"]
        assert row["label"] in ("red", "green", "blue") and 0 < row["probability"] <= 1


def _queued(study: optuna.Study) -> list[str]:
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    return [t.system_attrs["fixed_params"]["backbone"] for t in waiting]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, ["timm:test_resnet@none", "timm:test_vit@none", "timm:test_efficientnet@none"]),
        ({"n_trials": 2}, ["timm:test_resnet@none", "timm:test_vit@none"]),  # within budget
        ({"n_trials": None}, ["timm:test_resnet@none", "timm:test_vit@none",
                              "timm:test_efficientnet@none"]),
        ({"sampler.try_each_backbone": False}, []),
        ({"sampler.try_each_backbone": ...}, []),  # off by default
        ({"search.backbones": ["timm:test_resnet@none"]}, []),  # nothing to choose
    ],
)
def test_a_new_study_queues_each_backbone_once(
    overrides: dict, expected: list, tiny_spec, tmp_path: Path
) -> None:
    spec = tiny_spec(**{"n_trials": 5, "sampler.try_each_backbone": True,
                        "sampler.portfolio": False, "search.backbones": [
        "timm:test_resnet@none", "timm:test_vit@none", "timm:test_efficientnet@none"],
        **overrides})
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = create_or_resume(spec, storage, tmp_path / "artifacts")
    assert _queued(study) == expected
    # Resuming queues nothing more, and the setting may change on resume.
    flipped = spec.sampler.model_copy(
        update={"try_each_backbone": not spec.sampler.try_each_backbone})
    again = spec.model_copy(update={"sampler": flipped})
    assert _queued(create_or_resume(again, storage, tmp_path / "artifacts")) == expected
