"""Trial checkpoints: the best epoch's weights as safetensors in the artifact store.

A checkpoint is written to a temporary file and uploaded to Optuna's artifact
store (which writes it atomically: :class:`storage.AtomicFileSystemArtifactStore`),
so the best model of any trial can be rebuilt later, without retraining,
through the same build path the trial used (:func:`load_trial_backbone`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch
from optuna.artifacts import download_artifact, upload_artifact
from safetensors.torch import load_file, save_file

from autotransfer.backbones import Backbone, Preprocessing, TextPreprocessing
from autotransfer.exceptions import StorageError
from autotransfer.plugins.host import PluginHost
from autotransfer.spec.model import BackboneRef
from autotransfer.store.records import CHECKPOINT_ATTR, PREPROCESSING_ATTR
from autotransfer.store.storage import ArtifactStore


def save_checkpoint(
    trial: optuna.Trial,
    state: dict[str, torch.Tensor],
    backbone: Backbone,
    store: ArtifactStore,
) -> str:
    """Upload ``state`` as the trial's checkpoint; returns the artifact id."""
    metadata = {
        "backbone": backbone.name,
        "weights": backbone.weights,
        "trial": str(trial.number),
        "preprocessing": json.dumps(backbone.preprocessing.to_dict()),
    }
    with tempfile.TemporaryDirectory(prefix="autotransfer-ckpt-") as tmp:
        path = Path(tmp) / f"trial-{trial.number}-best.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
        artifact_id = upload_artifact(
            artifact_store=store,
            file_path=str(path),
            study_or_trial=trial,
            mimetype="application/octet-stream",
        )
    trial.set_user_attr(CHECKPOINT_ATTR, artifact_id)
    trial.set_user_attr(PREPROCESSING_ATTR, backbone.preprocessing.to_dict())
    return artifact_id


def load_trial_backbone(
    trial: optuna.trial.FrozenTrial,
    host: PluginHost,
    store: ArtifactStore,
    *,
    num_classes: int,
    image_size: int,
    listed: Sequence[BackboneRef] = (),
    checkpoint: bool = True,
) -> Backbone:
    """Rebuild a finished trial's model and load its best checkpoint.

    ``listed``: the study spec's backbones (``spec.search.backbones``). The
    trial's entry there carries what its key does not: an hf backbone's pinned
    ``revision`` and ``trust_remote_code``, so the rebuild uses the code and
    configuration the trial trained with.

    The architecture is built by the same family as in the trial, without its
    pretrained weights (they are all in the checkpoint), except that ``packaged``
    weights and local weight directories are built from again: they are offline
    and hold the configuration (and a text model's tokenizer) the trial used. The
    preprocessing is the one recorded with the trial; for a text model the
    rebuilt tokenizer must be the one the trial recorded (same sha256).

    ``checkpoint=False``: the model as the trial started, to train it again (a
    refit, :mod:`autotransfer.tuning.refit`): built with the trial's own weights
    (pretrained ones included) and a fresh head (seed ``torch`` first for the
    trial's head), the checkpoint not loaded; the preprocessing is still the
    recorded one.

    Raises:
        StorageError: the trial has no checkpoint (it was pruned or failed), or
            a text model's tokenizer is no longer the one it trained with.
    """
    artifact_id = trial.user_attrs.get(CHECKPOINT_ATTR)
    if artifact_id is None:
        raise StorageError(
            f"trial {trial.number} ({trial.state.name}) has no checkpoint; "
            "choose a COMPLETE trial (see `autotransfer trials`)"
        )
    check_artifact_id(trial.number, artifact_id)
    key = trial.params["backbone"]
    ref = next((r for r in listed if r.key == key), None) or BackboneRef.parse(key)
    family = host.family(ref.family)
    offline_source = ref.weights == "packaged" or Path(ref.weights).expanduser().is_dir()
    build_weights = (
        "none" if checkpoint and "none" in family.weights_sources and not offline_source
        else ref.weights
    )
    backbone = host.build(
        ref.model_copy(update={"weights": build_weights}),
        num_classes=num_classes,
        image_size=image_size,
    )
    if checkpoint:
        with tempfile.TemporaryDirectory(prefix="autotransfer-ckpt-") as tmp:
            path = Path(tmp) / "checkpoint.safetensors"
            download_artifact(artifact_store=store, file_path=str(path), artifact_id=artifact_id)
            state = load_file(str(path))
        backbone.model.load_state_dict(state, strict=True)
    pre = trial.user_attrs.get(PREPROCESSING_ATTR)
    if pre and pre.get("kind") == "text":
        backbone.preprocessing = _recorded_text_preprocessing(trial.number, backbone, pre)
    elif pre:
        backbone.preprocessing = Preprocessing(
            mean=tuple(pre["mean"]), std=tuple(pre["std"]), interpolation=pre["interpolation"]
        )
    backbone.weights = ref.weights
    return backbone


def _recorded_text_preprocessing(
    number: int, backbone: Backbone, recorded: dict[str, object]
) -> TextPreprocessing:
    """The rebuilt tokenizer with the trial's max length, if it is the trial's own."""
    pre = backbone.preprocessing
    if not isinstance(pre, TextPreprocessing):
        raise StorageError(
            f"trial {number} trained a text model but {backbone.name} now builds an image "
            "model; restore the model the trial used"
        )
    if recorded.get("tokenizer_sha256") not in (None, pre.fingerprint):
        raise StorageError(
            f"the tokenizer of {backbone.name} (from '{pre.source}') is not the one trial "
            f"{number} trained with (sha256 differs); restore that model directory"
        )
    return dataclasses.replace(pre, max_length=int(recorded["max_length"]))  # type: ignore[arg-type]


ARTIFACT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def check_artifact_id(number: int, artifact_id: object) -> None:
    """Optuna's artifact ids are UUIDs: anything else (``../x``, an absolute path,
    ``..%2f``) would make the artifact store read outside its directory."""
    if not isinstance(artifact_id, str) or not ARTIFACT_ID.fullmatch(artifact_id):
        raise StorageError(
            f"trial {number}'s checkpoint id {str(artifact_id)[:80]!r} is not an artifact id "
            "(letters, digits, '-' and '_' only); the study database was altered, so it is "
            "not read"
        )
