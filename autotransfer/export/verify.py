"""Checking an export before it is moved into place: both programs run on a
batch (random images, or texts of other lengths and another batch size than the
traced ones) and are compared with the PyTorch model; a text export's tokenizer
file must give the training tokenizer's ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autotransfer.exceptions import AutotransferError
from autotransfer.export.format import (
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAME,
    TEXT_INPUT_NAMES,
    TOKENIZER_FILE,
    TORCHSCRIPT_FILE,
    encode_texts,
)
from autotransfer.export.programs import quiet_torch, text_inputs

VERIFY_TEXTS = (
    "one", "the export is checked on texts of several lengths, not only one",
    "and on a batch size other than the traced one",
)
PARITY_TOLERANCE = 1e-3  # an export whose programs differ more than this is refused


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
