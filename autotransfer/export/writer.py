"""Exporting a finished trial as a self-contained, ready-to-serve model directory.

The model is rebuilt from the trial's own checkpoint (never retrained) through the
same build path the trial used (:func:`autotransfer.store.checkpoints.load_trial_backbone`)
and written as::

    OUT_DIR/
        model.safetensors      weights (state dict of the whole classifier)
        model.torchscript.pt   TorchScript program: plain torch, no autotransfer/timm
        model.onnx             ONNX program: plain onnxruntime
        config.json            labels, preprocessing, input/output, metrics, versions
        README.md              model card
        tokenizer/             text models: the weights' own tokenizer (tokenizer.json)

For an image model both programs take float32 NCHW input that is already
normalised (``(pixel / 255 - mean) / std``) and return logits. For a text model
they take ``input_ids`` and ``attention_mask`` (int64, batch x sequence, both
axes dynamic) as the tokenizer in ``tokenizer/`` makes them, and return logits.
Before the directory is moved into place both programs are run on a batch (random
images, or texts) and compared with the PyTorch model; the differences are
recorded in ``config.json`` (``verification``).

The directory is written next to ``OUT_DIR`` under a temporary name and renamed
into place, so a reader never sees half an export.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autotransfer._version import __version__
from autotransfer.exceptions import AutotransferError, DataError, ExportError, StorageError
from autotransfer.spec.model import StudySpec
from autotransfer.store.records import (
    ARTIFACTS_ATTR,
    BEST_EPOCH_ATTR,
    CLASSES_ATTR,
    FROZEN_BLOCKS_ATTR,
    N_BLOCKS_ATTR,
    VAL_F1_ATTR,
)
from autotransfer.store.studies import stored_spec, test_metrics

FORMAT = "autotransfer-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
INPUT_NAME = "input"
TEXT_INPUT_NAMES = ("input_ids", "attention_mask")
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer/tokenizer.json"
OUTPUT_NAME = "logits"
TRACE_TEXTS = ("a short text", "a somewhat longer text to trace the model with")
VERIFY_TEXTS = (
    "one", "the export is checked on texts of several lengths, not only one",
    "and on a batch size other than the traced one",
)
ONNX_OPSET = 17
TRAINING_INTERPOLATION = "bilinear"  # autotransfer.data.datasets.square_resize
PARITY_TOLERANCE = 1e-3  # an export whose programs differ more than this is refused


@dataclass
class ExportResult:
    """What :func:`export_trial` wrote."""

    path: Path
    trial: int
    backbone: str
    config: dict[str, Any]


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


def is_export(path: Path) -> bool:
    """Whether ``path`` holds an export made by :func:`export_trial`."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def choose_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """The trial ``number``, or the best one; it must be COMPLETE.

    Raises:
        StorageError: no such trial, it did not complete, or no trial completed.
    """
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if number is None:
        if not complete:
            raise StorageError(
                f"study '{study.study_name}' has no completed trial to export "
                f"({len(trials)} trials); run `autotransfer search` first"
            )
        return study.best_trial
    found = [t for t in trials if t.number == number]
    if not found:
        raise StorageError(
            f"study '{study.study_name}' has no trial {number} (trials 0..{len(trials) - 1}); "
            "see `autotransfer trials`"
        )
    trial = found[0]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        shown = ", ".join(str(t.number) for t in complete) or "none"
        raise StorageError(
            f"trial {number} is {trial.state.name}, it has no model to export; "
            f"completed trials: {shown}"
        )
    return trial


def export_trial(
    study: optuna.Study,
    out_dir: Path,
    trial_number: int | None = None,
    *,
    force: bool = False,
    message: Any = None,
) -> ExportResult:
    """Export trial ``trial_number`` (default: the best) of ``study`` to ``out_dir``.

    Args:
        study: a study made by ``autotransfer search``.
        out_dir: the export directory (created; see :func:`check_target`).
        trial_number: the trial to export; None for the best trial.
        force: replace a previous export in ``out_dir``.
        message: ``message(str)`` for progress lines (stderr in the CLI).

    Raises:
        ExportError: ``out_dir`` cannot be written.
        StorageError: no such trial, or it has no checkpoint.
        DataError: the study has no stored class names and its data set is gone.
        AutotransferError: the exported programs disagree with the model.
    """
    import torch

    from autotransfer.plugins.host import get_plugin_host
    from autotransfer.store.checkpoints import load_trial_backbone
    from autotransfer.store.storage import artifact_store

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
    classes, test = _classes_and_test(study, trial, spec, host, store, say)
    say(f"export: trial {trial.number} ({trial.params['backbone']}) from its checkpoint")
    backbone = load_trial_backbone(
        trial, host, store, num_classes=len(classes), image_size=spec.data.image_size,
        listed=spec.search.backbones,
    )
    model = backbone.model.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with torch.no_grad():
            _write_weights(model, tmp / WEIGHTS_FILE, backbone.name)
        verification = write_programs(backbone, tmp, spec.data.image_size, say=say)
        config = build_config(study, trial, spec, backbone, classes, test, verification)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(model_card(config), encoding="utf-8")
        _usual_permissions(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"export: wrote {out_dir}")
    return ExportResult(out_dir, trial.number, backbone.name, config)


def _classes_and_test(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    spec: StudySpec,
    host: Any,
    store: Any,
    say: Any,
) -> tuple[list[str], dict[str, float] | None]:
    """Class names (stored at search time, else re-read from the data set) and the
    trial's test metrics (computed once and stored, when the data can be read)."""
    from autotransfer.tuning.search import evaluate_best_on_test, prepare_data

    classes = study.user_attrs.get(CLASSES_ATTR)
    test = test_metrics(study).get(str(trial.number))
    if classes and test is not None:
        return list(classes), test
    try:
        splits, _ = prepare_data(spec)
    except DataError as exc:
        if classes:
            say(f"export: no test metrics for trial {trial.number} (data set unreadable: {exc})")
            return list(classes), None
        raise DataError(
            f"study '{study.study_name}' has no stored class names and its data set "
            f"cannot be read to recover them: {exc}"
        ) from None
    if classes and list(classes) != list(splits.classes):
        raise DataError(
            f"the data set '{spec.data.path}' now has classes {splits.classes}, the study was "
            f"trained on {list(classes)}; restore the data set or export without it"
        )
    if test is None:
        say(f"export: computing test metrics of trial {trial.number}")
        test = evaluate_best_on_test(study, trial, host, store, splits, spec)
    return list(splits.classes), test


