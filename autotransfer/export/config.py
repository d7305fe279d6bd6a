"""The export's ``config.json``: labels, input/output, preprocessing, the trial,
its metrics, the data, versions and the verification (docs/export.md lists
every field)."""

from __future__ import annotations

import datetime as _dt
import sys
from typing import Any

import optuna

from autotransfer._version import __version__
from autotransfer.export.format import (
    CARD_FILE,
    FORMAT,
    FORMAT_VERSION,
    IMAGE_TASK,
    INPUT_NAME,
    ONNX_FILE,
    ONNX_OPSET,
    OUTPUT_NAME,
    TEXT_INPUT_NAMES,
    TEXT_TASK,
    TOKENIZER_DIR,
    TOKENIZER_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
)
from autotransfer.spec.model import StudySpec
from autotransfer.store.records import (
    BEST_EPOCH_ATTR,
    FROZEN_BLOCKS_ATTR,
    N_BLOCKS_ATTR,
    VAL_F1_ATTR,
)

TRAINING_INTERPOLATION = "bilinear"  # autotransfer.data.datasets.square_resize


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"autotransfer": __version__, "python": sys.version.split()[0]}
    for dist in ("torch", "timm", "optuna", "onnx", "onnxruntime", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def _study_summary(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    return {"name": study.study_name, "n_trials": len(trials), "states": states}


def build_config(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    spec: StudySpec,
    backbone: Any,
    classes: list[str],
    test: dict[str, float] | None,
    verification: dict[str, Any],
    held: dict[str, Any] | None = None,
    trial_test: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` mapping (see docs/export.md for each field). ``held``:
    which model the export holds (``model``); ``test``: that model's test
    metrics; ``trial_test``: with a refit, the trial's own checkpoint's."""
    attrs = trial.user_attrs
    fields = (
        _text_fields(spec, backbone, len(classes)) if backbone.modality == "text"
        else _image_fields(spec, backbone, len(classes))
    )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": fields["task"],
        "labels": classes,
        "num_classes": len(classes),
        "files": fields["files"],
        "input": fields["input"],
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", len(classes)],
            "kind": "logits",
            "description": "unnormalised class scores in label order; softmax gives "
            "probabilities",
        },
        "preprocessing": fields["preprocessing"],
        "backbone": fields["backbone"],
        "model": held or {"kind": "trial", "trained_on": "train",
                          "epochs": attrs.get(BEST_EPOCH_ATTR)},
        "trial": {
            "number": trial.number,
            "params": dict(trial.params),
            "frozen_blocks": attrs.get(FROZEN_BLOCKS_ATTR),
            "n_blocks": attrs.get(N_BLOCKS_ATTR),
            "best_epoch": attrs.get(BEST_EPOCH_ATTR),
            "epochs": spec.train.epochs,
            "retention": trial.params.get("retention", spec.retention_kinds[0]),
        },
        "metrics": {
            "val": {"accuracy": trial.value, "macro_f1": attrs.get(VAL_F1_ATTR)},
            "test": test,
            **({"trial_test": trial_test}
               if held and held["kind"] in ("refit", "ensemble") else {}),
        },
        "data": fields["data"],
        "study": _study_summary(study),
        "versions": _versions(),
        "onnx": {"opset": ONNX_OPSET},
        "verification": verification,
    }


_FILES = {"weights": WEIGHTS_FILE, "torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE,
          "card": CARD_FILE}


def _image_fields(spec: StudySpec, backbone: Any, n_classes: int) -> dict[str, Any]:
    size = spec.data.image_size
    pre = backbone.preprocessing
    return {
        "task": IMAGE_TASK,
        "files": dict(_FILES),
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["batch", 3, size, size],
            "normalised": True,
            "normalisation_in_graph": False,
            "description": "RGB, already normalised: (pixel / 255 - mean) / std",
        },
        "preprocessing": {
            "image_size": size,
            "color_mode": "RGB",
            "resize": "centre square crop, then resize to image_size x image_size",
            "interpolation": TRAINING_INTERPOLATION,
            "scale": 1 / 255,
            "mean": list(pre.mean),
            "std": list(pre.std),
        },
        "backbone": {
            "name": backbone.name,
            "weights": backbone.weights,
            "num_features": backbone.num_features,
            # what the weights' authors resized with; training here used bilinear
            "pretrained_interpolation": pre.interpolation,
        },
        "data": {
            "path": spec.data.path,
            "image_size": size,
            "split": spec.data.split.model_dump(),
            **_given_sets(spec),
            "seed": spec.data.seed,
        },
    }


def _text_fields(spec: StudySpec, backbone: Any, n_classes: int) -> dict[str, Any]:
    pre = backbone.preprocessing
    return {
        "task": TEXT_TASK,
        "files": {**_FILES, "tokenizer": TOKENIZER_FILE},
        "input": {
            "names": list(TEXT_INPUT_NAMES),
            "dtype": "int64",
            "shape": ["batch", "sequence"],
            "description": "token ids from tokenizer/tokenizer.json (special tokens added, "
            "truncated to max_length, padded with pad_token_id to the batch's longest "
            "text) and the attention mask (1 for tokens, 0 for padding)",
        },
        "preprocessing": {
            "kind": "tokenizer",
            "tokenizer_dir": TOKENIZER_DIR,
            "tokenizer_file": TOKENIZER_FILE,
            "max_length": pre.max_length,
            "truncation": True,
            "padding": "longest",
            "pad_token_id": pre.pad_token_id,
            "tokenizer_sha256": pre.fingerprint,
        },
        "backbone": {
            "name": backbone.name,
            "weights": backbone.weights,
            "num_features": backbone.num_features,
            "pooling": backbone.extra.get("pooling"),
        },
        "data": {
            "path": spec.data.path,
            "text_column": spec.data.text_column,
            "label_column": spec.data.label_column,
            "max_length": spec.data.max_length,
            "split": spec.data.split.model_dump(),
            **_given_sets(spec),
            "seed": spec.data.seed,
        },
    }


def _given_sets(spec: StudySpec) -> dict[str, Any]:
    """The validation and test sets given as their own data sets (null: split off
    ``path``), and the fractions ``path`` was split by (:func:`split_fractions`)."""
    from autotransfer.data.datasets import split_fractions

    given = spec.data.given
    return {
        "val": given.get("val"),
        "test": given.get("test"),
        "path_split": split_fractions(spec.data.split, tuple(given)),
    }
