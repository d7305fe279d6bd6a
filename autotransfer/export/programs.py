"""Writing the exported files: the weights (safetensors) and the two programs
(TorchScript, ONNX), traced from the PyTorch model.

torch, onnx, safetensors and :mod:`autotransfer.data` (torch) are imported
inside the functions: the reader
(:mod:`autotransfer.export.predict`) imports :func:`quiet_torch` from here, and
``autotransfer.load`` with ONNX Runtime must not pay for torch.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autotransfer.export.format import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, TEXT_INPUT_NAMES


def write_weights(model: Any, path: Path, backbone: str) -> None:
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


def write_torchscript(model: Any, example: tuple[Any, ...], path: Path) -> None:
    import torch

    with quiet_torch():
        program = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(program, str(path))


def write_onnx(
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
