"""Labelled data: loaded and decoded once, split stratified and seeded.

Images are kept as one uint8 tensor (N, 3, S, S) at the spec's image size, so
every trial of a worker reuses the decoded data; normalisation and augmentation
happen per batch on tensors (:mod:`autotransfer.data.augment`). Given a
directory for it (the study's artifacts), the tensor is a memory-mapped file
decoded once per machine and shared by every worker
(:mod:`autotransfer.data.decoded`); the train/val/test parts are row indices
into it, never copies, and a batch reads only its own rows.

Texts come from a CSV or JSONL file (a text and a label column) and are kept as
strings; each tokenizer encodes them once per worker (:meth:`TextSet.encoded`)
and batches are padded to their longest text (:mod:`autotransfer.data.batches`).

Long because it holds every reader (image folders, sklearn digits, CSV and
JSONL texts, given validation and test sets) and the split, which share one
set of checks and messages.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from autotransfer.exceptions import DataError
from autotransfer.spec.model import DataSpec, SplitSpec

if TYPE_CHECKING:
    import PIL.Image

    from autotransfer.backbones import TextPreprocessing

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN_SETS = ("sklearn:digits",)
MAX_CORRUPT_FRACTION = 0.1


class ImageSet:
    """Images (uint8, N×3×S×S), integer labels and the class names.

    Args:
        images: the decoded images (held in memory or mapped from a file).
        labels: one label per image of the set.
        classes: the class names, in label order.
        rows: the rows of ``images`` that make up this set (a subset); None:
            all of them. A subset shares ``images`` with the set it came from.
    """

    modality = "image"
    noun = "image"

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: list[str],
        rows: torch.Tensor | None = None,
    ) -> None:
        self.store = images
        self.labels = labels
        self.classes = classes
        self.rows = rows

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __repr__(self) -> str:
        shape = (len(self), *self.store.shape[1:])
        return f"ImageSet({shape}, {len(self.classes)} classes)"

    @property
    def images(self) -> torch.Tensor:
        """This set's images (N, 3, S, S); a subset's are gathered into a new
        tensor, so trainers read batches with :meth:`take` instead."""
        return self.store if self.rows is None else self.store[self.rows]

    def take(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """The images of this set's rows ``idx`` (a batch), read from the store."""
        if self.rows is None:
            return self.store[idx]
        return self.store[self.rows[idx]]

    def subset(self, index: np.ndarray) -> ImageSet:
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = idx if self.rows is None else self.rows[idx]
        return ImageSet(self.store, self.labels[idx], self.classes, rows)


