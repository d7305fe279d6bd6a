"""The study spec: the embedded default, overrides, paths, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autotransfer.exceptions import SpecError, UserInputError
from autotransfer.spec.model import StudySpec, default_spec_path, load_spec, validate_spec


def test_embedded_default_spec_loads_and_validates() -> None:
    assert default_spec_path().is_file()
    spec = load_spec(None)
    assert spec.name == "digits-default"
    assert spec.data.path == "sklearn:digits"  # a built-in set is not turned into a path
    keys = [b.key for b in spec.search.backbones]
    assert keys == ["timm:tf_efficientnet_lite0@packaged", "timm:tf_efficientnet_lite0@none"]
    assert spec.retention == "l2sp"
    assert spec.n_trials and spec.n_trials >= 1
    # The saved form round-trips (it is stored with the study and compared on resume).
    assert StudySpec.from_json(spec.to_json()) == spec


def test_overrides_and_relative_data_path(
    tmp_path: Path, tiny_images: Path, spec_dict
) -> None:
    raw = spec_dict("images")  # relative to the spec file's folder
    (tmp_path / "images").symlink_to(tiny_images)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path, {"train.epochs": 1, "n_trials": 5, "seed": None})
    assert Path(spec.data.path) == (tmp_path / "images").resolve()
    assert spec.train.epochs == 1 and spec.n_trials == 5 and spec.seed == 0


def test_backbone_short_form(spec_dict) -> None:
    spec = validate_spec(spec_dict("/x", **{"search.backbones": ["timm:a", "timm:b@none"]}))
    assert [(b.family, b.model, b.weights) for b in spec.search.backbones] == [
        ("timm", "a", "pretrained"), ("timm", "b", "none"),
    ]


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"train.epochs": "many"}, ["train.epochs", '"many"', "integer"]),
        ({"search.lr": 0}, ["search.lr", "0", "> 0"]),
        ({"search.lr": {"low": -1.0, "high": 0.1}}, ["search.lr", "-1.0", "> 0"]),
        ({"search.lr": "fast"}, ["search.lr", '"fast"', "a number or a mapping {low, high, log}"]),
        ({"search.alpha": 1.0}, ["search.alpha", "1.0", "[0, 1)"]),
        ({"search.alpha": -0.1}, ["search.alpha", "-0.1", "[0, 1)"]),
        ({"search.freeze": {"low": 0.8, "high": 0.2}}, ["search.freeze", "0.8", "swap them"]),
        ({"search.freeze": 1.5}, ["search.freeze", "1.5", "[0, 1]"]),
        ({"trian": {"epochs": 1}}, ["trian", "unknown key", "did you mean 'train'?"]),
        ({"train.epoch": 3}, ["train.epoch", "did you mean 'epochs'?"]),
        ({"search.lr.hgh": 1}, ["search.lr.hgh", "did you mean 'high'?"]),
        ({"search.backbones": ["resnet18"]},
         ["search.backbones.0.name", "resnet18", "family:model"]),
        ({"search.backbones": ["timm:a", "timm:a"]}, ["timm:a@pretrained", "listed twice"]),
        ({"search.batch_size": 0}, ["search.batch_size", "0", "positive"]),
        ({"retention": "source"}, ["source:", "l2sp/distill"]),
        ({"retention": "foo"}, ["retention", '"foo"', "'l2sp'"]),
        ({"data.split.train": 0.9}, ["data.split", "1.4 > 1"]),
        ({"name": ...}, ["name", "required"]),
        ({"data": "folder"}, ["data", '"folder"', "mapping {path"]),
    ],
)
def test_invalid_spec_is_one_line_naming_field_and_value(
    overrides: dict, needles: list[str], spec_dict
) -> None:
    with pytest.raises(SpecError) as info:
        validate_spec(spec_dict("/x", **overrides), source="s.yaml")
    message = str(info.value)
    assert isinstance(info.value, UserInputError)
    assert "\n" not in message
    assert message.startswith("invalid spec 's.yaml': ")
    for needle in needles:
        assert needle in message, (needle, message)
    # pydantic's internal union labels never leak into the message.
    assert "function-" not in message and "FloatRange" not in message


def test_several_errors_are_all_named_on_one_line(spec_dict) -> None:
    with pytest.raises(SpecError) as info:
        validate_spec(spec_dict("/x", **{"search.alpha": 1.0, "train.epochs": 0}))
    message = str(info.value)
    assert "\n" not in message
    assert "search.alpha" in message and "train.epochs" in message


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: tiny\nsearch: [1, 2\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line \d+, column \d+"):
        load_spec(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(scalar)


def test_given_val_and_test_paths_are_relative_to_the_spec(tmp_path: Path, spec_dict) -> None:
    raw = spec_dict("images", **{"data.val": "held/val", "data.test": "held/test"})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    assert spec.data.val == str((tmp_path / "held" / "val").resolve())
    assert spec.data.given == {"val": spec.data.val, "test": str(tmp_path / "held" / "test")}
    with pytest.raises(SpecError, match="source.val/source.test are not used"):
        validate_spec(spec_dict("/x", **{"retention": "source",
                                         "source": {"path": "/s", "val": "/v"}}))


def test_docs_spec_shows_the_general_defaults() -> None:
    """The annotated spec in docs/spec.md is what a run without a spec file gets
    (besides the name, the data path and the backbones)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "spec.md").read_text(encoding="utf-8")
    block = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    documented = yaml.safe_load(block)
    fixed = {"name": "x", "data.path": "/d", "search.backbones": ["timm:a@packaged"]}
    documented.update(name="x")
    documented["data"]["path"] = "/d"
    documented["search"]["backbones"] = ["timm:a@packaged"]
    from autotransfer.spec.model import general_spec

    assert validate_spec(documented) == general_spec(fixed)
