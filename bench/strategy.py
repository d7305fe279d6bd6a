"""Measurements behind the search strategy's defaults (issue 15): single
fine-tuning runs of a few hand configurations on the quality benchmark's real
data sets (``bench/datasets.py``), each recorded epoch by epoch.

What it answers, per data set and seed:

- which hand configurations are strong (the start portfolio): linear probe,
  plain full fine-tune, lower learning rate, half frozen, l2sp / distill
  retention, label smoothing;
- how well a trial's validation accuracy at epoch k predicts its final one
  (pruning: how often would a rule stop a trial that ends among the best);
- whether refitting the best configuration on train + validation for its best
  epoch count beats the trial's own checkpoint on the test split.

Each run uses the engine directly (no Optuna), the study's default split
(60/20/20) of a class-balanced subsample. Results: ``bench/results/strategy.json``
(one row per run, per-epoch validation and test accuracy) and a summary printed
by ``--summary``.

    python bench/datasets.py                                  # build the sets once
    python bench/strategy.py --per-class 60 --seeds 0 --epochs 6
    python bench/strategy.py --summary
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autotransfer.data.batches import fit_to_data
from autotransfer.data.datasets import Splits, concat, load_dataset, stratified_split
from autotransfer.engine.trainer import Trainer, TrialParams, evaluate
from autotransfer.plugins.host import get_plugin_host
from autotransfer.spec.model import validate_spec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "strategy.json"
BACKBONE = {
    "image": "timm:tf_efficientnet_lite0@packaged",
    "text": "hf:sentence-transformers/all-MiniLM-L6-v2@packaged",
}
SETS = {"emoji": "image", "stamps": "image", "debian-sections": "text", "fortunes": "text"}

# name: (freeze, lr, alpha, retention, label_smoothing[, trunk_lr_scale, default 1
#        [, probe_fraction, default 0]])
CONFIGS: dict[str, tuple[float, ...] | tuple[float, float, float, str, float]] = {
    "probe_lr1e-2": (1.0, 1e-2, 0.0, "l2sp", 0.0),
    "probe_lr3e-3": (1.0, 3e-3, 0.0, "l2sp", 0.0),
    "full_lr1e-3": (0.0, 1e-3, 0.0, "l2sp", 0.0),
    "full_lr3e-4": (0.0, 3e-4, 0.0, "l2sp", 0.0),
    "half_lr1e-3": (0.5, 1e-3, 0.0, "l2sp", 0.0),
    "full_lr1e-3_l2sp0.2": (0.0, 1e-3, 0.2, "l2sp", 0.0),
    "full_lr1e-3_distill0.2": (0.0, 1e-3, 0.2, "distill", 0.0),
    "full_lr1e-3_ls0.1": (0.0, 1e-3, 0.0, "l2sp", 0.1),
    # the head at lr, the trunk at lr * trunk_lr_scale (search.trunk_lr_scale)
    "full_lr1e-3_trunk0.1": (0.0, 1e-3, 0.0, "l2sp", 0.0, 0.1),
    "full_lr1e-2_trunk0.1": (0.0, 1e-2, 0.0, "l2sp", 0.0, 0.1),
    "full_lr3e-3_trunk0.3": (0.0, 3e-3, 0.0, "l2sp", 0.0, 0.3),
    "half_lr1e-2_trunk0.1": (0.5, 1e-2, 0.0, "l2sp", 0.0, 0.1),
    # LP-FT: half the epochs a linear probe, then the full fine-tune (search.probe_fraction)
    "lpft_lr1e-3": (0.0, 1e-3, 0.0, "l2sp", 0.0, 1.0, 0.5),
    "lpft_lr1e-3_trunk0.1": (0.0, 1e-3, 0.0, "l2sp", 0.0, 0.1, 0.5),
    "lpft_lr3e-3": (0.0, 3e-3, 0.0, "l2sp", 0.0, 1.0, 0.5),
    "lpft_lr1e-2_trunk0.1": (0.0, 1e-2, 0.0, "l2sp", 0.0, 0.1, 0.5),
}


def scales(config: tuple) -> dict[str, float]:
    """The config's trunk_lr_scale and probe_fraction (TrialParams keywords)."""
    return {"trunk_lr_scale": config[5] if len(config) > 5 else 1.0,
            "probe_fraction": config[6] if len(config) > 6 else 0.0}