@dataclass
class TextSet:
    """Texts, integer labels and the class names.

    ``encoded(pre)`` tokenizes every text once per tokenizer and max length and
    keeps the token ids, so the trials of a worker that share a backbone share
    the work.
    """

    texts: list[str]
    labels: torch.Tensor
    classes: list[str]
    _encoded: dict[tuple[str, int], list[list[int]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    modality = "text"
    noun = "text"

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: np.ndarray) -> TextSet:
        return TextSet([self.texts[i] for i in index], self.labels[torch.as_tensor(index)],
                       self.classes)

    def encoded(self, pre: TextPreprocessing) -> list[list[int]]:
        """Token ids of every text under ``pre`` (computed once, then cached)."""
        key = (pre.fingerprint, pre.max_length)
        if key not in self._encoded:
            self._encoded[key] = pre.encode(self.texts)
        return self._encoded[key]


Dataset = ImageSet | TextSet


def concat(a: Dataset, b: Dataset) -> Dataset:
    """The examples of ``a`` then those of ``b`` (same modality and classes), e.g.
    train + validation for a refit."""
    if a.classes != b.classes or a.modality != b.modality:
        raise ValueError("concat needs two sets of the same modality and classes")
    labels = torch.cat([a.labels, b.labels])
    if isinstance(a, ImageSet) and isinstance(b, ImageSet):
        return ImageSet(torch.cat([a.images, b.images]), labels, a.classes)
    assert isinstance(a, TextSet) and isinstance(b, TextSet)
    return TextSet([*a.texts, *b.texts], labels, a.classes)


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset

    @property
    def classes(self) -> list[str]:
        return self.train.classes


    @property
    def modality(self) -> str:
        return self.train.modality


def load_dataset(spec: DataSpec, decoded_dir: Path | None = None) -> Dataset:
    """Load the data set named by ``spec.path`` (images at ``spec.image_size``).

    ``decoded_dir``: keep the decoded images in a memory-mapped file there,
    decoded once and shared by every process that loads the same data
    (:mod:`autotransfer.data.decoded`); None: decode into this process's memory.

    Raises:
        DataError: missing or empty folder, fewer than two classes, files that are
            not images, or mostly unreadable images; for a text file: a missing
            column, an empty text or label, an unreadable line.
    """
    if spec.modality == "text":
        return load_text_file(Path(spec.path), spec.text_column, spec.label_column)
    if spec.path == "sklearn:digits":
        if decoded_dir is None:
            return _digits(spec.image_size)
        return _shared_digits(decoded_dir, spec.image_size)
    if ":" in spec.path and not Path(spec.path).exists():
        raise DataError(
            f"unknown data set '{spec.path}'; give an image folder or one of: "
            + ", ".join(BUILTIN_SETS)
        )
    root = Path(spec.path)
    files, classes = scan_image_folder(root)
    if decoded_dir is None:
        return _decode(root, files, classes, spec.image_size)
    return _shared_folder(decoded_dir, root, files, classes, spec.image_size)


def _digits(size: int) -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 intensities 0..16 -> 0..255, grey -> 3 channels, upsampled once.
    x = torch.from_numpy(digits.images).float().mul_(255.0 / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.clamp_(0, 255).round_().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    return ImageSet(images, labels, [str(c) for c in digits.target_names])


def scan_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """The image files of a folder of class sub-folders, each with its label,
    and the class names (sorted sub-folder names).

    Raises:
        DataError: missing or empty folder, fewer than two classes, files that
            are not images, a class with no images.
    """
    if not root.exists():
        raise DataError(
            f"data folder '{root}' does not exist; give an image folder (one sub-folder per class)"
        )
    if not root.is_dir():
        raise DataError(
            f"data path '{root}' is a file; give an image folder (one sub-folder per class) "
            "or a text data set (.csv or .jsonl)"
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"data folder '{root}' has no class sub-folders; put each class's images in its "
            "own sub-folder"
        )
    if len(class_dirs) < 2:
        raise DataError(
            f"data folder '{root}' has one class ('{class_dirs[0].name}'); a classifier needs "
            "at least 2 class sub-folders"
        )
    files: list[tuple[Path, int]] = []
    unsupported: list[Path] = []
    empty: list[str] = []
    for label, d in enumerate(class_dirs):
        entries = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS]
        unsupported += [p for p in entries if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not images:
            empty.append(d.name)
        files += [(p, label) for p in images]
    if unsupported:
        shown = ", ".join(str(p.relative_to(root)) for p in unsupported[:3])
        more = f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else ""
        raise DataError(
            f"data folder '{root}' has files that are not images: {shown}{more}; "
            f"supported: {' '.join(IMAGE_EXTENSIONS)}; move them out"
        )
    if empty:
        raise DataError(
            f"class folder(s) with no images in '{root}': {', '.join(empty)}; "
            f"add images ({' '.join(IMAGE_EXTENSIONS)}) or remove the folder"
        )
    return files, [d.name for d in class_dirs]


def square_resize(image: PIL.Image.Image, size: int) -> np.ndarray:
    """RGB, centre square crop, bilinear resize: uint8 (size, size, 3).

    The one decoding path for training data and for ``autotransfer predict``.
    """
    from PIL import Image

    im = image.convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def decode_into(
    out: np.ndarray, root: Path, files: list[tuple[Path, int]], size: int
) -> tuple[list[int], list[Path]]:
    """Decode ``files`` at ``size`` into the first rows of ``out`` (uint8,
    (len(files), 3, size, size): in memory or a mapped file), readable images
    only, in order. Returns the labels of the rows written and the unreadable
    files (each logged).

    Raises:
        DataError: more than :data:`MAX_CORRUPT_FRACTION` of the files cannot be read.
    """
    from PIL import Image, UnidentifiedImageError

    labels: list[int] = []
    bad: list[Path] = []
    for path, label in files:
        try:
            with Image.open(path) as im:
                arr = square_resize(im, size)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            bad.append(path)
            continue
        out[len(labels)] = arr.transpose(2, 0, 1)
        labels.append(label)
    if len(bad) > MAX_CORRUPT_FRACTION * len(files):
        raise DataError(
            f"{len(bad)} of {len(files)} images in '{root}' cannot be read "
            f"(e.g. {bad[0].relative_to(root)}); fix or remove them"
        )
    for p in bad:
        log.warning("skipped unreadable image %s", p)
    return labels, bad


def _decode(root: Path, files: list[tuple[Path, int]], classes: list[str], size: int) -> ImageSet:
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)
    labels, _ = decode_into(images, root, files, size)
    return ImageSet(torch.from_numpy(images[: len(labels)].copy()),
                    torch.tensor(labels, dtype=torch.long), classes)


def _shared_folder(
    directory: Path, root: Path, files: list[tuple[Path, int]], classes: list[str], size: int
) -> ImageSet:
    """The images of ``files`` at ``size`` from their shared entry in ``directory``
    (:mod:`autotransfer.data.decoded`), decoded into it first if there is none."""
    from autotransfer.data.decoded import folder_key, shared_images

    def fill(out: np.ndarray) -> tuple[list[int], list[str], list[str]]:
        labels, bad = decode_into(out, root, files, size)
        return labels, classes, [p.relative_to(root).as_posix() for p in bad]

    key = folder_key(root, files, classes, size)
    d = shared_images(directory, root.name, str(root.resolve()), key, len(files), size, fill)
    if not d.meta["decoded_here"]:  # decoding logged them
        for rel in d.meta.get("skipped", []):
            log.warning("skipped unreadable image %s", root / rel)
    return ImageSet(d.images, d.labels, d.classes)


def _shared_digits(directory: Path, size: int) -> ImageSet:
    """scikit-learn's digits at ``size`` from their shared entry in ``directory``."""
    import sklearn

    from autotransfer.data.decoded import builtin_key, shared_images

    def fill(out: np.ndarray) -> tuple[list[int], list[str], list[str]]:
        digits = _digits(size)
        out[: len(digits)] = digits.images.numpy()
        return digits.labels.tolist(), digits.classes, []

    key = builtin_key("sklearn:digits", sklearn.__version__, size)
    d = shared_images(directory, "sklearn-digits", "sklearn:digits", key, 1797, size, fill)
    return ImageSet(d.images, d.labels, d.classes)


def load_text_file(path: Path, text_column: str = "text", label_column: str = "label") -> TextSet:
    """Read a ``.csv`` (header row) or ``.jsonl`` (one object per line) text set.

    Labels are read as strings (JSON numbers too); classes are sorted, numerically
    when every label is an integer.

    Raises:
        DataError: missing file, missing column (the columns present are named),
            an empty text or label, an unreadable line (its number is named), no
            rows, or fewer than two classes.
    """
    if not path.exists():
        raise DataError(
            f"data file '{path}' does not exist; give a CSV or JSONL file with "
            f"'{text_column}' and '{label_column}' columns"
        )
    if path.is_dir():
        raise DataError(f"data path '{path}' is a folder; give a .csv or .jsonl file")
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() == ".csv":
                rows = _csv_rows(f, path, text_column, label_column)
            else:
                rows = _jsonl_rows(f, path, text_column, label_column)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8"
        ) from None
    if not rows:
        raise DataError(f"data file '{path}' has no rows; add labelled texts")
    names = sorted({label for _, _, label in rows}, key=_label_order)
    if len(names) < 2:
        raise DataError(
            f"data file '{path}' has one class ('{names[0]}'); a classifier needs at least "
            f"2 different values in column '{label_column}'"
        )
    index = {name: i for i, name in enumerate(names)}
    texts = [text for _, text, _ in rows]
    labels = torch.tensor([index[label] for _, _, label in rows], dtype=torch.long)
    return TextSet(texts, labels, names)


