"""A whole study with the feature cache on and off: wall time, best validation
and test accuracy.

    python bench/cache_study.py [--n-trials 10] [--data sklearn:digits]
        [--out bench/results/cache_study.json]

The default study (``studies/digits.yaml``, its timeout lifted so both runs
finish the same trials), run twice from a fresh SQLite file: ``train.feature_cache:
false`` then ``true``. Same seed, so the sampler proposes the same first
parameters; later ones follow the values seen. ``--data`` runs the same spec
on another image folder. Writes JSON with the machine's CPU count and load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from autotransfer.spec.model import load_spec
from autotransfer.tuning.progress import Progress
from autotransfer.tuning.search import run_search


def run(n_trials: int, cache: bool, data: str | None, image_size: int | None) -> dict:
    overrides: dict[str, object] = {
        "n_trials": n_trials, "timeout": None, "train.feature_cache": cache,
    }
    if data:
        overrides["data.path"] = data
        overrides["name"] = f"cache-bench-{Path(data).name}"
    if image_size:
        overrides["data.image_size"] = image_size
    spec = load_spec(overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()
        start = time.perf_counter()
        outcome = run_search(spec, f"sqlite:///{tmp}/study.db", Path(tmp) / "artifacts",
                             Progress(epochs=spec.train.epochs))
        seconds = time.perf_counter() - start
        trials = outcome.study.get_trials(deepcopy=False)
    return {
        "feature_cache": cache,
        "wall_seconds": round(seconds, 1),
        "load_before": load,
        "load_after": os.getloadavg(),
        "best_trial": outcome.best.number,
        "best_params": outcome.best.params,
        "best_val_accuracy": outcome.best.value,
        "test": outcome.test,
        "trials": [
            {"number": t.number, "state": t.state.name, "value": t.value,
             "freeze": t.params.get("freeze"), "backbone": t.params.get("backbone"),
             "features_cached": t.user_attrs.get("features_cached"),
             "seconds": t.user_attrs.get("seconds")}
            for t in trials
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=10)
    parser.add_argument("--data", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cache_study.json"))
    args = parser.parse_args()
    runs = [run(args.n_trials, cache, args.data, args.image_size) for cache in (False, True)]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "data": args.data or "sklearn:digits (default study)",
        "n_trials": args.n_trials,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    for r in runs:
        print(r["feature_cache"], r["wall_seconds"], r["best_val_accuracy"], r["test"])


if __name__ == "__main__":
    main()
