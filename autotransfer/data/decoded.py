"""Decoded images shared by every worker: one memory-mapped uint8 file per data set.

Decoding an image folder (open, convert, crop, resize) is the slow part of
loading it, and every worker process used to do it and keep its own copy. Here
the decoded images of a data set are written once into ``<artifacts>/decoded/``
(beside the study's checkpoints) and every process that loads the same data at
the same image size (``autotransfer search``, ``autotransfer worker``, one
worker per GPU, a later run) maps that file read-only: the operating system
keeps one copy in its page cache for all of them, and a data set larger than
memory is read from the file as batches ask for their rows.

An entry is a directory ``<name>-<size>px-<key>/`` holding ``images.u8`` (the
N×3×S×S uint8 rows, C order, no header) and ``meta.json`` (row count, image
size, labels, class names, the files that could not be read, which process
decoded it and in how many seconds).

**Key.** sha256 of the format version, the decoder (Pillow's version), the image
size, the class names and, for every file, its path relative to the data
folder, its label, its size in bytes and its modification time in nanoseconds.
A file added, removed, renamed, rewritten or touched gives a new key, so the
data is decoded again. Contents are not hashed (reading every file to hash it
costs most of what decoding it does), so a file replaced by another of the same
size with its old modification time restored (``cp -p``, ``rsync -t``) goes
unnoticed: delete ``<artifacts>/decoded/`` then. The built-in digits set is
keyed by its name and scikit-learn's version.

**Written atomically.** The process that decodes holds a file lock for the key
(``<entry>.lock``; processes started at the same time wait on it, then map what
it wrote), decodes into a temporary directory, flushes it to disk and renames
it into place. A process killed while decoding leaves only its temporary
directory, which the next one removes; an entry that exists is complete. Once
a new entry of a data folder is in place, that folder's entries at the same
size with other keys are removed (a process that still maps one keeps reading
it). A directory that cannot be written (read-only, full disk) is reported
once and the data decoded into the process's own memory, as without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

DIRNAME = "decoded"
"""The sub-directory of the study's artifacts directory that holds the entries."""
FORMAT = 1
IMAGES_FILE = "images.u8"
META_FILE = "meta.json"

Fill = Callable[[np.ndarray], tuple[list[int], list[str], list[str]]]
"""Decodes into the first rows of the array it is given (count×3×S×S uint8);
returns the labels of the rows written, the class names and the files skipped
(relative paths)."""


@dataclass
class Decoded:
    """Decoded images (mapped from an entry, or in memory), their labels and
    class names, and the entry's metadata (``decoded_here``: whether this
    process decoded them)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    meta: dict[str, Any]


def decoded_dir(artifacts: Path) -> Path:
    """Where a study's shared decoded data lives: ``<artifacts>/decoded``."""
    return artifacts / DIRNAME