def _label_order(label: str) -> tuple[int, Any]:
    try:
        return (0, int(label))
    except ValueError:
        return (1, label)


def _check_row(path: Path, line: int, text: Any, label: Any, tc: str, lc: str) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise DataError(
            f"{path}:{line}: empty text in column '{tc}'; fill it in or remove the line"
        )
    if isinstance(label, bool) or not isinstance(label, str | int) or not str(label).strip():
        raise DataError(
            f"{path}:{line}: label {json.dumps(label)} in column '{lc}' is not a class name; "
            "use a non-empty string or an integer"
        )
    return text, str(label).strip()


def _csv_rows(f: Any, path: Path, tc: str, lc: str) -> list[tuple[int, str, str]]:
    reader = csv.reader(f)
    rows: list[tuple[int, str, str]] = []
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"data file '{path}' is empty; add a header row and labelled texts")
        header = [h.strip() for h in header]
        missing = [c for c in (tc, lc) if c not in header]
        if missing:
            raise DataError(
                f"data file '{path}' has no column {', '.join(repr(c) for c in missing)}; "
                f"its columns: {', '.join(header)}; name the columns with "
                "--text-column/--label-column (data.text_column/data.label_column)"
            )
        ti, li = header.index(tc), header.index(lc)
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: {len(row)} fields, the header has "
                    f"{len(header)}; quote texts that contain commas"
                )
            rows.append((reader.line_num, *_check_row(path, reader.line_num, row[ti], row[li],
                                                      tc, lc)))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: unreadable CSV line ({exc})") from None
    return rows


