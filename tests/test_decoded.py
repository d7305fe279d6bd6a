"""Shared decoded data: one memory-mapped file per data set, decoded once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autotransfer.data.datasets import load_dataset, load_splits
from autotransfer.data.decoded import IMAGES_FILE, META_FILE
from autotransfer.spec.model import DataSpec

SIZE = 16


def entries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir())


def assert_same(a, b) -> None:
    for part in ("train", "val", "test"):
        x, y = getattr(a, part), getattr(b, part)
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert x.classes == y.classes


def test_mapped_data_equal_the_in_memory_path(image_folder, tmp_path: Path) -> None:
    root = image_folder(per_class=10)
    (root / "red" / "999.png").write_bytes(b"not a png")  # skipped in both paths
    spec = DataSpec(path=str(root), image_size=SIZE)
    decoded = tmp_path / "decoded"
    memory = load_splits(spec)
    first = load_splits(spec, decoded)  # decodes into the file
    again = load_splits(spec, decoded)  # maps it
    assert_same(memory, first)
    assert_same(memory, again)
    [entry] = entries(decoded)
    meta = json.loads((entry / META_FILE).read_text())
    assert meta["count"] == 30 and meta["skipped"] == ["red/999.png"]
    assert (entry / IMAGES_FILE).stat().st_size == 30 * 3 * SIZE * SIZE
    # The parts are rows of one mapped store, not copies.
    assert again.train.store is again.val.store and len(again.train.store) == 30
    assert again.train.rows is not None
    assert torch.equal(again.train.take(slice(2, 5)), memory.train.images[2:5])
    digits = DataSpec(path="sklearn:digits", image_size=SIZE)
    assert torch.equal(load_dataset(digits, decoded).images, load_dataset(digits).images)


def test_rebuilt_when_a_file_of_the_data_set_changes(image_folder, tmp_path: Path) -> None:
    root = image_folder(per_class=6)
    spec = DataSpec(path=str(root), image_size=SIZE)
    decoded = tmp_path / "decoded"
    before = load_dataset(spec, decoded)
    [old] = entries(decoded)
    changed = root / "red" / "003.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(changed)  # a black image now
    after = load_dataset(spec, decoded)
    [new] = entries(decoded)
    assert new != old, "the old entry was reused or kept"
    assert torch.equal(after.images, load_dataset(spec).images)
    assert not torch.equal(after.images, before.images)
    assert int(after.images[15].max()) == 0  # red/003.png: row 12 + 3
    # Same bytes, newer modification time: decoded again (sizes and times are the key).
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_dataset(spec, decoded)
    assert entries(decoded) != [new]
    # A file removed: one image fewer.
    (root / "blue" / "000.png").unlink()
    assert len(load_dataset(spec, decoded)) == 17 and len(entries(decoded)) == 1


WORKER = """
import json, os, sys, time
from pathlib import Path
import autotransfer.data.datasets as datasets
from autotransfer.spec.model import DataSpec

root, decoded, go, log, delay = sys.argv[1:6]
resize, decode = datasets.square_resize, datasets.decode_into

def slow_resize(im, size):
    time.sleep(float(delay))
    return resize(im, size)

def counted_decode(*args):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    return decode(*args)

datasets.square_resize, datasets.decode_into = slow_resize, counted_decode
while not os.path.exists(go):
    time.sleep(0.01)
data = datasets.load_dataset(DataSpec(path=root, image_size=16), Path(decoded))
print(json.dumps({"pid": os.getpid(), "n": len(data), "sum": int(data.images.sum())}))
"""


def start_worker(tmp_path: Path, root: Path, decoded: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(root), str(decoded), str(tmp_path / "go"),
         str(tmp_path / "decodes.log"), str(delay)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_two_workers_starting_together_decode_once(image_folder, tmp_path: Path) -> None:
    root = image_folder(per_class=8)
    decoded = tmp_path / "decoded"
    workers = [start_worker(tmp_path, root, decoded, 0.02) for _ in range(2)]
    time.sleep(0.5)
    (tmp_path / "go").touch()  # both wait for this, then load at once
    outs = [json.loads(w.communicate(timeout=240)[0]) for w in workers]
    decoders = (tmp_path / "decodes.log").read_text().split()
    assert len(decoders) == 1 and int(decoders[0]) in {o["pid"] for o in outs}
    expected = load_dataset(DataSpec(path=str(root), image_size=SIZE))
    for o in outs:
        assert (o["n"], o["sum"]) == (24, int(expected.images.sum()))
    [entry] = entries(decoded)
    assert json.loads((entry / META_FILE).read_text())["decoded_by"]["pid"] == int(decoders[0])


def test_a_worker_killed_while_writing_leaves_no_corrupt_entry(
    image_folder, tmp_path: Path
) -> None:
    root = image_folder(per_class=6)
    decoded = tmp_path / "decoded"
    (tmp_path / "go").touch()
    worker = start_worker(tmp_path, root, decoded, 0.2)  # 18 images: about 4 s of decoding
    deadline = time.monotonic() + 120
    while not (decoded.exists() and list(decoded.glob(".*.tmp-*"))):
        assert worker.poll() is None and time.monotonic() < deadline, worker.stderr.read()
        time.sleep(0.05)
    time.sleep(0.5)  # some rows written
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL
    assert entries(decoded) == [] or all(p.name.startswith(".") for p in entries(decoded))
    spec = DataSpec(path=str(root), image_size=SIZE)
    data = load_dataset(spec, decoded)  # the killed writer's lock is gone with it
    assert torch.equal(data.images, load_dataset(spec).images)
    assert [p.name.startswith(".") for p in decoded.iterdir() if p.is_dir()] == [False]


def test_an_unwritable_directory_decodes_into_memory(image_folder, tmp_path: Path, caplog) -> None:
    root = image_folder(per_class=5)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    spec = DataSpec(path=str(root), image_size=SIZE)
    data = load_dataset(spec, blocker / "decoded")
    assert torch.equal(data.images, load_dataset(spec).images)
    assert "decoding into memory" in caplog.text


@pytest.mark.parametrize("size", [SIZE, 24])
def test_each_image_size_has_its_own_entry(tiny_images: Path, tmp_path: Path, size: int) -> None:
    decoded = tmp_path / "decoded"
    load_dataset(DataSpec(path=str(tiny_images), image_size=SIZE), decoded)
    data = load_dataset(DataSpec(path=str(tiny_images), image_size=size), decoded)
    assert data.images.shape[-1] == size
    assert len(entries(decoded)) == (1 if size == SIZE else 2)
