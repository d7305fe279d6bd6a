"""Trial checkpoints: the best epoch's weights as safetensors in the artifact store.

A checkpoint is written to a temporary file and uploaded to Optuna's artifact
store (which writes it atomically: :class:`storage.AtomicFileSystemArtifactStore`),
so the best model of any trial can be rebuilt later, without retraining,
through the same build path the trial used (:func:`load_trial_backbone`).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import optuna
import torch
from optuna.artifacts import download_artifact, upload_artifact
from optuna.artifacts._protocol import ArtifactStore
from safetensors.torch import load_file, save_file

from autotransfer.backbones import Backbone, Preprocessing
from autotransfer.exceptions import StorageError
from autotransfer.plugins import PluginHost
from autotransfer.spec import BackboneRef

CHECKPOINT_ATTR = "checkpoint"
PREPROCESSING_ATTR = "preprocessing"


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
) -> Backbone:
    """Rebuild a finished trial's model and load its best checkpoint.

    The architecture is built by the same family as in the trial, without its
    pretrained weights (they are all in the checkpoint); the preprocessing is the
    one recorded with the trial.

    Raises:
        StorageError: the trial has no checkpoint (it was pruned or failed).
    """
    artifact_id = trial.user_attrs.get(CHECKPOINT_ATTR)
    if artifact_id is None:
        raise StorageError(
            f"trial {trial.number} ({trial.state.name}) has no checkpoint; "
            "choose a COMPLETE trial (see `autotransfer trials`)"
        )
    check_artifact_id(trial.number, artifact_id)
    ref = BackboneRef.parse(trial.params["backbone"])
    family = host.family(ref.family)
    build_weights = "none" if "none" in family.weights_sources else ref.weights
    backbone = host.build(
        BackboneRef(name=ref.name, weights=build_weights),
        num_classes=num_classes,
        image_size=image_size,
    )
    with tempfile.TemporaryDirectory(prefix="autotransfer-ckpt-") as tmp:
        path = Path(tmp) / "checkpoint.safetensors"
        download_artifact(artifact_store=store, file_path=str(path), artifact_id=artifact_id)
        state = load_file(str(path))
    backbone.model.load_state_dict(state, strict=True)
    pre = trial.user_attrs.get(PREPROCESSING_ATTR)
    if pre:
        backbone.preprocessing = Preprocessing(
            mean=tuple(pre["mean"]), std=tuple(pre["std"]), interpolation=pre["interpolation"]
        )
    backbone.weights = ref.weights
    return backbone


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
