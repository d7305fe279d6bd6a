"""What ``predict`` reads: image files, folders of images and PIL images,
decoded exactly as for training (:func:`autotransfer.data.datasets.square_resize`),
or texts from ``.txt``/``.csv``/``.jsonl`` files.

:mod:`autotransfer.data` loads torch, so it is imported inside the functions:
``autotransfer.load`` of a text model with ONNX Runtime never needs it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotransfer.exceptions import DataError

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image

TEXT_FILE_SUFFIXES = (".txt", ".csv", ".jsonl")
"""Inputs a text model reads: one text per line, or the text column/field."""


def read_texts(paths: Iterable[str | Path], column: str = "text") -> list[str]:
    """Texts from files: ``.txt`` (one text per non-blank line), ``.csv`` (the
    ``column`` of a file with a header row) or ``.jsonl`` (the ``column`` field).

    Raises:
        DataError: a missing file, an image or other binary file, a missing
            column, an unreadable line, or no texts at all.
    """
    from autotransfer.data.datasets import IMAGE_EXTENSIONS

    texts: list[str] = []
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise DataError(
                f"input '{path}' does not exist; give text files (.txt one text per line, "
                ".csv, .jsonl) or --text"
            )
        if path.is_dir() or path.suffix.lower() in IMAGE_EXTENSIONS:
            what = "a folder" if path.is_dir() else "an image"
            raise DataError(
                f"'{path}' is {what}; this model classifies text: give text files "
                "(.txt one text per line, .csv, .jsonl) or --text"
            )
        try:
            if path.suffix.lower() in (".csv", ".jsonl"):
                texts += _column(path, column)
                continue
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            raise DataError(
                f"'{path}' is not UTF-8 text; this model classifies text: give text files "
                "(.txt one text per line, .csv, .jsonl) or --text"
            ) from None
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise DataError("no texts in the inputs; give non-empty text files or --text")
    return texts


def _column(path: Path, column: str) -> list[str]:
    """The ``column`` of a CSV/JSONL file (its labels, if any, are not needed)."""
    import csv
    import json

    if path.suffix.lower() == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
            if not isinstance(record, dict) or column not in record:
                raise DataError(f"{path}:{n}: no field '{column}'; the model reads '{column}'")
            out.append(str(record[column]))
        return out
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if column not in header:
            raise DataError(
                f"'{path}' has no column '{column}' (its columns: {', '.join(header) or 'none'}); "
                "the model reads that column"
            )
        i = header.index(column)
        try:
            return [row[i] for row in reader if len(row) > i and row[i].strip()]
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: unreadable CSV line ({exc})") from None


def refuse_text_files(items: list[tuple[str, Any]]) -> None:
    for name, item in items:
        if isinstance(item, Path) and item.suffix.lower() in TEXT_FILE_SUFFIXES:
            raise DataError(
                f"cannot read '{name}' as an image: it is a text file; this model "
                "classifies images: give image files or folders"
            )


def expand_inputs(
    inputs: str | Path | PIL.Image.Image | Iterable[str | Path | PIL.Image.Image],
) -> list[tuple[str, Any]]:
    """``(name, path or image)`` for each image; folders become their image files.

    Raises:
        DataError: a path does not exist, a folder has no images, or no input.
    """
    from autotransfer.data.datasets import IMAGE_EXTENSIONS

    if isinstance(inputs, (str, Path)) or is_image(inputs):
        inputs = [inputs]  # type: ignore[list-item]
    items: list[tuple[str, Any]] = []
    for n, item in enumerate(inputs):  # type: ignore[union-attr]
        if is_image(item):
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

    from autotransfer.data.datasets import square_resize

    if is_image(item):
        return square_resize(item, size)
    try:
        with Image.open(item) as im:
            return square_resize(im, size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = "not an image" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise DataError(f"cannot read '{item}' as an image ({reason})") from None


def is_image(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(obj, Image.Image)
