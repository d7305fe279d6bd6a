"""Predicting with an exported model directory (:mod:`autotransfer.export.writer`).

:func:`load` reads ``config.json`` and runs one of the exported programs:

- ``onnx`` (default): ``model.onnx`` with ONNX Runtime. The file is a protobuf
  graph of tensor operators: loading it runs no pickle and no Python code, the
  runtime is fast on CPU, and it does not depend on TorchScript, which torch 2.x
  has deprecated.
- ``torchscript``: ``model.torchscript.pt`` with ``torch.jit.load`` (plain torch,
  e.g. on a GPU). A TorchScript archive is read by torch's own restricted loader,
  which builds only TorchScript types, never arbitrary Python objects.

Neither path imports the backbone's library (timm, transformers) or rebuilds the
model, and no ``torch.load`` or pickle is involved. Images are decoded exactly as
for training (:func:`autotransfer.data.datasets.square_resize`) and normalised with the
exported mean/std (:func:`autotransfer.data.augment.normalise`). Texts are encoded with
the exported ``tokenizer/tokenizer.json`` by the ``tokenizers`` library (the ids
the training tokenizer gives; the export checks it), truncated to the exported
max length and padded to the longest text of each batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from autotransfer.exceptions import DataError, ExportError, UserInputError
from autotransfer.export.format import TEXT_TASK, encode_texts, read_config
from autotransfer.export.inputs import (
    decode,
    expand_inputs,
    is_image,
    read_texts,
    refuse_text_files,
)
from autotransfer.export.programs import quiet_torch

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
        input: the file path, ``<image N>`` for an in-memory image, or the text.
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


class ExportedModel:
    """An exported classifier, ready to predict.

    Attributes:
        path: the export directory.
        config: its ``config.json``.
        labels: class names in output order.
        runtime: ``onnx`` or ``torchscript``.
        device: where the program runs: ``cpu`` or ``cuda:N``.
    """

    def __init__(
        self, export_dir: str | Path, runtime: Runtime = "onnx", device: str = "auto"
    ) -> None:
        if runtime not in RUNTIMES:
            raise ExportError(f"unknown runtime '{runtime}'; use one of: {', '.join(RUNTIMES)}")
        self.device = resolve_predict_device(device, runtime)
        self.path = Path(export_dir)
        self.config = read_config(self.path)
        self.labels: list[str] = list(self.config["labels"])
        self.runtime = runtime
        self.modality = "text" if self.config.get("task") == TEXT_TASK else "image"
        pre = self.config["preprocessing"]
        if self.modality == "text":
            self.max_length: int = int(pre["max_length"])
            self._pad_id = int(pre["pad_token_id"])
            self._tokenizer = self._load_tokenizer(pre["tokenizer_file"])
            self._input_names: list[str] = list(self.config["input"]["names"])
        else:
            self.image_size: int = int(pre["image_size"])
            self._mean = tuple(float(v) for v in pre["mean"])
            self._std = tuple(float(v) for v in pre["std"])
            self._normalise = not self.config["input"].get("normalisation_in_graph", False)
            self._input_names = [self.config["input"]["name"]]
        self._run = self._load_program()

    def _load_tokenizer(self, name: str) -> Any:
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - installed with transformers
            raise ExportError(
                "a text model needs the PyPI package 'tokenizers'; pip install tokenizers"
            ) from None
        path = self.path / name
        if not path.is_file():
            raise ExportError(f"export '{self.path}' has no {name}; export it again")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own untyped errors
            raise ExportError(f"'{path}' is not a tokenizer file ({exc})") from None

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
            providers: list[Any] = ["CPUExecutionProvider"]
            if self.device.startswith("cuda"):
                index = int(self.device.split(":")[1])
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
            session = ort.InferenceSession(str(program), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ExportError(f"'{program}' is not a valid ONNX model ({exc})") from None
        out_name = self.config["output"]["name"]
        names = self._input_names
        return lambda *xs: session.run([out_name], dict(zip(names, xs, strict=True)))[0]

    def _load_torchscript(self, program: Path) -> Any:
        import torch

        try:
            with quiet_torch():
                module = torch.jit.load(str(program), map_location=self.device).eval()
        except RuntimeError as exc:
            raise ExportError(f"'{program}' is not a valid TorchScript program ({exc})") from None
        device = torch.device(self.device)

        def run(*xs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = module(*(torch.from_numpy(x).to(device) for x in xs))
                return out.float().cpu().numpy()

        return run

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for uint8 images (N, 3, S, S) decoded as for training."""
        import numpy as np
        import torch

        # Here, not at the top: the ONNX path of autotransfer.load needs no torch.
        from autotransfer.backbones import Preprocessing
        from autotransfer.data.augment import normalise

        x = torch.from_numpy(np.ascontiguousarray(images))
        if self._normalise:
            x = normalise(x, Preprocessing(mean=self._mean, std=self._std))
        else:
            x = x.float()
        return self._run(x.contiguous().numpy())

    def text_logits(self, texts: Sequence[str]) -> np.ndarray:
        """Logits (N, classes) of ``texts``, encoded with the exported tokenizer."""
        ids, mask = encode_texts(self._tokenizer, texts, self.max_length, self._pad_id)
        return self._run(ids, mask)

    def predict(
        self,
        inputs: str | Path | PIL.Image.Image | Iterable[str | Path | PIL.Image.Image],
        top_k: int = 1,
    ) -> list[Prediction]:
        """Predict the class of each input.

        Args:
            inputs: for an image model: image files, folders of images (searched
                recursively, sorted) or PIL images; for a text model: the texts
                themselves (strings; read files with :func:`read_texts`). One or
                a sequence.
            top_k: how many classes to list per input (at most the class count).

        Returns:
            One :class:`Prediction` per image or text, in input order.

        Raises:
            DataError: a path is missing, a folder holds no images, a file cannot
                be read as an image, or inputs of the wrong kind (an image or a
                path for a text model, an empty text).
        """
        import numpy as np

        if top_k < 1:
            raise DataError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, len(self.labels))
        if self.modality == "text":
            items: list[tuple[str, Any]] = [(t, t) for t in self._texts(inputs)]
        else:
            items = expand_inputs(inputs)
            refuse_text_files(items)
        # Texts go through in order of length, so that a batch pads its texts to
        # about their own length, not to the longest of the input's.
        order = list(range(len(items)))
        if self.modality == "text":
            order.sort(key=lambda i: len(items[i][0]))
        out: list[Prediction | None] = [None] * len(items)
        for start in range(0, len(items), BATCH_SIZE):
            chunk = order[start : start + BATCH_SIZE]
            if self.modality == "text":
                logits = self.text_logits([items[i][0] for i in chunk])
            else:
                batch = np.stack([decode(items[i][1], self.image_size) for i in chunk])
                logits = self.logits(batch.transpose(0, 3, 1, 2))
            for i, p in zip(chunk, _softmax(logits), strict=True):
                best = np.argsort(-p, kind="stable")[:k]
                top = [{"label": self.labels[c], "probability": float(p[c])} for c in best]
                out[i] = Prediction(items[i][0], top[0]["label"], top[0]["probability"], top)
        return out  # type: ignore[return-value]  (every position is filled)

    def _texts(self, inputs: Any) -> list[str]:
        if isinstance(inputs, str):
            inputs = [inputs]
        texts = []
        for n, item in enumerate(inputs):
            if is_image(item) or isinstance(item, Path):
                shown = f"<image {n}>" if is_image(item) else f"path '{item}'"
                raise DataError(
                    f"{shown}: this model classifies text; give texts (strings), or read "
                    "a text file with autotransfer.export.predict.read_texts"
                )
            if not isinstance(item, str) or not item.strip():
                raise DataError(f"input {n} is {item!r}, not a text; give non-empty strings")
            texts.append(item)
        if not texts:
            raise DataError("no inputs; give one or more texts")
        return texts

    def read_texts(self, paths: Iterable[str | Path]) -> list[str]:
        """The texts in ``paths`` (see :func:`read_texts`); a CSV/JSONL file's text
        column is the one the model was trained on."""
        column = str(self.config.get("data", {}).get("text_column", "text"))
        return read_texts(paths, column)


