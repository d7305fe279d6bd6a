"""Accuracy of cached training views: one trial, its frozen prefix's training
features from 1 cached augmented view (reused every epoch) against as many
views as epochs (the inputs of an uncached trial, by construction of
``augmentation_plan``; tests/test_feature_cache.py checks the equality).

    python bench/cache_views.py [--data sklearn:digits] [--freeze 1.0] [--seeds 0 1]
        [--out FILE]

The default study's spec (``studies/digits.yaml``), with ``--data`` another
image folder (e.g. ``bench/shapes.py``'s). Per seed (head init, batch order,
augmentation draws) and view count: validation accuracy after each epoch and
the seconds per epoch. Writes JSON with the machine's CPU count and the load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cache_study import LoadSampler, binomial_se  # noqa: E402

from autotransfer.engine.feature_cache import FeatureCache  # noqa: E402
from autotransfer.engine.trainer import Trainer, TrialParams  # noqa: E402
from autotransfer.plugins.host import get_plugin_host  # noqa: E402
from autotransfer.spec.model import load_spec  # noqa: E402
from autotransfer.tuning.search import prepare_data  # noqa: E402

BACKBONE = "timm:tf_efficientnet_lite0@packaged"


def trial(spec, splits, host, params: TrialParams, seed: int, views: int) -> dict:
    s = spec.model_copy(update={"train": spec.train.model_copy(
        update={"feature_cache_views": views})})
    torch.manual_seed(seed)
    ref = next(b for b in s.search.backbones if b.key == params.backbone)
    b = host.build(ref, num_classes=len(splits.classes), image_size=s.data.image_size)
    t = Trainer(b, splits, params, s, seed, cache=FeatureCache())
    rows = [{"epoch": r.epoch, "seconds": round(r.seconds, 2), "val_accuracy": r.val.accuracy}
            for r in t.epochs()]
    return {"seed": seed, "views": views, "features_cached": t.features_cached,
            "prefix_blocks": t.point, "frozen_blocks": t.k_frozen, "n_blocks": t.n_blocks,
            "epochs": rows, "best_val_accuracy": max(r["val_accuracy"] for r in rows),
            "last_val_accuracy": rows[-1]["val_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--freeze", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spec = load_spec(overrides={"data.path": args.data} if args.data else None)
    torch.set_num_threads(spec.train.threads or os.cpu_count() or 1)
    splits, _ = prepare_data(spec)
    host = get_plugin_host()
    params = TrialParams(BACKBONE, args.freeze, args.lr, 1e-4, 32, 0.0)
    epochs = spec.train.epochs
    runs = []
    start = time.perf_counter()
    with LoadSampler() as load:
        for seed in args.seeds:
            for views in (1, epochs):
                runs.append(trial(spec, splits, host, params, seed, views))
                r = runs[-1]
                print(seed, views, r["best_val_accuracy"], r["last_val_accuracy"], flush=True)
    n_val = len(splits.val)
    summary = {}
    for views in (1, epochs):
        accs = [r["last_val_accuracy"] for r in runs if r["views"] == views]
        summary[f"views={views}"] = {
            "last_val_accuracy_mean": round(sum(accs) / len(accs), 4),
            "per_seed": accs,
            "binomial_se": round(binomial_se(sum(accs) / len(accs), n_val), 4),
        }
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "load_1min": load.summary()},
        "data": args.data or "sklearn:digits (default study)",
        "train_images": len(splits.train), "val_images": n_val,
        "image_size": spec.data.image_size, "augment": spec.data.augment.model_dump(),
        "epochs": epochs, "params": dataclasses.asdict(params), "wall_seconds": round(
            time.perf_counter() - start, 1),
        "summary": summary,
        "runs": runs,
    }
    name = Path(args.data).name if args.data else "digits"
    out = args.out or Path(f"bench/results/cache_views-{name}-freeze{args.freeze:g}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