def subsample(data: Any, per_class: int, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class]
            for c in range(len(data.classes))]
    return data.subset(np.sort(np.concatenate(keep)))


def spec_for(name: str, path: Path, modality: str, epochs: int, config: tuple, seed: int):
    freeze, lr, alpha, retention, ls = config[:5]
    data = path / "data.csv" if modality == "text" else path
    return validate_spec({
        "name": f"strategy-{name}", "data": {"path": str(data), "image_size": 64,
                                             "split": {"train": 0.6, "val": 0.2, "test": 0.2},
                                             "seed": seed},
        "retention": retention,
        "search": {"backbones": [BACKBONE[modality]], "freeze": freeze, "lr": lr,
                   "alpha": alpha, "batch_size": 32},
        "train": {"epochs": epochs, "label_smoothing": ls},
        "seed": seed,
    })


def run_one(host, spec, splits: Splits, epochs_cap: int | None = None,
            trunk_lr_scale: float = 1.0, probe_fraction: float = 0.0) -> dict[str, Any]:
    s = spec.search
    params = TrialParams(backbone=s.backbones[0].key, freeze=s.freeze, lr=s.lr,
                         weight_decay=s.weight_decay, batch_size=s.batch_size, alpha=s.alpha,
                         trunk_lr_scale=trunk_lr_scale, probe_fraction=probe_fraction)
    torch.manual_seed(spec.seed)
    backbone = host.build(s.backbones[0], num_classes=len(splits.classes),
                          image_size=spec.data.image_size)
    fit_to_data(backbone, spec.data)
    trainer = Trainer(backbone, splits, params, spec, spec.seed)
    start = time.perf_counter()
    val, test = [], []
    for result in trainer.epochs():
        val.append(result.val.accuracy)
        test.append(evaluate(backbone, splits.test).accuracy)
        if epochs_cap is not None and result.epoch >= epochs_cap:
            break
    # the trial's checkpoint is its best epoch's weights
    backbone.model.load_state_dict(trainer.best_state)
    best = evaluate(backbone, splits.test)
    return {"val": val, "test": test, "best_epoch": trainer.best.epoch,
            "best_val": trainer.best.val.accuracy, "test_of_best": best.accuracy,
            "test_f1_of_best": best.macro_f1, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", type=Path, default=ROOT / "bench" / "data")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--refit", action="store_true", help="also refit the best-val config")
    p.add_argument("--summary", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rows = json.loads(args.results.read_text())["rows"] if args.results.exists() else []
    if args.summary:
        summarise(rows)
        return 0
    torch.set_num_threads(args.threads)
    host = get_plugin_host()
    done = {(r["set"], r["seed"], r["config"]) for r in rows}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.sets.split(","):
            modality = SETS[name]
            splits = None
            for cname in args.configs.split(","):
                if (name, seed, cname) in done:
                    continue
                spec = spec_for(name, args.data_root / name, modality, args.epochs,
                                CONFIGS[cname], seed)
                if splits is None:
                    data = subsample(load_dataset(spec.data), args.per_class, seed)
                    splits = stratified_split(data, spec.data.split, seed)
                row = {"set": name, "seed": seed, "config": cname,
                       **run_one(host, spec, splits, **scales(CONFIGS[cname]))}
                print(json.dumps(row), flush=True)
                rows.append(row)
                save(rows, args)
            if args.refit and (name, seed, "refit") not in done and splits is not None:
                mine = [r for r in rows if r["set"] == name and r["seed"] == seed
                        and r["config"] in CONFIGS]
                pick = max(mine, key=lambda r: r["best_val"])
                spec = spec_for(name, args.data_root / name, modality, args.epochs,
                                CONFIGS[pick["config"]], seed)
                # as autotransfer/tuning/refit.py does: train + validation, the first
                # best-epoch epochs of the trial's schedule
                merged = replace(splits, train=concat(splits.train, splits.val))
                out = run_one(host, spec, merged, epochs_cap=pick["best_epoch"],
                              **scales(CONFIGS[pick["config"]]))
                row = {"set": name, "seed": seed, "config": "refit", "of": pick["config"],
                       "epochs": pick["best_epoch"], "test_refit": out["test"][-1],
                       "test_pick": pick["test_of_best"], "seconds": out["seconds"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
                save(rows, args)
    return 0


def save(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, shared with other jobs",
        "torch": torch.__version__, "per_class": args.per_class, "epochs": args.epochs,
        "split": "60/20/20 of a class-balanced subsample", "rows": rows,
    }, indent=1) + "\n")


def summarise(rows: list[dict[str, Any]]) -> None:
    runs = [r for r in rows if r["config"] in CONFIGS]
    sets = sorted({r["set"] for r in runs})
    print("test accuracy of the best-val epoch (mean over seeds); val in brackets")
    print(f"{'config':28s}" + "".join(f"{s[:14]:>16s}" for s in sets) + f"{'mean':>8s}")
    for c in CONFIGS:
        cells, means = [], []
        for s in sets:
            mine = [r for r in runs if r["set"] == s and r["config"] == c]
            if not mine:
                cells.append(f"{'-':>16s}")
                continue
            t = float(np.mean([r["test_of_best"] for r in mine]))
            v = float(np.mean([r["best_val"] for r in mine]))
            means.append(t)
            cells.append(f"{t:>9.3f} ({v:.2f})")
        mean = f"{np.mean(means):8.3f}" if len(means) == len(sets) else f"{'-':>8s}"
        print(f"{c:28s}" + "".join(cells) + mean)
    print("\npruning: for each epoch k, share of runs whose final best val is within 0.02 of")
    print("their set's best run but whose val at epoch k is below the median of the set's runs")
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["set"], r["seed"]), []).append(r)
    n_epochs = max(len(r["val"]) for r in runs)
    for k in range(1, n_epochs):
        killed = good = 0
        for group in groups.values():
            if len(group) < 3:
                continue
            top = max(r["best_val"] for r in group)
            med = float(np.median([r["val"][k - 1] for r in group]))
            for r in group:
                if r["best_val"] >= top - 0.02:
                    good += 1
                    killed += r["val"][k - 1] < med
        print(f"  epoch {k}: {killed} of {good} near-best runs below the median")
    print("patience 1 (pruner.patience default): runs that at some epoch before the last had")
    print("not improved over their last 2 epochs (the only ones a patient pruner may stop)")
    stalled = [r for r in runs if any(
        max(r["val"][k - 2:k]) < max(r["val"][:k - 2]) for k in range(3, len(r["val"])))]
    near = [r for r in stalled if r["best_val"] >= max(
        x["best_val"] for x in groups[(r["set"], r["seed"])]) - 0.02]
    print(f"  {len(stalled)} of {len(runs)} runs could be pruned; {len(near)} of them near-best")
    refits = [r for r in rows if r["config"] == "refit"]
    if refits:
        print("\nrefit on train+val (same config, best epoch count) vs the pick's checkpoint:")
        for r in refits:
            print(f"  {r['set']:16s} seed {r['seed']}: {r['of']:24s} {r['epochs']} epochs "
                  f"test {r['test_pick']:.3f} -> {r['test_refit']:.3f}")
        gain = np.mean([r["test_refit"] - r["test_pick"] for r in refits])
        print(f"  mean gain {gain:+.3f} over {len(refits)} runs")


if __name__ == "__main__":
    raise SystemExit(main())
