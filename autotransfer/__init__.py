"""autotransfer: AutoML search over how to fine-tune a pretrained backbone."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from autotransfer.export.predict import ExportedModel, Runtime

from autotransfer._version import __version__

__all__ = ["__version__", "load"]


def load(
    export_dir: str | Path, runtime: Runtime = "onnx", device: str = "auto"
) -> ExportedModel:
    """Load a model directory made by ``autotransfer export``.

    ``autotransfer.load(dir).predict(["a.png", "folder/"], top_k=3)``; see
    :func:`autotransfer.export.predict.load` (``device``: ``auto`` uses a GPU when
    the runtime can). Imported lazily so ``import autotransfer``
    stays light.
    """
    from autotransfer.export.predict import load as _load

    return _load(export_dir, runtime, device)