def folder_key(
    root: Path, files: list[tuple[Path, int]], classes: list[str], size: int
) -> str:
    """The entry key of an image folder at ``size`` (see the module docstring)."""
    from PIL import __version__ as pillow

    h = hashlib.sha256(json.dumps([FORMAT, "folder", pillow, size, classes]).encode())
    for path, label in files:
        st = path.stat()
        rel = path.relative_to(root).as_posix()
        h.update(f"\n{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def builtin_key(name: str, version: str, size: int) -> str:
    """The entry key of a built-in set shipped by a package at ``version``."""
    return hashlib.sha256(json.dumps([FORMAT, name, version, size]).encode()).hexdigest()


def shared_images(
    directory: Path, name: str, source: str, key: str, count: int, size: int, fill: Fill
) -> Decoded:
    """The entry ``key`` of ``directory``, mapped; when it is missing, ``fill``
    decodes at most ``count`` images into a new one first (one process at a
    time; the others wait, then map it).
    ``meta["decoded_here"]`` says whether this call decoded. ``source`` names
    the data (a folder's absolute path): its entries under other keys are
    removed once this one is written."""
    stem = f"{_slug(name)}-{size}px-{key[:20]}"
    entry = directory / stem
    found = _open(entry, size)
    if found is not None:
        return found
    try:
        directory.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock

        lock = FileLock(directory / f"{stem}.lock")
        with lock:
            found = _open(entry, size)  # written while this process waited
            if found is not None:
                return found
            _write(directory, entry, source, count, size, fill)
        _remove_other_keys(directory, stem, source, size)
    except OSError as exc:
        log.warning("cannot keep decoded data in %s (%s); decoding into memory", directory, exc)
        return _in_memory(count, size, fill)
    found = _open(entry, size)
    if found is None:
        raise OSError(f"decoded data entry {entry} unreadable right after it was written")
    found.meta["decoded_here"] = True
    return found


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "data"


def _open(entry: Path, size: int) -> Decoded | None:
    """The entry mapped, or None when it is missing or does not match its metadata."""
    try:
        meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
        n = int(meta["count"])
        shape = (n, 3, size, size)
        if (meta.get("format") != FORMAT or int(meta["size"]) != size or n < 1
                or (entry / IMAGES_FILE).stat().st_size != n * 3 * size * size
                or len(meta["labels"]) != n):
            return None
        # Copy-on-write mapping: pages come from the shared page cache and are
        # never written back (nothing writes to them).
        array = np.memmap(entry / IMAGES_FILE, dtype=np.uint8, mode="c", shape=shape)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    labels = torch.tensor(meta["labels"], dtype=torch.long)
    meta["decoded_here"] = False
    return Decoded(torch.from_numpy(array), labels, list(meta["classes"]), meta)


def _write(directory: Path, entry: Path, source: str, count: int, size: int, fill: Fill) -> None:
    """Decode into a temporary directory beside ``entry``, then rename it into place."""
    if entry.exists():  # not a complete entry (_open refused it): replace it
        shutil.rmtree(entry)
    for stale in directory.glob(f".{entry.name}.tmp-*"):  # left by a killed process
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory / f".{entry.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        start = time.perf_counter()
        row = 3 * size * size
        path = tmp / IMAGES_FILE
        with open(path, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, count * row)  # a full disk fails here, not later
        out = np.memmap(path, dtype=np.uint8, mode="r+", shape=(count, 3, size, size))
        labels, classes, skipped = fill(out)
        out.flush()
        del out
        os.truncate(path, len(labels) * row)
        meta = {
            "format": FORMAT, "source": source, "size": size, "count": len(labels),
            "labels": labels, "classes": classes, "skipped": skipped,
            "decoded_by": {"host": socket.gethostname(), "pid": os.getpid()},
            "decode_seconds": round(time.perf_counter() - start, 3),
        }
        (tmp / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        for p in (path, tmp / META_FILE, tmp):
            _fsync(p)
        os.rename(tmp, entry)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("decoded %d images of %s at %dpx into %s in %.1f s", len(labels), source, size,
             entry, meta["decode_seconds"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_other_keys(directory: Path, stem: str, source: str, size: int) -> None:
    """Remove the entries of ``source`` at ``size`` other than ``stem`` (its data changed)."""
    for other in directory.glob(f"*-{size}px-*"):
        if other.name == stem or other.name.startswith(".") or not other.is_dir():
            continue
        try:
            meta = json.loads((other / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("source") == source and meta.get("size") == size:
            shutil.rmtree(other, ignore_errors=True)
            log.info("removed %s: decoded from an earlier state of %s", other, source)


def _in_memory(count: int, size: int, fill: Fill) -> Decoded:
    out = np.empty((count, 3, size, size), dtype=np.uint8)
    labels, classes, skipped = fill(out)
    images = torch.from_numpy(out[: len(labels)].copy())
    meta = {"count": len(labels), "skipped": skipped, "decoded_here": True}
    return Decoded(images, torch.tensor(labels, dtype=torch.long), classes, meta)
