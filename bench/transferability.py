"""Would a transferability estimate save trials? LogME per candidate backbone
against what fine-tuning each candidate gives (issue 15).

Issue 15 asks for a transferability estimate (LogME: You et al., "LogME:
Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021)
computed per candidate backbone from one forward pass of the training split,
used to order or drop hopeless candidates before any fine-tuning, *if it
measurably saves trials* when several backbones are listed. This script
measures what such a rule would see and what it would have decided. Per data
set and seed, for each candidate backbone:

- ``logme``: the LogME of the candidate's pooled features (eval mode, no
  augmentation) on the training split, and the seconds it took (the forward
  pass included);
- the portfolio's fine-tune (``full_lr1e-3``; text: trunk at x0.1) and, for
  pretrained candidates, its linear probe (``probe_lr1e-2``), run with
  ``bench/strategy.py``'s engine loop: best validation accuracy and the test
  accuracy of that epoch.

The candidates are every backbone this machine has offline: per modality one
network with real pretrained weights (the packaged EfficientNet-Lite0 and
all-MiniLM-L6-v2) and random-init networks (the same architectures, and a
ResNet-18 for images). Hubs are out of reach here, so rankings among several
*pretrained* backbones, LogME's real use, cannot be measured on this machine.

    python bench/transferability.py --data-root DIR --per-class 30 --seeds 0,1
    python bench/transferability.py --summary

Writes ``bench/results/transferability.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import strategy  # noqa: E402  (bench/strategy.py: the engine loop and the quality sets)

from autotransfer.data.batches import fit_to_data, make_batch  # noqa: E402
from autotransfer.data.datasets import Dataset, load_dataset, stratified_split  # noqa: E402
from autotransfer.plugins.host import get_plugin_host  # noqa: E402
from autotransfer.spec.model import BackboneRef, validate_spec  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "transferability.json"
CANDIDATES = {
    "image": ["timm:tf_efficientnet_lite0@packaged", "timm:tf_efficientnet_lite0@none",
              "timm:resnet18@none"],
    "text": ["hf:sentence-transformers/all-MiniLM-L6-v2@packaged",
             "hf:sentence-transformers/all-MiniLM-L6-v2@none"],
}
SETS = {"digits": "image", **strategy.SETS}


def logme(features: torch.Tensor, labels: torch.Tensor, iterations: int = 11) -> float:
    """LogME of ``features`` (n, d) for integer ``labels`` (n,): the mean over
    classes of the log maximum evidence, per example, of a Bayesian linear
    regression from the features to the class's one-hot indicator, with the
    prior and noise precisions (alpha, beta) fitted by MacKay's fixed point
    (the paper's Algorithm 1). Higher is better."""
    f = features.double()
    n, d = f.shape
    u, s, _ = torch.linalg.svd(f.T @ f)  # eigenvectors and eigenvalues of FᵀF
    eps = 1e-5
    total = 0.0
    classes = labels.unique()
    for k in classes:
        y = (labels == k).double()
        proj = u.T @ (f.T @ y)
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            gamma = float((beta * s / (alpha + beta * s)).sum())
            m = u @ (beta * proj / (alpha + beta * s))
            alpha_de = float((m * m).sum())
            beta_de = float(((y - f @ m) ** 2).sum())
            new_alpha = gamma / (alpha_de + eps)
            new_beta = (n - gamma) / (beta_de + eps)
            done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < 0.01
            alpha, beta = new_alpha, new_beta
            if done:
                break
        evidence = (d / 2 * torch.log(torch.tensor(alpha)) + n / 2 * torch.log(torch.tensor(beta))
                    - 0.5 * torch.log(alpha + beta * s).sum() - beta / 2 * beta_de
                    - alpha / 2 * alpha_de - n / 2 * torch.log(torch.tensor(2 * torch.pi)))
        total += float(evidence) / n
    return total / len(classes)


@torch.no_grad()
def features_of(backbone: Any, data: Dataset, batch_size: int = 128) -> torch.Tensor:
    model = backbone.model.eval()
    return torch.cat([
        backbone.features(model, make_batch(data, slice(i, i + batch_size), backbone)).float()
        for i in range(0, len(data), batch_size)
    ])


def spec_for(name: str, root: Path, modality: str, candidate: str, config: tuple,
             epochs: int, seed: int):
    spec = strategy.spec_for(name, root / name, modality, epochs, config, seed)
    raw = spec.model_dump(mode="json", exclude_defaults=True)
    raw["search"]["backbones"] = [candidate]
    if name == "digits":
        raw["data"]["path"] = "sklearn:digits"
        raw["data"]["augment"] = {"flip": False}
    return validate_spec(raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", type=Path, default=ROOT / "bench" / "data")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rows = json.loads(args.results.read_text())["rows"] if args.results.exists() else []
    if args.summary:
        summarise(rows)
        return 0
    torch.set_num_threads(args.threads)
    host = get_plugin_host()
    done = {(r["set"], r["seed"], r["backbone"], r["config"]) for r in rows}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.sets.split(","):
            modality = SETS[name]
            full = "full_lr1e-3" if modality == "image" else "full_lr1e-3_trunk0.1"
            splits = None
            for candidate in CANDIDATES[modality]:
                configs = [full] + (["probe_lr1e-2"] if candidate.endswith("@packaged") else [])
                for cname in ["logme", *configs]:
                    if (name, seed, candidate, cname) in done:
                        continue
                    config = strategy.CONFIGS[full if cname == "logme" else cname]
                    spec = spec_for(name, args.data_root, modality, candidate, config,
                                    args.epochs, seed)
                    if splits is None:
                        data = strategy.subsample(load_dataset(spec.data), args.per_class, seed)
                        splits = stratified_split(data, spec.data.split, seed)
                    row: dict[str, Any] = {"set": name, "seed": seed, "backbone": candidate,
                                           "config": cname}
                    if cname == "logme":
                        torch.manual_seed(seed)
                        ref: BackboneRef = spec.search.backbones[0]
                        start = time.perf_counter()
                        backbone = fit_to_data(host.build(
                            ref, num_classes=len(splits.classes),
                            image_size=spec.data.image_size), spec.data)
                        f = features_of(backbone, splits.train)
                        row.update(logme=logme(f, splits.train.labels), dim=f.shape[1],
                                   n=f.shape[0], seconds=round(time.perf_counter() - start, 2))
                    else:
                        row.update(strategy.run_one(host, spec, splits,
                                                    **strategy.scales(strategy.CONFIGS[cname])))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    strategy.save(rows, args)
    summarise(rows)
    return 0


def summarise(rows: list[dict[str, Any]]) -> None:
    """Per set and seed: each candidate's LogME, its best validation accuracy over
    its portfolio runs and that run's test accuracy; whether LogME's order is
    the order of the fine-tuned results."""
    keys = sorted({(r["set"], r["seed"]) for r in rows})
    for set_name, seed in keys:
        mine = [r for r in rows if r["set"] == set_name and r["seed"] == seed]
        print(f"{set_name} seed {seed}")
        table = []
        for cand in dict.fromkeys(r["backbone"] for r in mine):
            score = next((r for r in mine if r["backbone"] == cand and r["config"] == "logme"),
                         None)
            runs = [r for r in mine if r["backbone"] == cand and "best_val" in r]
            if score is None or not runs:
                continue
            best = max(runs, key=lambda r: r["best_val"])
            table.append((cand, score["logme"], score["seconds"], best["best_val"],
                          best["test_of_best"], sum(r["seconds"] for r in runs)))
        for cand, lm, sec, val, test, train in sorted(table, key=lambda t: -t[1]):
            print(f"  {cand:55s} logme {lm:7.3f} ({sec:4.1f}s)  val {val:.3f}  test {test:.3f}"
                  f"  ({train:.0f}s of training)")
        by_logme = [t[0] for t in sorted(table, key=lambda t: -t[1])]
        by_val = [t[0] for t in sorted(table, key=lambda t: -t[3])]
        print(f"  same top candidate: {by_logme[:1] == by_val[:1]}; same order: "
              f"{by_logme == by_val}")


if __name__ == "__main__":
    sys.exit(main())
