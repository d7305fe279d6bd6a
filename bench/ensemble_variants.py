"""Ways to combine a finished search's trials, compared on kept quality-benchmark studies.

``bench/quality.py --keep`` leaves each search arm's study (``<set>-s<seed>-search/``)
in its work folder. For each such study this script reloads every completed
trial's checkpoint, computes its probabilities on the product's own validation
split and on the benchmark's held-out test set (the same fixed 25 % that
quality.py holds out), and scores several selection rules, all chosen on
validation only, all from checkpoints (no refit):

- ``pick``: the product's best trial (validation accuracy, ties by loss);
- ``greedy-acc``: the product's ensemble rule (``tuning/ensemble.greedy_selection``:
  Caruana's greedy with replacement on accuracy, ties by log-loss, from the pick);
- ``greedy-nll``: the same greedy on validation log-loss alone;
- ``top3`` / ``top5``: the uniform mean of the 3 / 5 best trials by validation;
- ``all``: the uniform mean of every completed trial.

    python bench/ensemble_variants.py --work DIR [DIR ...] --data DIR/per-class-40 \\
        --name s3

Writes ``bench/results/ensemble_variants-NAME.json`` and prints a table. It
measures the selection rule only; the benchmark's rows measure what the export
holds (with the refit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402  (bench/quality.py: the held-out split and pool writer)

from autotransfer.data.datasets import load_dataset  # noqa: E402
from autotransfer.plugins.host import get_plugin_host  # noqa: E402
from autotransfer.store.checkpoints import load_trial_backbone  # noqa: E402
from autotransfer.store.records import ARTIFACTS_ATTR, PREPROCESSING_ATTR  # noqa: E402
from autotransfer.store.storage import artifact_store  # noqa: E402
from autotransfer.store.studies import load_study, stored_spec  # noqa: E402
from autotransfer.store.summary import best_trial  # noqa: E402
from autotransfer.tuning.ensemble import greedy_selection, probabilities  # noqa: E402
from autotransfer.tuning.search import prepare_data  # noqa: E402

RULES = ("pick", "greedy-acc", "greedy-nll", "top3", "top5", "all")


def nll(p: torch.Tensor, labels: torch.Tensor) -> float:
    return float(-p.clamp_min(1e-12).log().gather(1, labels[:, None]).mean())


def greedy_nll(val: list[torch.Tensor], labels: torch.Tensor, first: int,
               rounds: int = 10) -> list[int]:
    chosen = [first]
    best = nll(val[first], labels)
    for _ in range(rounds - 1):
        i, s = min(((i, nll(torch.stack([val[j] for j in [*chosen, i]]).mean(0), labels))
                    for i in range(len(val))), key=lambda t: t[1])
        if s >= best:
            break
        chosen, best = [*chosen, i], s
    return chosen


def study_rules(folder: Path, data_root: Path) -> dict[str, Any]:
    """Every rule's validation and held-out test accuracy on one kept search study."""
    stem = folder.name.removesuffix("-search")  # <set>-s<seed>
    name, seed = stem.rsplit("-s", 1)[0], int(stem.rsplit("-s", 1)[1])
    study = load_study(f"sqlite:///{folder / 'study.db'}", None)
    spec = stored_spec(study)
    splits, _ = prepare_data(spec)
    modality, items = quality.read_set(data_root / name)
    _, test_items = quality.hold_out(items)
    held = quality.write_pool(modality, test_items, folder / "held-out")
    test = load_dataset(spec.data.model_copy(update={"path": str(held)}))
    assert list(test.classes) == list(splits.classes)
    best = best_trial(study)
    assert best is not None
    pipeline = best.user_attrs.get(PREPROCESSING_ATTR)
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state.name == "COMPLETE" and t.user_attrs.get(PREPROCESSING_ATTR) == pipeline]
    store = artifact_store(Path(study.user_attrs[ARTIFACTS_ATTR]))
    host = get_plugin_host()
    val_p, test_p = [], []
    for t in trials:
        b = load_trial_backbone(t, host, store, num_classes=len(splits.classes),
                                image_size=spec.data.image_size, listed=spec.search.backbones)
        val_p.append(probabilities(b, splits.val))
        test_p.append(probabilities(b, test))
    yv, yt = splits.val.labels.cpu(), test.labels.cpu()
    pick = next(i for i, t in enumerate(trials) if t.number == best.number)
    by_val = sorted(range(len(trials)), key=lambda i: (-float(trials[i].value),
                                                       nll(val_p[i], yv)))
    members = {
        "pick": [pick],
        "greedy-acc": greedy_selection(val_p, yv, first=pick),
        "greedy-nll": greedy_nll(val_p, yv, pick),
        "top3": by_val[:3],
        "top5": by_val[:5],
        "all": list(range(len(trials))),
    }

    def acc(ps: list[torch.Tensor], idx: list[int], y: torch.Tensor) -> float:
        return float((torch.stack([ps[i] for i in idx]).mean(0).argmax(1) == y).float().mean())

    return {
        "set": name, "seed": seed, "candidates": len(trials),
        "rules": {r: {"members": [trials[i].number for i in idx],
                      "distinct": len(set(idx)),
                      "val_accuracy": acc(val_p, idx, yv),
                      "test_accuracy": acc(test_p, idx, yt)}
                  for r, idx in members.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, nargs="+", required=True,
                   help="quality.py --keep work folders")
    p.add_argument("--data", type=Path, required=True, help="the sets (e.g. DIR/per-class-40)")
    p.add_argument("--name", default="run")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folders = sorted(f for w in args.work for f in w.glob("*-s*-search") if f.is_dir())
    rows = []
    for folder in folders:
        row = study_rules(folder, args.data)
        rows.append(row)
        print(f"{row['set']} s{row['seed']}: " + "  ".join(
            f"{r} {v['test_accuracy']:.3f}/{v['distinct']}" for r, v in row["rules"].items()),
            flush=True)
    print("\nmean held-out test accuracy per rule (and vs pick):")
    summary = {}
    for r in RULES:
        accs = [row["rules"][r]["test_accuracy"] for row in rows]
        gain = [row["rules"][r]["test_accuracy"] - row["rules"]["pick"]["test_accuracy"]
                for row in rows]
        summary[r] = {"test_accuracy": statistics.fmean(accs),
                      "gain_vs_pick": statistics.fmean(gain),
                      "wins": sum(g > 0 for g in gain), "losses": sum(g < 0 for g in gain),
                      "distinct": statistics.fmean(row["rules"][r]["distinct"] for row in rows)}
        s = summary[r]
        print(f"  {r:10s} {s['test_accuracy']:.3f}  {100 * s['gain_vs_pick']:+.1f} points  "
              f"{s['wins']}W/{s['losses']}L  {s['distinct']:.1f} members")
    out = quality.RESULTS / f"ensemble_variants-{args.name}.json"
    out.write_text(json.dumps({"machine": quality.machine(), "commit": quality.git_commit(),
                               "command": " ".join(quality.portable(a) for a in sys.argv),
                               "summary": summary, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
