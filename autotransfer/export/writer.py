"""Exporting a finished trial as a self-contained, ready-to-serve model directory.

The model is rebuilt from the trial's own checkpoint through the same build path
the trial used (:func:`autotransfer.store.checkpoints.load_trial_backbone`), or,
with a refit (``export.refit``, ``--refit``), trained again on train + validation
with the trial's parameters and best epoch count (:mod:`autotransfer.tuning.refit`),
or a greedy ensemble of trials (``--ensemble``, :mod:`autotransfer.tuning.ensemble`;
its members refit too when refit is on); ``config.json``'s ``model`` and the card
say which; and written in the export
format (:mod:`autotransfer.export.format`). One job per module:
:mod:`~autotransfer.export.choose` (which trial, its labels and test metrics),
:mod:`~autotransfer.export.programs` (weights, TorchScript, ONNX),
:mod:`~autotransfer.export.verify` (both programs against the model),
:mod:`~autotransfer.export.config` (``config.json``) and
:mod:`~autotransfer.export.card` (the model card); this module puts them together.
Before the directory is moved into place both programs are run on a batch (random
images, or texts) and compared with the PyTorch model; the differences are
recorded in ``config.json`` (``verification``).

The directory is written next to ``OUT_DIR`` under a temporary name and renamed
into place, so a reader never sees half an export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from autotransfer.engine.trainer import evaluate
from autotransfer.exceptions import ExportError, StorageError
from autotransfer.export.card import model_card
from autotransfer.export.choose import choose_trial, classes_and_test, refit_data
from autotransfer.export.config import build_config
from autotransfer.export.format import (
    CARD_FILE,
    CONFIG_FILE,
    FORMAT,
    INPUT_NAME,
    ONNX_FILE,
    TEXT_INPUT_NAMES,
    TOKENIZER_DIR,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    is_export,
)
from autotransfer.export.programs import (
    text_inputs,
    write_onnx,
    write_torchscript,
    write_weights,
)
from autotransfer.export.verify import PARITY_TOLERANCE, verify, verify_text
from autotransfer.plugins.host import get_plugin_host
from autotransfer.store.checkpoints import load_trial_backbone
from autotransfer.store.records import ARTIFACTS_ATTR, BEST_EPOCH_ATTR
from autotransfer.store.storage import artifact_store
from autotransfer.store.studies import stored_spec
from autotransfer.tuning.ensemble import refit_members, select_ensemble
from autotransfer.tuning.refit import refit_trial

TRACE_TEXTS = ("a short text", "a somewhat longer text to trace the model with")


@dataclass
class ExportResult:
    """What :func:`export_trial` wrote."""

    path: Path
    trial: int
    backbone: str
    config: dict[str, Any]
    refit: bool = False
    ensemble: bool = False


def check_target(out_dir: Path, force: bool = False) -> None:
    """Refuse an ``OUT_DIR`` that cannot be (re)written; call before heavy work.

    Raises:
        ExportError: ``out_dir`` is a symlink, a file, a non-empty directory
            without ``force``, or a non-empty directory that is not a previous
            export (never deleted, even with ``force``).
    """
    if out_dir.is_symlink():
        raise ExportError(
            f"export path '{out_dir}' is a symbolic link; give a real directory path"
        )
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"export path '{out_dir}' is a file; give a directory path")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise ExportError(
            f"export directory '{out_dir}' is not empty; give another path, or --force "
            "to replace a previous export"
        )
    if not is_export(out_dir):
        raise ExportError(
            f"export directory '{out_dir}' is not empty and holds no previous export "
            f"(no {CONFIG_FILE} of format '{FORMAT}'); --force only replaces an export, "
            "so remove the directory yourself or give another path"
        )


def export_trial(
    study: optuna.Study,
    out_dir: Path,
    trial_number: int | None = None,
    *,
    force: bool = False,
    message: Any = None,
    refit: bool | None = None,
    ensemble: bool | None = None,
) -> ExportResult:
    """Export trial ``trial_number`` (default: the best) of ``study`` to ``out_dir``.

    Args:
        study: a study made by ``autotransfer search``.
        out_dir: the export directory (created; see :func:`check_target`).
        trial_number: the trial to export; None for the best trial.
        force: replace a previous export in ``out_dir``.
        message: ``message(str)`` for progress lines (stderr in the CLI).
        refit: export a model refit on train + validation
            (:func:`autotransfer.tuning.refit.refit_trial`) instead of the trial's
            checkpoint; None: the study spec's ``export.refit``.
        ensemble: export a greedy ensemble of the study's completed trials
            (:mod:`autotransfer.tuning.ensemble`), chosen on validation from
            their checkpoints; with ``refit``, each member is then refit on
            train + validation; None: the spec's ``export.ensemble`` when no
            ``trial_number`` is given (one is: that trial alone).

    Raises:
        ExportError: ``out_dir`` cannot be written.
        StorageError: no such trial, or it has no checkpoint.
        DataError: the study has no stored class names and its data set is gone,
            or a refit was asked for and the data set cannot be read.
        AutotransferError: the exported programs disagree with the model.
    """
    say = message or (lambda _msg: None)
    out_dir = Path(out_dir)
    check_target(out_dir, force)
    spec = stored_spec(study)
    trial = choose_trial(study, trial_number)
    artifacts = study.user_attrs.get(ARTIFACTS_ATTR)
    if not artifacts:
        raise StorageError(f"study '{study.study_name}' records no artifact directory")
    store = artifact_store(Path(artifacts))
    host = get_plugin_host()
    if ensemble is None:  # the spec's choice; a trial asked for by number is that trial
        ensemble = spec.export.ensemble and trial_number is None
    if ensemble and trial_number is not None:
        raise ExportError(
            f"--trial {trial_number} and --ensemble exclude each other: an ensemble is chosen "
            "from all completed trials; drop one of them"
        )
    refit = spec.export.refit if refit is None else refit
    data = refit_data(spec) if refit or ensemble else None
    classes, test = classes_and_test(
        study, trial, spec, host, store, say, data[0] if data else None
    )
    trial_test = None
    if ensemble:
        assert data is not None
        chosen = select_ensemble(study, trial, spec, host, store, data[0].val, say=say)
        held = {"kind": "ensemble", "trained_on": "train", "members": chosen.members,
                "val_accuracy": chosen.val_accuracy}
        if refit:
            chosen, refits = refit_members(chosen, study, spec, host, store, data[0], data[1],
                                           say=say)
            held = {**held, "trained_on": "train+val", "members": chosen.members,
                    "train_examples": refits[0].train_examples,
                    "seconds": round(sum(r.seconds for r in refits), 1)}
        backbone = chosen.backbone
        trial_test = test
        test = evaluate(backbone, data[0].test, spec.train.eval_batch_size).record(classes)
        say(f"export: ensemble of trials "
            f"{', '.join(str(m['trial']) for m in chosen.members)}"
            f"{' (refit on train+val)' if refit else ''}: val_acc "
            f"{chosen.val_accuracy:.3f} (members' checkpoints), test_acc {test['accuracy']:.3f}")
    elif data is not None:
        refitted = refit_trial(trial, spec, host, store, data[0], data[1], message=say)
        backbone, trial_test, test = refitted.backbone, test, refitted.test
        held = {
            "kind": "refit", "trained_on": "train+val", "epochs": refitted.epochs,
            "train_examples": refitted.train_examples,
            "examples_seen": refitted.examples_seen,
            "seconds": round(refitted.seconds, 1),
        }
    else:
        say(f"export: trial {trial.number} ({trial.params['backbone']}) from its checkpoint")
        backbone = load_trial_backbone(
            trial, host, store, num_classes=len(classes), image_size=spec.data.image_size,
            listed=spec.search.backbones,
        )
        held = {"kind": "trial", "trained_on": "train",
                "epochs": trial.user_attrs.get(BEST_EPOCH_ATTR)}
    model = backbone.model.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with torch.no_grad():
            write_weights(model, tmp / WEIGHTS_FILE, backbone.name)
        verification = write_programs(backbone, tmp, spec.data.image_size, say=say)
        config = build_config(
            study, trial, spec, backbone, classes, test, verification, held, trial_test
        )
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(model_card(config), encoding="utf-8")
        _usual_permissions(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"export: wrote {out_dir}")
    return ExportResult(out_dir, trial.number, backbone.name, config, refit=refit,
                        ensemble=ensemble)


def write_programs(
    backbone: Any,
    out_dir: Path,
    image_size: int,
    *,
    tolerance: float = PARITY_TOLERANCE,
    say: Any = None,
) -> dict[str, Any]:
    """Write ``backbone``'s model as the two programs of an export (TorchScript
    and ONNX, traced on a batch of two; a text model's tokenizer beside them)
    into ``out_dir``, then run them against the model on another batch
    (:func:`~autotransfer.export.verify.verify`,
    :func:`~autotransfer.export.verify.verify_text`). Returns the verification record.

    The export's path, and the conformance suite's exportability check
    (:mod:`autotransfer.testing.backbone_family`), with a tighter ``tolerance``.

    Raises:
        AutotransferError: a program differs from the model by more than
            ``tolerance``, or the exported tokenizer encodes differently.
        Exception: tracing or ONNX export failed (what torch raised).
    """
    say = say or (lambda _msg: None)
    model = backbone.model.eval()
    text = backbone.modality == "text"
    with torch.no_grad():
        if text:
            backbone.preprocessing.tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))
            example: Any = text_inputs(backbone.preprocessing, TRACE_TEXTS)
            names: tuple[str, ...] = TEXT_INPUT_NAMES
        else:
            g = torch.Generator().manual_seed(0)
            example = (torch.randn(2, 3, image_size, image_size, generator=g),)
            names = (INPUT_NAME,)
        say("export: tracing TorchScript")
        write_torchscript(model, example, out_dir / TORCHSCRIPT_FILE)
        say("export: writing ONNX")
        write_onnx(model, example, out_dir / ONNX_FILE, names)
        if text:
            return verify_text(model, out_dir, backbone.preprocessing, tolerance=tolerance)
        return verify(model, out_dir, image_size, tolerance=tolerance)


def _usual_permissions(root: Path) -> None:
    """mkdtemp makes a 0700 directory: give it (and what is in it) the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for f in root.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing (empty or export) dir is replaced."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
