"""Ways to combine a finished search's trials, compared on kept quality-benchmark studies.

``bench/quality.py --keep`` leaves each search arm's study (``<set>-s<seed>-search/``)
in its work folder (``--arm random``: random search's, ``<set>-s<seed>-random/``).
For each such study this script reloads every completed trial's checkpoint,
computes its probabilities on the product's own validation split and on the
benchmark's held-out test set (the one quality.py held out: ``--pool-per-class`` /
``--test-per-class`` as given to it, read from ``--quality`` when given), and
scores several selection rules, all chosen on validation only, all from
checkpoints (no refit):

- ``pick``: the product's best trial (validation accuracy, ties by loss);
- ``greedy-acc``: Caruana's greedy with replacement from the pick
  (``tuning/ensemble.greedy_selection``) on validation accuracy, ties by log-loss
  (the product's rule until the s3 run);
- ``greedy-nll``: the same greedy on validation log-loss (the product's rule since);
- ``top3`` / ``top5``: the uniform mean of the 3 / 5 best trials by validation;
- ``all``: the uniform mean of every completed trial.

    python bench/ensemble_variants.py --work DIR [DIR ...] --data DIR \\
        --name s4 [--export] --quality bench/results/quality-s4.json

With ``--export`` it also runs the product's default export (``autotransfer export
--ensemble --refit``, whatever its rule is at this commit) on each study and scores
it on the held-out test (``export`` in the rows); ``--quality`` names the quality
run the studies came from, to compare with its single refit pick.

Writes ``bench/results/ensemble_variants-NAME.json`` and prints a table. It
measures the selection rule only; the benchmark's rows measure what the export
holds (with the refit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402  (bench/quality.py: the held-out split and pool writer)

from autotransfer.data.datasets import load_dataset  # noqa: E402
from autotransfer.plugins.host import get_plugin_host  # noqa: E402
from autotransfer.store.checkpoints import load_trial_backbone  # noqa: E402
from autotransfer.store.records import ARTIFACTS_ATTR  # noqa: E402
from autotransfer.store.storage import artifact_store  # noqa: E402
from autotransfer.store.studies import load_study, stored_spec  # noqa: E402
from autotransfer.store.summary import best_trial  # noqa: E402
from autotransfer.tuning.ensemble import (  # noqa: E402
    candidate_trials,
    greedy_selection,
    log_loss,
    probabilities,
)
from autotransfer.tuning.search import prepare_data  # noqa: E402

RULES = ("pick", "greedy-acc", "greedy-nll", "top3", "top5", "all")


def study_rules(folder: Path, data_root: Path, export: bool = False,
                split: tuple[int | None, int | None] = (quality.POOL_PER_CLASS,
                                                        quality.TEST_PER_CLASS)
                ) -> dict[str, Any]:
    """Every rule's validation and held-out test accuracy on one kept search study;
    ``split``: quality.py's pool and test sizes per class (``None``: its old 25 %)."""
    name, seed, _ = quality.parse_run_name(folder.name)
    study = load_study(f"sqlite:///{folder / 'study.db'}", None)
    spec = stored_spec(study)
    splits, _ = prepare_data(spec)
    modality, items = quality.read_set(data_root / name)
    _, test_items = quality.hold_out(items, *split)
    held = quality.write_pool(modality, test_items, folder / "held-out")
    test = load_dataset(spec.data.model_copy(update={"path": str(held)}))
    assert list(test.classes) == list(splits.classes)
    best = best_trial(study)
    assert best is not None
    trials = candidate_trials(study, best)
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
                                                       log_loss(val_p[i], yv)))
    members = {
        "pick": [pick],
        "greedy-acc": greedy_selection(val_p, yv, first=pick, criterion="accuracy"),
        "greedy-nll": greedy_selection(val_p, yv, first=pick, criterion="log_loss"),
        "top3": by_val[:3],
        "top5": by_val[:5],
        "all": list(range(len(trials))),
    }

    def acc(ps: list[torch.Tensor], idx: list[int], y: torch.Tensor) -> float:
        return float((torch.stack([ps[i] for i in idx]).mean(0).argmax(1) == y).float().mean())

    row: dict[str, Any] = {}
    if export:
        t0 = time.monotonic()  # the export and its scoring
        scored, held_model, _ = quality.export_scored(
            folder / "study.db", study.study_name, ["--ensemble", "--refit"],
            folder / "ensemble-export", test_items)
        row["export"] = {
            "members": [m["trial"] for m in held_model["members"]],
            "weights": [m["weight"] for m in held_model["members"]],
            "test_accuracy": scored["accuracy"],
            "seconds": round(time.monotonic() - t0, 1),
        }
    return {
        **row,
        "set": name, "seed": seed, "candidates": len(trials),
        "rules": {r: {"members": [trials[i].number for i in idx],
                      "distinct": len(set(idx)),
                      "val_accuracy": acc(val_p, idx, yv),
                      "test_accuracy": acc(test_p, idx, yt)}
                  for r, idx in members.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, nargs="+", default=[],
                   help="quality.py --keep work folders")
    p.add_argument("--data", type=Path, default=None, help="the sets (e.g. DIR/per-class-40)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="summarise the rows of earlier runs (made side by side) together")
    p.add_argument("--name", default="run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arm", default="search", choices=("search", "random"),
                   help="whose kept studies: the search's (default) or random search's "
                   "(random's rows and its export then use all its trials, a few epochs past "
                   "the search's budget)")
    p.add_argument("--export", action="store_true",
                   help="also score the product's default export (export --ensemble --refit)")
    p.add_argument("--quality", type=Path, default=None,
                   help="the quality run's JSON the studies came from (its split, its "
                   "refit row)")
    p.add_argument("--pool-per-class", type=int, default=quality.POOL_PER_CLASS,
                   help="as given to quality.py (0: all but 25 %%); --quality overrides")
    p.add_argument("--test-per-class", type=int, default=quality.TEST_PER_CLASS,
                   help="as given to quality.py (0: all the rest); --quality overrides")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folders = sorted(f for w in args.work for f in w.glob(f"*-s*-{args.arm}") if f.is_dir())
    if not args.merge and (not folders or args.data is None):
        p.error("give --work (kept quality studies) and --data, or --merge")
    rows = [row for f in args.merge or [] for row in json.loads(f.read_text())["rows"]]
    args.export = args.export or all("export" in row for row in rows) and bool(rows)
    split = (args.pool_per_class or None, args.test_per_class or None)
    if args.quality:
        run = json.loads(args.quality.read_text())
        split = (run.get("pool_per_class"), run.get("test_per_class"))
    for folder in folders:
        row = study_rules(folder, args.data, args.export, split)
        rows.append(row)
        print(f"{row['set']} s{row['seed']}: " + "  ".join(
            f"{r} {v['test_accuracy']:.3f}/{v['distinct']}" for r, v in row["rules"].items())
            + (f"  export {row['export']['test_accuracy']:.3f}/{len(row['export']['members'])}"
               if "export" in row else ""), flush=True)
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
    if args.export:
        refit = {}
        if args.quality:
            for s in json.loads(args.quality.read_text())["sets"]:
                for r in s["runs"]:
                    if r["arm"] == "search" and "refit_test_accuracy" in r:
                        refit[(s["name"], r["seed"])] = r["refit_test_accuracy"]
        gains = [row["export"]["test_accuracy"] - row["rules"]["pick"]["test_accuracy"]
                 for row in rows]
        summary["export"] = {
            "test_accuracy": statistics.fmean(row["export"]["test_accuracy"] for row in rows),
            "gain_vs_pick": statistics.fmean(gains),
            "wins": sum(g > 0 for g in gains), "losses": sum(g < 0 for g in gains),
            "distinct": statistics.fmean(len(row["export"]["members"]) for row in rows),
        }
        s = summary["export"]
        print(f"  export     {s['test_accuracy']:.3f}  {100 * s['gain_vs_pick']:+.1f} points  "
              f"{s['wins']}W/{s['losses']}L  {s['distinct']:.1f} members (refit ensemble)")
        vs = [row["export"]["test_accuracy"] - refit[(row["set"], row["seed"])]
              for row in rows if (row["set"], row["seed"]) in refit]
        if vs:
            s["gain_vs_refit_pick"] = statistics.fmean(vs)
            s["wins_vs_refit_pick"] = sum(g > 1e-9 for g in vs)
            s["losses_vs_refit_pick"] = sum(g < -1e-9 for g in vs)
            print(f"  export vs the single refit pick: {100 * s['gain_vs_refit_pick']:+.1f} "
                  f"points, {s['wins_vs_refit_pick']}W/{s['losses_vs_refit_pick']}L "
                  f"of {len(vs)}")
    out = quality.RESULTS / f"ensemble_variants-{args.name}.json"
    out.write_text(json.dumps({"machine": quality.machine(), "commit": quality.git_commit(),
                               "command": " ".join(quality.portable(a) for a in sys.argv),
                               "summary": summary, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
