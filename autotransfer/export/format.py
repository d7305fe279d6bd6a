"""The export format: what an export directory holds, shared by the writer
(:mod:`autotransfer.export.writer`) and the reader (:mod:`autotransfer.export.predict`).

An export directory::

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
axes dynamic) as :func:`encode_texts` makes them from ``tokenizer/tokenizer.json``,
and return logits. docs/export.md describes every ``config.json`` field.

This module imports neither torch nor numpy at load time: ``autotransfer.load``
with ONNX Runtime needs neither.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotransfer.exceptions import ExportError

if TYPE_CHECKING:
    import numpy as np

FORMAT = "autotransfer-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer/tokenizer.json"
INPUT_NAME = "input"
TEXT_INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
IMAGE_TASK = "image-classification"
TEXT_TASK = "text-classification"
ONNX_OPSET = 17


def is_export(path: Path) -> bool:
    """Whether ``path`` holds an export (a ``config.json`` of this format)."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def read_config(export_dir: str | Path) -> dict[str, Any]:
    """The export's ``config.json``, checked.

    Raises:
        ExportError: the directory is missing, or is not an autotransfer export.
    """
    root = Path(export_dir)
    if not root.exists():
        raise ExportError(
            f"export directory '{root}' does not exist; give a directory made by "
            "`autotransfer export`"
        )
    if not root.is_dir():
        raise ExportError(
            f"'{root}' is a file, not an export directory; give a directory made by "
            "`autotransfer export`"
        )
    try:
        config = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(
            f"'{root}' is not an export (no {CONFIG_FILE}); give a directory made by "
            "`autotransfer export`"
        ) from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"'{root / CONFIG_FILE}' cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ExportError(
            f"'{root}' is not an autotransfer export ({CONFIG_FILE} has no format '{FORMAT}')"
        )
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(
            f"'{root}' is export format {config['format_version']}; this autotransfer reads "
            f"up to {FORMAT_VERSION}; upgrade autotransfer"
        )
    return config


def encode_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64, N x longest) of ``texts`` with a
    ``tokenizers.Tokenizer``: special tokens added, truncated to ``max_length``,
    padded with ``pad_id`` to the longest text, as in training."""
    import numpy as np

    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    enc = tokenizer.encode_batch(list(texts))
    length = max(len(e.ids) for e in enc)
    ids = np.full((len(enc), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(enc), length), dtype=np.int64)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return ids, mask