def load(export_dir: str | Path, runtime: Runtime = "onnx", device: str = "auto") -> ExportedModel:
    """Load an export directory made by ``autotransfer export``.

    Args:
        export_dir: the directory.
        runtime: ``onnx`` (ONNX Runtime, the default) or ``torchscript``.
        device: ``auto`` (the first GPU when the runtime can use one: ONNX Runtime
            with its CUDA provider, i.e. onnxruntime-gpu, or TorchScript with a
            CUDA build of torch; else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ExportError: not an export, or its program cannot be loaded.
        UserInputError: a device this machine or runtime does not have.
    """
    return ExportedModel(export_dir, runtime, device)


def resolve_predict_device(device: str, runtime: str) -> str:
    """``auto|cpu|cuda|cuda:N`` -> ``cpu`` or ``cuda:N`` for ``runtime``.

    Raises:
        UserInputError: a malformed value, or a GPU the runtime cannot use here.
    """
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UserInputError(f"device '{device}' is not valid; use auto, cpu, cuda or cuda:N")
    if device == "cpu":
        return "cpu"
    if runtime == "onnx":
        import onnxruntime as ort

        gpus = 1 if "CUDAExecutionProvider" in ort.get_available_providers() else 0
        why = "onnxruntime has no CUDA provider here (install onnxruntime-gpu)"
    else:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        why = "torch sees no CUDA GPU here"
    if device == "auto":
        return "cuda:0" if gpus else "cpu"
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= gpus:
        raise UserInputError(
            f"device '{device}': {why if not gpus else f'only {gpus} GPU(s) are visible'}; "
            "use --device cpu or auto"
        )
    return f"cuda:{index}"


def _softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


__all__: Sequence[str] = (
    "ExportedModel", "Prediction", "encode_texts", "load", "read_config", "read_texts",
)
