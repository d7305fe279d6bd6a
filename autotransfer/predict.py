"""Predicting with an exported model directory (:mod:`autotransfer.export`).

:func:`load` reads ``config.json`` and runs one of the exported programs:

- ``onnx`` (default): ``model.onnx`` with ONNX Runtime. The file is a protobuf
  graph of tensor operators: loading it runs no pickle and no Python code, the
  runtime is fast on CPU, and it does not depend on TorchScript, which torch 2.x
  has deprecated.
- ``torchscript``: ``model.torchscript.pt`` with ``torch.jit.load`` (plain torch,
  e.g. on a GPU). A TorchScript archive is read by torch's own restricted loader,
  which builds only TorchScript types, never arbitrary Python objects.

Neither path imports the backbone's library (timm) or rebuilds the model, and no
``torch.load`` or pickle is involved. Images are decoded exactly as for training
(:func:`autotransfer.data.square_resize`) and normalised with the exported
mean/std (:func:`autotransfer.augment.normalise`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from autotransfer.exceptions import DataError, ExportError

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image

Runtime = Literal["onnx", "torchscript"]
RUNTIMES: tuple[str, ...] = ("onnx", "torchscript")
BATCH_SIZE = 64


@dataclass
class Prediction:
    """One input's prediction.

    Attributes:
        input: the file path, or ``<image N>`` for an in-memory image.
        label: the most probable class.
        probability: its softmax probability.
        top_k: the ``k`` most probable classes, best first, each
            ``{"label": str, "probability": float}``.
    """

    input: str
    label: str
    probability: float
    top_k: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "label": self.label,
            "probability": self.probability,
            "top_k": self.top_k,
        }


def read_config(export_dir: str | Path) -> dict[str, Any]:
    """The export's ``config.json``, checked.

    Raises:
        ExportError: the directory is missing, or is not an autotransfer export.
    """
    from autotransfer.export import CONFIG_FILE, FORMAT, FORMAT_VERSION

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


class ExportedModel:
    """An exported classifier, ready to predict.

    Attributes:
        path: the export directory.
        config: its ``config.json``.
        labels: class names in output order.
        runtime: ``onnx`` or ``torchscript``.
    """

    def __init__(self, export_dir: str | Path, runtime: Runtime = "onnx") -> None:
        if runtime not in RUNTIMES:
            raise ExportError(f"unknown runtime '{runtime}'; use one of: {', '.join(RUNTIMES)}")
        self.path = Path(export_dir)
        self.config = read_config(self.path)
        self.labels: list[str] = list(self.config["labels"])
        self.runtime = runtime
        pre = self.config["preprocessing"]
        self.image_size: int = int(pre["image_size"])
        self._mean = tuple(float(v) for v in pre["mean"])
        self._std = tuple(float(v) for v in pre["std"])
        self._normalise = not self.config["input"].get("normalisation_in_graph", False)
        self._run = self._load_program()

    def _load_program(self) -> Any:
        name = self.config["files"][self.runtime]
        program = self.path / name
        if not program.is_file():
            raise ExportError(f"export '{self.path}' has no {name}; export it again")
        if self.runtime == "onnx":
            return self._load_onnx(program)
        return self._load_torchscript(program)

    def _load_onnx(self, program: Path) -> Any:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(program), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ExportError(f"'{program}' is not a valid ONNX model ({exc})") from None
        in_name = self.config["input"]["name"]
        out_name = self.config["output"]["name"]
        return lambda x: session.run([out_name], {in_name: x})[0]

    def _load_torchscript(self, program: Path) -> Any:
        import torch

        from autotransfer.export import quiet_torch

        try:
            with quiet_torch():
                module = torch.jit.load(str(program), map_location="cpu").eval()
        except RuntimeError as exc:
            raise ExportError(f"'{program}' is not a valid TorchScript program ({exc})") from None

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()

        return run

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for uint8 images (N, 3, S, S) decoded as for training."""
        import numpy as np
        import torch

        from autotransfer.augment import normalise
        from autotransfer.backbones import Preprocessing

        x = torch.from_numpy(np.ascontiguousarray(images))
        if self._normalise:
            x = normalise(x, Preprocessing(mean=self._mean, std=self._std))
        else:
            x = x.float()
        return self._run(x.contiguous().numpy())

    def predict(
        self,
        inputs: str | Path | PIL.Image.Image | Iterable[str | Path | PIL.Image.Image],
        top_k: int = 1,
    ) -> list[Prediction]:
        """Predict the class of each input.

        Args:
            inputs: image files, folders of images (searched recursively, sorted)
                or PIL images; one or a sequence.
            top_k: how many classes to list per input (at most the class count).

        Returns:
            One :class:`Prediction` per image, in input order.

        Raises:
            DataError: a path is missing, a folder holds no images, or a file
                cannot be read as an image.
        """
        import numpy as np

        if top_k < 1:
            raise DataError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, len(self.labels))
        items = expand_inputs(inputs)
        out: list[Prediction] = []
        for start in range(0, len(items), BATCH_SIZE):
            chunk = items[start : start + BATCH_SIZE]
            batch = np.stack([decode(item, self.image_size) for _, item in chunk])
            probs = _softmax(self.logits(batch.transpose(0, 3, 1, 2)))
            for (name, _), p in zip(chunk, probs, strict=True):
                order = np.argsort(-p, kind="stable")[:k]
                top = [
                    {"label": self.labels[i], "probability": float(p[i])} for i in order
                ]
                out.append(Prediction(name, top[0]["label"], top[0]["probability"], top))
        return out


def load(export_dir: str | Path, runtime: Runtime = "onnx") -> ExportedModel:
    """Load an export directory made by ``autotransfer export``.

    Args:
        export_dir: the directory.
        runtime: ``onnx`` (ONNX Runtime, the default) or ``torchscript``.

    Raises:
        ExportError: not an export, or its program cannot be loaded.
    """
    return ExportedModel(export_dir, runtime)


def expand_inputs(
    inputs: str | Path | PIL.Image.Image | Iterable[str | Path | PIL.Image.Image],
) -> list[tuple[str, Any]]:
    """``(name, path or image)`` for each image; folders become their image files.

    Raises:
        DataError: a path does not exist, a folder has no images, or no input.
    """
    from autotransfer.data import IMAGE_EXTENSIONS

    if isinstance(inputs, (str, Path)) or _is_image(inputs):
        inputs = [inputs]  # type: ignore[list-item]
    items: list[tuple[str, Any]] = []
    for n, item in enumerate(inputs):  # type: ignore[union-attr]
        if _is_image(item):
            items.append((f"<image {n}>", item))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise DataError(
                    f"folder '{path}' has no images ({' '.join(IMAGE_EXTENSIONS)})"
                )
            items += [(str(p), p) for p in files]
        elif path.is_file():
            items.append((str(path), path))
        else:
            raise DataError(f"input '{path}' does not exist; give image files or folders")
    if not items:
        raise DataError("no inputs; give image files or folders of images")
    return items


def decode(item: Any, size: int) -> np.ndarray:
    """uint8 (size, size, 3), decoded exactly like the training data.

    Raises:
        DataError: the file cannot be read as an image.
    """
    from PIL import Image, UnidentifiedImageError

    from autotransfer.data import square_resize

    if _is_image(item):
        return square_resize(item, size)
    try:
        with Image.open(item) as im:
            return square_resize(im, size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = "not an image" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise DataError(f"cannot read '{item}' as an image ({reason})") from None


def _is_image(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(obj, Image.Image)


def _softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


__all__: Sequence[str] = ("ExportedModel", "Prediction", "load", "read_config")