def _jsonl_rows(f: Any, path: Path, tc: str, lc: str) -> list[tuple[int, str, str]]:
    rows: list[tuple[int, str, str]] = []
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{line_no}: not a JSON object ({exc.msg}); write one object per line"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{line_no}: a JSON {type(record).__name__}, not an object; write one "
                f'object per line, e.g. {{"{tc}": "...", "{lc}": "..."}}'
            )
        missing = [c for c in (tc, lc) if c not in record]
        if missing:
            raise DataError(
                f"{path}:{line_no}: no field {', '.join(repr(c) for c in missing)}; its fields: "
                f"{', '.join(record) or 'none'}; name the fields with "
                "--text-column/--label-column (data.text_column/data.label_column)"
            )
        rows.append((line_no, *_check_row(path, line_no, record[tc], record[lc], tc, lc)))
    return rows


PARTS = ("train", "val", "test")


def split_fractions(split: SplitSpec, given: tuple[str, ...] = ()) -> dict[str, float]:
    """The fraction of each class that goes to each part split off the data.

    Parts in ``given`` (``val``, ``test``: sets of their own) are not split off;
    the other parts' fractions are scaled so they keep their ratio and take the
    given parts' share (60/20/20 with a given validation set: 75/25 train/test).
    """
    wanted = {p: getattr(split, p) for p in PARTS}
    kept = {p: f for p, f in wanted.items() if p not in given}
    scale = sum(wanted.values()) / sum(kept.values())
    return {p: min(1.0, f * scale) for p, f in kept.items()}


def min_per_class(split: SplitSpec, given: tuple[str, ...] = ()) -> int:
    """The fewest examples a class needs so each part split off gets at least one."""
    fractions = split_fractions(split, given)
    return max(len(fractions), math.ceil(1 / min(fractions.values()) - 1e-9))


def stratified_split(
    data: Dataset, split: SplitSpec, seed: int, given: dict[str, Dataset] | None = None
) -> Splits:
    """Split each class by the fractions in ``split``, shuffled with ``seed``.

    ``given`` holds the parts the user gave as their own sets (``val``, ``test``,
    already matched to ``data``'s classes); they are used as they are and the rest
    of ``data`` is split into the other parts (:func:`split_fractions`).

    Raises:
        DataError: a class has too few examples for every part to get one.
    """
    given = given or {}
    fractions = split_fractions(split, tuple(given))
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    parts: dict[str, list[np.ndarray]] = {p: [] for p in fractions}
    need = min_per_class(split, tuple(given))
    for c, name in enumerate(data.classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < need:
            shown = "/".join(fractions) + " = " + "/".join(f"{f:g}" for f in fractions.values())
            note = f" (data.{' and data.'.join(given)} given)" if given else ""
            raise DataError(
                f"class '{name}' has {len(idx)} {data.noun}(s); the split {shown}{note} "
                f"needs at least {need} per class; add {data.noun}s or change data.split"
            )
        idx = rng.permutation(idx)
        start = 0
        for i, (part, fraction) in enumerate(fractions.items()):
            left = len(idx) - start - (len(fractions) - 1 - i)  # one for each later part
            n = min(max(1, round(fraction * len(idx))), left)
            parts[part].append(idx[start : start + n])
            start += n
    split_off = {k: data.subset(np.sort(np.concatenate(v))) for k, v in parts.items()}
    return Splits(**split_off, **given)


def load_splits(spec: DataSpec, decoded_dir: Path | None = None) -> Splits:
    """Load ``spec.path`` and any given ``val``/``test`` set, and split the rest
    (``decoded_dir``: see :func:`load_dataset`).

    Raises:
        DataError: bad data (see :func:`load_dataset`), a given set whose classes
            differ from ``spec.path``'s, or a class too small for the split.
    """
    data = load_dataset(spec, decoded_dir)
    given = {
        part: _matched(load_dataset(spec.model_copy(update={"path": path, "val": None,
                                                             "test": None}), decoded_dir),
                       data, part, path, spec.path)
        for part, path in spec.given.items()
    }
    return stratified_split(data, spec.split, spec.seed, given)


def _matched(part_set: Dataset, data: Dataset, part: str, path: str, main: str) -> Dataset:
    """``part_set`` with its labels numbered as ``data``'s classes.

    Raises:
        DataError: the two sets' classes differ (each difference is named).
    """
    if part_set.classes == data.classes:
        return part_set
    missing = [c for c in data.classes if c not in part_set.classes]
    extra = [c for c in part_set.classes if c not in data.classes]
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"no examples of {', '.join(repr(c) for c in missing)}")
        if extra:
            problems.append(f"classes not in data.path: {', '.join(repr(c) for c in extra)}")
        raise DataError(
            f"data.{part} '{path}' has {' and '.join(problems)}; its classes must be those of "
            f"data.path '{main}' ({', '.join(data.classes)})"
        )
    order = torch.tensor([data.classes.index(c) for c in part_set.classes], dtype=torch.long)
    remapped = part_set.subset(np.arange(len(part_set)))
    remapped.labels = order[part_set.labels]
    remapped.classes = data.classes
    return remapped
