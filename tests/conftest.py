"""Shared fixtures: a tiny generated image folder and a tiny study spec writer.

Everything here is small on purpose (32 px images, a few per class, timm's
random-init ``test_*`` models) so the whole suite runs on a 2-core CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _no_user_cli_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads these; a developer's shell must not change test results."""
    for name in ("AUTOTRANSFER_DEBUG", "AUTOTRANSFER_STORAGE"):
        monkeypatch.delenv(name, raising=False)

TINY_BACKBONE = "timm:test_resnet@none"
CLASS_COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def make_image_folder(
    root: Path, per_class: int = 12, classes: dict[str, tuple[int, int, int]] | None = None,
    size: int = 40, seed: int = 0,
) -> Path:
    """Write ``per_class`` noisy PNGs per class; classes differ by colour, so a
    tiny model learns them in an epoch or two."""
    rng = np.random.default_rng(seed)
    for name, colour in (classes or CLASS_COLOURS).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-40, 41, size=(size, size, 3))
            arr = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only image folder: 3 classes x 12 images (do not modify it)."""
    return make_image_folder(tmp_path_factory.mktemp("tiny-images") / "images")


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a fresh, modifiable image folder under ``tmp_path``."""

    def make(name: str = "images", **kwargs: Any) -> Path:
        return make_image_folder(tmp_path / name, **kwargs)

    return make


def tiny_spec_dict(data_path: Path | str, **overrides: Any) -> dict[str, Any]:
    """A tiny valid spec; ``overrides`` are dotted keys (``train.epochs=1``)
    merged into it. A value of ``...`` deletes the key."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "data": {
            "path": str(data_path),
            "image_size": 32,
            "split": {"train": 0.5, "val": 0.25, "test": 0.25},
            "augment": {"crop_scale": [0.9, 1.0], "flip": True},
        },
        "retention": "l2sp",
        "search": {
            "backbones": [TINY_BACKBONE],
            "freeze": {"low": 0.0, "high": 0.5},
            "lr": {"low": 3e-3, "high": 1e-2, "log": True},
            # one rate for all, whatever the modality: tiny random-init trunks learn
            # in two epochs only at the full rate (tests/test_trunk_lr.py: auto)
            "trunk_lr_scale": 1.0,
            "batch_size": 8,
            "alpha": {"low": 0.0, "high": 0.5},
        },
        "train": {"epochs": 2, "threads": 2, "eval_batch_size": 64},
        "pruner": {"type": "none"},
        "sampler": {"type": "random"},
        "n_trials": 2,
        "timeout": None,
        "seed": 0,
    }
    spec = copy.deepcopy(spec)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        if value is ...:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return spec


@pytest.fixture
def write_spec(tmp_path: Path, tiny_images: Path) -> Callable[..., Path]:
    """``write_spec(**dotted_overrides)`` writes a tiny spec YAML in ``tmp_path``
    (data: the session's tiny image folder) and returns its path. Pass
    ``text=...`` to write raw text instead."""
    counter = iter(range(1_000_000))

    def write(text: str | None = None, **overrides: Any) -> Path:
        path = tmp_path / f"spec-{next(counter)}.yaml"
        if text is None:
            overrides = {k.replace("__", "."): v for k, v in overrides.items()}
            text = yaml.safe_dump(tiny_spec_dict(tiny_images, **overrides), sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    """A fresh SQLite storage URL in ``tmp_path``."""
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.fixture
def tiny_spec(tiny_images: Path) -> Callable[..., Any]:
    """``tiny_spec(**dotted_overrides)`` -> a validated :class:`StudySpec`."""
    from autotransfer.spec.model import validate_spec

    def make(**overrides: Any) -> Any:
        return validate_spec(tiny_spec_dict(tiny_images, **overrides))

    return make


@pytest.fixture(scope="session")
def tiny_splits(tiny_images: Path) -> Any:
    """The tiny image folder, decoded and split once (train 18 / val 9 / test 9)."""
    from autotransfer.spec.model import validate_spec
    from autotransfer.tuning.search import prepare_data

    splits, _ = prepare_data(validate_spec(tiny_spec_dict(tiny_images)))
    return splits


@pytest.fixture(scope="session")
def plugin_host() -> Any:
    from autotransfer.plugins.host import get_plugin_host

    return get_plugin_host()


@pytest.fixture(scope="session")
def spec_dict() -> Callable[..., dict[str, Any]]:
    """:func:`tiny_spec_dict`, for tests (``spec_dict(data_path, **dotted)``)."""
    return tiny_spec_dict


def save_tiny_hf_models(root: Path) -> dict[str, Path]:
    """Tiny random-init ViT and ConvNeXt saved with save_pretrained, plus a
    preprocessor config (mean/std 0.5): model directories that load offline."""
    from transformers import AutoModel, ConvNextConfig, ViTConfig, ViTImageProcessor

    configs = {
        "vit": ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, image_size=32, patch_size=8),
        "convnext": ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    }
    dirs = {}
    for name, config in configs.items():
        path = root / name
        AutoModel.from_config(config).save_pretrained(path)
        ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    return save_tiny_hf_models(tmp_path_factory.mktemp("hf-models"))


@pytest.fixture(scope="session")
def make_images() -> Callable[..., Path]:
    """:func:`make_image_folder`, for fixtures of any scope."""
    return make_image_folder


@pytest.fixture(scope="session")
def postgres_server() -> Any:
    """A private PostgreSQL server for the whole session (see ``_postgres.py``).
    Without the server binaries or the psycopg driver: skipped, but failed when
    the environment variable ``CI`` is set, so CI cannot skip it silently."""
    import os

    from _postgres import PostgresServer, find_bin_dir

    missing = None
    bin_dir = find_bin_dir()
    if bin_dir is None:
        missing = "PostgreSQL server binaries not found; apt-get install postgresql"
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            missing = "the psycopg driver is not installed: pip install 'autotransfer[postgres]'"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {missing}")
        pytest.skip(missing)
    server = PostgresServer(bin_dir)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres_url(postgres_server: Any) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()
