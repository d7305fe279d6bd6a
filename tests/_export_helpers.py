"""A tiny finished study and its export, shared by test_export.py and test_predict.py.

Built once per test session (cached here, not in conftest.py): a generated
3-class image folder, two 1-epoch trials of timm's random-init
``test_efficientnet`` at 32 px, SQLite storage, and the best trial exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from PIL import Image

import autotransfer.tuning.search as search_mod
from autotransfer.export.writer import export_trial
from autotransfer.spec.model import StudySpec, validate_spec
from autotransfer.tuning.progress import Progress

BACKBONE = "timm:test_efficientnet@none"
COLOURS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}


@dataclass
class TinyExport:
    root: Path
    data: Path
    storage: str
    spec: StudySpec
    study: optuna.Study
    export: Path


_cache: dict[str, TinyExport] = {}


def write_images(root: Path, per_class: int, seed: int, size: int = 40) -> Path:
    """Noisy PNGs, one sub-folder per class; non-square, so the centre crop matters."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-60, 61, size=(size, size + 8, 3))
            arr = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
    return root


def tiny_spec(data: Path, name: str = "tiny-export", n_trials: int = 2) -> StudySpec:
    return validate_spec(
        {
            "name": name,
            "data": {
                "path": str(data),
                "image_size": 32,
                "split": {"train": 0.5, "val": 0.25, "test": 0.25},
            },
            "search": {"backbones": [BACKBONE], "lr": 5e-3, "batch_size": 8},
            "train": {"epochs": 1, "threads": 2, "eval_batch_size": 64},
            "pruner": {"type": "none"},
            "sampler": {"type": "random"},
            "n_trials": n_trials,
            # the trial's own checkpoint: these tests check it against the study;
            # tests/test_refit.py covers the default (refit on train + val)
            "export": {"refit": False, "ensemble": False},
        }
    )


def tiny_export(base: Path) -> TinyExport:
    """The shared study and export under ``base`` (built on first use)."""
    if "tiny" not in _cache:
        root = base / "tiny-export"
        data = write_images(root / "images", per_class=8, seed=0)
        storage = f"sqlite:///{root / 'study.db'}"
        spec = tiny_spec(data)
        outcome = search_mod.run_search(spec, storage, root / "artifacts", Progress(epochs=1))
        export = export_trial(outcome.study, root / "export")
        _cache["tiny"] = TinyExport(root, data, storage, spec, outcome.study, export.path)
    return _cache["tiny"]