def _write_weights(model: Any, path: Path, backbone: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "backbone": backbone})


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Hide torch's deprecation notices for the TorchScript and legacy ONNX paths,
    and transformers' notices about attributes tracing touches (e.g. "loss_type=None
    ... unrecognized", which says nothing about an exported classifier)."""
    hf_logger = logging.getLogger("transformers")
    hf_level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        # transformers' text encoders branch on shapes in Python while traced; the
        # export is traced on a padded batch and verified on other shapes.
        warnings.filterwarnings("ignore", message=r".*Converting a tensor to a Python boolean.*")
        warnings.filterwarnings("ignore", message=r".*advanced indexing in opset.*")
        try:
            yield
        finally:
            hf_logger.setLevel(hf_level)


def text_inputs(pre: Any, texts: Any) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` of ``texts`` padded to the longest, as in training."""
    from autotransfer.data.batches import pad

    batch = pad(pre.encode(list(texts)), pre.pad_token_id)
    return batch["input_ids"], batch["attention_mask"]


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
    (:func:`verify`, :func:`verify_text`). Returns the verification record.

    The export's path, and the conformance suite's exportability check
    (:mod:`autotransfer.testing.backbone_family`), with a tighter ``tolerance``.

    Raises:
        AutotransferError: a program differs from the model by more than
            ``tolerance``, or the exported tokenizer encodes differently.
        Exception: tracing or ONNX export failed (what torch raised).
    """
    import torch

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
        _write_torchscript(model, example, out_dir / TORCHSCRIPT_FILE)
        say("export: writing ONNX")
        _write_onnx(model, example, out_dir / ONNX_FILE, names)
        if text:
            return verify_text(model, out_dir, backbone.preprocessing, tolerance=tolerance)
        return verify(model, out_dir, image_size, tolerance=tolerance)


def _write_torchscript(model: Any, example: tuple[Any, ...], path: Path) -> None:
    import torch

    with quiet_torch():
        program = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(program, str(path))


def _write_onnx(
    model: Any, example: tuple[Any, ...], path: Path, names: tuple[str, ...] = (INPUT_NAME,)
) -> None:
    import onnx
    import torch

    if names == TEXT_INPUT_NAMES:
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
    else:
        axes = {name: {0: "batch"} for name in names}
    with quiet_torch():
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=list(names),
            output_names=[OUTPUT_NAME],
            dynamic_axes={**axes, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))


def verify(
    model: Any, export_dir: Path, image_size: int, batch: int = 3,
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, Any]:
    """Run both exported programs and the model on one random batch (a batch size
    other than the traced one); max absolute logit differences.

    Raises:
        AutotransferError: a difference exceeds ``tolerance``.
    """
    import torch

    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    diffs = _compare(model, export_dir, (x,), (INPUT_NAME,), tolerance)
    return {"batch": batch, "input": "random normal", **diffs}


def verify_text(
    model: Any, export_dir: Path, pre: Any, tolerance: float = PARITY_TOLERANCE
) -> dict[str, Any]:
    """:func:`verify` for a text model: a batch of texts of other lengths (and
    another batch size) than the traced ones, encoded by the exported tokenizer
    file with the ``tokenizers`` library, as a plain runtime would, and checked to
    give the same ids as the training tokenizer.

    Raises:
        AutotransferError: the exported tokenizer or a program disagrees.
    """
    ids, mask = text_inputs(pre, VERIFY_TEXTS)
    plain = encode_plain(export_dir, pre.max_length, pre.pad_token_id, VERIFY_TEXTS)
    if not (np_equal(plain[0], ids) and np_equal(plain[1], mask)):
        raise AutotransferError(
            f"the exported {TOKENIZER_FILE} encodes texts differently from the model's "
            "tokenizer; report this with the backbone name"
        )
    diffs = _compare(model, export_dir, (ids, mask), TEXT_INPUT_NAMES, tolerance)
    return {"batch": len(VERIFY_TEXTS), "sequence": int(ids.shape[1]), "input": "texts",
            "tokenizer": f"{TOKENIZER_FILE} (tokenizers library): same ids", **diffs}


def np_equal(a: Any, b: Any) -> bool:
    import numpy as np

    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def encode_plain(
    export_dir: Path, max_length: int, pad_id: int, texts: Any
) -> tuple[Any, Any]:
    """Encode ``texts`` with ``tokenizer/tokenizer.json`` and the ``tokenizers``
    library only, as :mod:`autotransfer.export.predict` (and a user without
    transformers) does. Returns int64 arrays."""
    from tokenizers import Tokenizer

    from autotransfer.export.predict import encode_texts

    tokenizer = Tokenizer.from_file(str(export_dir / TOKENIZER_FILE))
    return encode_texts(tokenizer, texts, max_length, pad_id)


def _compare(
    model: Any, export_dir: Path, inputs: tuple[Any, ...], names: tuple[str, ...],
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, Any]:
    """Max absolute logit differences of both programs from ``model`` on ``inputs``."""
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        ref = model(*inputs)
        with quiet_torch():
            program = torch.jit.load(str(export_dir / TORCHSCRIPT_FILE), map_location="cpu")
        ts = program(*inputs)
    session = ort.InferenceSession(
        str(export_dir / ONNX_FILE), providers=["CPUExecutionProvider"]
    )
    feed = {n: x.numpy() for n, x in zip(names, inputs, strict=True)}
    onnx_out = torch.from_numpy(session.run([OUTPUT_NAME], feed)[0])
    diffs = {
        "torchscript_max_abs_diff": float((ts - ref).abs().max()),
        "onnx_max_abs_diff": float((onnx_out - ref).abs().max()),
    }
    for name, diff in diffs.items():
        if not diff <= tolerance:
            raise AutotransferError(
                f"exported program differs from the model: {name} = {diff:.2e} > "
                f"{tolerance:g}; report this with the backbone name"
            )
    return diffs


def _usual_permissions(root: Path) -> None:
    """mkdtemp makes a 0700 directory: give it (and what is in it) the umask's modes."""
    import os

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
) -> dict[str, Any]:
    """The ``config.json`` mapping (see docs/export.md for each field)."""
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
        "task": "image-classification",
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
            "seed": spec.data.seed,
        },
    }


def _text_fields(spec: StudySpec, backbone: Any, n_classes: int) -> dict[str, Any]:
    pre = backbone.preprocessing
    return {
        "task": "text-classification",
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
            "seed": spec.data.seed,
        },
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def model_card(config: dict[str, Any]) -> str:
    """The export's ``README.md``: what the model is, how good, how it was found."""
    c = config
    test = c["metrics"]["test"] or {}
    val = c["metrics"]["val"]
    states = c["study"]["states"]
    pre = c["preprocessing"]
    t = c["trial"]
    bb = c["backbone"]
    data = c["data"]
    ver = c["verification"]
    params = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(t["params"].items()))
    labels = ", ".join(c["labels"][:50]) + (" ..." if len(c["labels"]) > 50 else "")
    split = "/".join(f"{data['split'][k]:g}" for k in ("train", "val", "test"))
    text = c["task"] == "text-classification"
    kind, noun = ("Text", "texts") if text else ("Image", "images")
    io = _text_io(c) if text else _image_io(c)
    use = _text_use(c) if text else _image_use(c)
    shape = (
        f"texts truncated to {pre['max_length']} tokens" if text
        else f"images at {pre['image_size']} px"
    )
    running = f", {states['running']} running" if states.get("running") else ""
    trials_line = (
        f"{c['study']['n_trials']} trials: {states.get('complete', 0)} complete, "
        f"{states.get('pruned', 0)} pruned, {states.get('fail', 0)} failed{running}."
    )
    tok_line = (
        f"\n- `{c['preprocessing']['tokenizer_dir']}/`: the tokenizer "
        "(`tokenizer.json` loads with the `tokenizers` library or transformers' "
        "`AutoTokenizer`)." if text else ""
    )
    checked = (
        f"{ver.get('batch')} texts, encoded by the exported tokenizer file"
        if text else "a random batch"
    )
    val_row = f"| {_fmt(val['accuracy'])} | {_fmt(val['macro_f1'])} | |"
    test_row = (
        f"| {_fmt(test.get('accuracy'))} | {_fmt(test.get('macro_f1'))} "
        f"| {_fmt(test.get('n'))} |"
    )
    return f"""# {bb["name"]} fine-tuned on {data["path"]}

{kind} classifier ({c["num_classes"]} classes) exported by autotransfer
{c["versions"]["autotransfer"]} from trial {t["number"]} of study `{c["study"]["name"]}`.

## Metrics

| split | accuracy | macro F1 | {noun} |
|---|---|---|---|
| validation (used to choose the trial) {val_row}
| test (held out, never seen by the search) {test_row}

## Data

`{data["path"]}`, split per class train/val/test = {split} (seed {data["seed"]}),
{shape}. Labels, in output order: {labels}.

## Search

{trials_line}
Backbone `{bb["name"]}` with `{bb["weights"]}` weights, {_fmt(t["frozen_blocks"])} of
{_fmt(t["n_blocks"])} trunk blocks frozen, {t["epochs"]} epochs
(best epoch {_fmt(t["best_epoch"])}), retention `{t["retention"]}`.
Parameters of the exported trial:

| parameter | value |
|---|---|
{params}

{io}
## Files

- `{c["files"]["onnx"]}`: ONNX (opset {c["onnx"]["opset"]}), runs with plain onnxruntime.
- `{c["files"]["torchscript"]}`: TorchScript, runs with plain torch (`torch.jit.load`).
- `{c["files"]["weights"]}`: the weights (safetensors) of the `{bb["name"]}` classifier.
- `config.json`: labels, preprocessing, input/output, metrics, versions.{tok_line}

At export both programs were checked against the PyTorch model on {checked}:
max abs logit difference {ver["torchscript_max_abs_diff"]:.1e} (TorchScript),
{ver["onnx_max_abs_diff"]:.1e} (ONNX).

{use}
## Limits

Trained on {c["data"]["path"]} only; expect it to be wrong on {noun} unlike those.
Validation and test metrics come from small splits; see the counts above.
"""


def _image_io(c: dict[str, Any]) -> str:
    pre = c["preprocessing"]
    size = pre["image_size"]
    return f"""## Input and output

Both programs take **float32 NCHW input that is already normalised** and return
**logits** (softmax gives probabilities):

1. decode as RGB, crop the centre square, resize to {size}x{size} ({pre["interpolation"]});
2. scale to [0, 1] (divide by 255);
3. subtract mean {pre["mean"]} and divide by std {pre["std"]}, per channel.

Input `{c["input"]["name"]}` shape (batch, 3, {size}, {size}); output
`{c["output"]["name"]}` shape (batch, {c["num_classes"]}). Normalisation is not part
of the graphs.
"""


def _text_io(c: dict[str, Any]) -> str:
    pre = c["preprocessing"]
    return f"""## Input and output

Both programs take two int64 inputs of shape (batch, sequence), `input_ids` and
`attention_mask`, and return **logits** (softmax gives probabilities), shape
(batch, {c["num_classes"]}). Make them with the tokenizer in `{pre["tokenizer_dir"]}/`
(the fine-tuned backbone's own):

1. encode each text with `{pre["tokenizer_file"]}` (special tokens added), truncated to
   {pre["max_length"]} tokens;
2. pad every text of the batch to the longest with id {pre["pad_token_id"]};
3. `attention_mask` is 1 for real tokens and 0 for padding.

Both axes are dynamic: any batch size and any length up to {pre["max_length"]}.
"""


def _image_use(c: dict[str, Any]) -> str:
    return f"""## Use

```
autotransfer predict THIS_DIR image.png more_images/ --top-k 3
```

```python
import autotransfer
model = autotransfer.load("THIS_DIR")
print(model.predict(["image.png"], top_k=3))
```

Without autotransfer, see config.json for the preprocessing and run `model.onnx` with
onnxruntime (input name `{c["input"]["name"]}`).
"""


def _text_use(c: dict[str, Any]) -> str:
    pre = c["preprocessing"]
    return f"""## Use

```
autotransfer predict THIS_DIR --text "where is my parcel" --top-k 3
autotransfer predict THIS_DIR texts.txt        # one text per line; or a .csv/.jsonl file
```

```python
import autotransfer
model = autotransfer.load("THIS_DIR")
print(model.predict(["where is my parcel"], top_k=3))
```

Without autotransfer (plain `tokenizers` and `onnxruntime`):

```python
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer

tok = Tokenizer.from_file("THIS_DIR/{pre["tokenizer_file"]}")
tok.enable_truncation(max_length={pre["max_length"]})
tok.enable_padding(pad_id={pre["pad_token_id"]})
enc = tok.encode_batch(["where is my parcel", "I was charged twice"])
feed = {{"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}}
logits = ort.InferenceSession("THIS_DIR/model.onnx").run(["logits"], feed)[0]
```
"""
