"""Feature cache and distill-on-the-suffix, measured on the default study.

1. A linear-probe trial (freeze 1.0) with and without the feature cache:
   seconds per epoch (epoch 1 fills the cache; later epochs read it).
2. ``retention: distill`` against ``l2sp`` with half the trunk frozen (cache
   off, so only the teacher differs): seconds per epoch, and the teacher's
   own cost per batch, whole model against the suffix it now runs.

    python bench/feature_cache.py [--epochs 3] [--out bench/results/feature_cache.json]
    python bench/feature_cache.py --teacher-only [--out ...]   # 2. per batch only, at
                                                               # 6, 9 and 11 of 17 blocks

The teacher's cost is also given as the frozen prefix's share of the whole
forward's FLOPs (``torch.utils.flop_counter``): the saving to expect, when
time follows FLOPs.

Writes JSON with the machine (CPU count, load average) beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from autotransfer.data.batches import make_batch
from autotransfer.engine.feature_cache import FeatureCache
from autotransfer.engine.trainer import Trainer, TrialParams
from autotransfer.plugins.host import get_plugin_host
from autotransfer.spec.model import load_spec
from autotransfer.tuning.search import prepare_data

BACKBONE = "timm:tf_efficientnet_lite0@packaged"


def _trainer(spec, splits, host, params, cache):
    torch.manual_seed(spec.seed)
    ref = next(b for b in spec.search.backbones if b.key == params.backbone)
    b = host.build(ref, num_classes=len(splits.classes), image_size=spec.data.image_size)
    return Trainer(b, splits, params, spec, spec.seed, cache=cache)


def _epochs(trainer) -> list[dict[str, float]]:
    return [
        {"epoch": r.epoch, "seconds": round(r.seconds, 3), "val_accuracy": r.val.accuracy}
        for r in trainer.epochs()
    ]


def probe(spec, splits, host, epochs: int) -> dict[str, object]:
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": epochs})})
    params = TrialParams(BACKBONE, 1.0, 3e-3, 1e-4, 32, 0.0)
    out: dict[str, object] = {}
    for name, cache in (("uncached", None), ("cached", FeatureCache())):
        out[name] = _epochs(_trainer(spec, splits, host, params, cache))
    later = lambda rows: sum(r["seconds"] for r in rows[1:]) / max(1, len(rows) - 1)  # noqa: E731
    out["speedup_after_epoch_1"] = round(later(out["uncached"]) / later(out["cached"]), 1)
    return out


def distill(spec, splits, host, epochs: int) -> dict[str, object]:
    out: dict[str, object] = {}
    params = TrialParams(BACKBONE, 0.5, 3e-3, 1e-4, 32, 0.3)
    for kind in ("l2sp", "distill"):
        s = spec.model_copy(update={
            "retention": kind,
            "train": spec.train.model_copy(update={"epochs": epochs}),
        })
        t = _trainer(s, splits, host, params, None)
        out[kind] = _epochs(t)
        out["frozen_blocks"], out["prefix_blocks"], out["n_blocks"] = (
            t.k_frozen, t.point, t.n_blocks)
        if kind == "distill":
            out["teacher_seconds_per_batch"] = _teacher_cost(t, splits)
    mean = lambda rows: sum(r["seconds"] for r in rows) / len(rows)  # noqa: E731
    out["mean_epoch_seconds"] = {k: round(mean(out[k]), 3) for k in ("l2sp", "distill")}
    return out


def _teacher_cost(t, splits) -> dict[str, float]:
    """Median seconds of the teacher on one batch of 32: whole model, suffix
    only; and the prefix's share of the whole forward's FLOPs."""
    teacher, split, point = t.retention.teacher, t.backbone.split, t.point
    x = make_batch(splits.train, slice(0, 32), t.backbone)
    with torch.no_grad():
        state = split.prefix(teacher, x, point)
        whole = _time(lambda: t.backbone.features(teacher, x), repeat=15)
        suffix = _time(lambda: split.suffix(teacher, state, point), repeat=15)
        share = _flops(lambda: split.prefix(teacher, x, point)) / _flops(
            lambda: t.backbone.features(teacher, x))
    return {"whole": whole, "suffix": suffix, "time_saved": round(1 - suffix / whole, 3),
            "prefix_flops_share": round(share, 3)}


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def teacher_only(spec, splits, host) -> dict[str, object]:
    """The teacher's cost per batch with 6, 9 and 11 of 17 blocks frozen."""
    out: dict[str, object] = {}
    s = spec.model_copy(update={"retention": "distill"})
    for freeze in (6 / 17, 9 / 17, 11 / 17):
        t = _trainer(s, splits, host, TrialParams(BACKBONE, freeze, 3e-3, 1e-4, 32, 0.3), None)
        out[f"{t.point}_of_{t.n_blocks}"] = _teacher_cost(t, splits)
    return out


def _time(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(sorted(times)[len(times) // 2], 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--teacher-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the spec's train.threads, all cores)")
    args = parser.parse_args()
    args.out = args.out or Path("bench/results/feature_cache"
                                + ("-teacher" if args.teacher_only else "") + ".json")
    spec = load_spec()
    torch.set_num_threads(args.threads or spec.train.threads or os.cpu_count() or 1)
    splits, _ = prepare_data(spec)
    host = get_plugin_host()
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_before": os.getloadavg(), "torch": torch.__version__},
        "study": spec.name,
        "train_images": len(splits.train),
        "image_size": spec.data.image_size,
        "threads": torch.get_num_threads(),
    }
    if args.teacher_only:
        result["teacher_seconds_per_batch"] = teacher_only(spec, splits, host)
    else:
        result["probe"] = probe(spec, splits, host, args.epochs)
        result["distill_vs_l2sp"] = distill(spec, splits, host, max(1, args.epochs - 1))
    result["machine"]["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
