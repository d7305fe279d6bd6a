"""A whole study with the feature cache on and off: wall time, best validation
and test accuracy.

    python bench/cache_study.py ARM [--n-trials 10] [--data PATH] [--out FILE]
    python bench/cache_study.py --table bench/results/cache_study-*.json

ARM is ``off`` (``train.feature_cache: false``), ``on`` (the cache with the
spec's ``train.feature_cache_views``) or ``views=N`` (the cache with N views).
One arm per process, so the arms can run side by side and see the same load
on a shared machine. The default study (``studies/digits.yaml``) with its
timeout lifted so every arm finishes the same number of trials, from a fresh
SQLite file, same seed (the sampler proposes the same first parameters; later
ones follow the values seen). ``--data`` runs the same spec on another image
folder (e.g. ``bench/shapes.py``'s). Writes JSON with the machine's CPU count
and the 1-minute load average sampled every 15 s during the run.
``--table`` prints a Markdown table of arm files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch

from autotransfer.spec.model import load_spec
from autotransfer.store.records import (
    FEATURE_VIEWS_ATTR,
    FEATURES_CACHED_ATTR,
    PRUNED_AT_EPOCH_ATTR,
    SECONDS_ATTR,
)
from autotransfer.tuning.progress import Progress
from autotransfer.tuning.search import run_search


class LoadSampler:
    """The 1-minute load average every ``every`` seconds, in a thread."""

    def __init__(self, every: float = 15.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        s = self.samples
        return {"min": round(min(s), 2), "mean": round(sum(s) / len(s), 2), "max": round(max(s), 2),
                "samples": len(s)}


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` examples."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def run(arm: str, n_trials: int, data: str | None, image_size: int | None) -> dict:
    overrides: dict[str, object] = {"n_trials": n_trials}
    if arm == "off":
        overrides["train.feature_cache"] = False
    elif arm == "on":
        overrides["train.feature_cache"] = True
    elif arm.startswith("views="):
        overrides["train.feature_cache"] = True
        overrides["train.feature_cache_views"] = int(arm.split("=", 1)[1])
    else:
        raise SystemExit(f"unknown arm '{arm}'; use off, on or views=N")
    if data:
        overrides["data.path"] = data
        overrides["name"] = f"cache-bench-{Path(data).name}"
    if image_size:
        overrides["data.image_size"] = image_size
    # No time limit (an override of None is ignored by load_spec: set it after).
    spec = load_spec(overrides=overrides).model_copy(update={"timeout": None})
    with tempfile.TemporaryDirectory() as tmp, LoadSampler() as load:
        start = time.perf_counter()
        outcome = run_search(spec, f"sqlite:///{tmp}/study.db", Path(tmp) / "artifacts",
                             Progress(epochs=spec.train.epochs))
        seconds = time.perf_counter() - start
        trials = outcome.study.get_trials(deepcopy=False)
    best = outcome.best
    return {
        "arm": arm,
        "feature_cache": spec.train.feature_cache,
        "feature_cache_views": spec.train.feature_cache_views,
        "wall_seconds": round(seconds, 1),
        "load_1min": load.summary(),
        "best_trial": best.number,
        "best_params": best.params,
        "best_val_accuracy": best.value,
        "test": outcome.test,
        "trials": [
            {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "features_cached": t.user_attrs.get(FEATURES_CACHED_ATTR),
             "feature_views": t.user_attrs.get(FEATURE_VIEWS_ATTR),
             "pruned_at_epoch": t.user_attrs.get(PRUNED_AT_EPOCH_ATTR),
             "seconds": t.user_attrs.get(SECONDS_ATTR)}
            for t in trials
        ],
    }


def table(paths: list[Path]) -> str:
    rows = ["| data | arm | wall time | load (1 min, mean) | best trial | best val acc "
            "| test acc (n) |", "|---|---|---|---|---|---|---|"]
    for p in paths:
        r = json.loads(p.read_text())
        a = r["run"]
        t = a["test"]
        rows.append(
            f"| {r['data']} | {a['arm']} | {a['wall_seconds'] / 60:.1f} min | "
            f"{a['load_1min']['mean']} | {a['best_trial']} | {a['best_val_accuracy']:.3f} | "
            f"{t['accuracy']:.3f} ± {binomial_se(t['accuracy'], t['n']):.3f} ({t['n']}) |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arm", nargs="?", help="off | on | views=N")
    parser.add_argument("--n-trials", type=int, default=10)
    parser.add_argument("--data", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", type=Path, nargs="+", default=None)
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if not args.arm:
        parser.error("give an arm (off, on, views=N) or --table FILES")
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "data": args.data or "sklearn:digits (default study)",
        "n_trials": args.n_trials,
        "run": run(args.arm, args.n_trials, args.data, args.image_size),
    }
    name = Path(args.data).name if args.data else "digits"
    out = args.out or Path(f"bench/results/cache_study-{name}-{args.arm.replace('=', '')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    r = result["run"]
    print(r["arm"], r["wall_seconds"], r["best_val_accuracy"], r["test"], r["load_1min"])


if __name__ == "__main__":
    main()
