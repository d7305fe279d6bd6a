"""The fairness rows of the quality benchmark, from its kept studies.

``bench/quality.py`` scores every arm's pick as the trial's own checkpoint, and
the search also as the product exports it by default (a greedy ensemble, each
member refit on train + validation). Two comparisons are then uneven, and this
script evens them on the studies a ``quality.py --keep`` run left
(``<work>/<set>-s<seed>-<arm>/``), scoring each new export on the same held-out
test set:

- ``finetune+refit``, ``probe+refit``: a practitioner who trains one
  configuration would train it on all their labels. ``autotransfer export
  --refit --no-ensemble`` of the hand baselines' studies: the same trial
  trained again on train + validation for its best epoch count.
- ``random+ensemble``: random search with the product's default export
  (``autotransfer export --ensemble --refit`` of random's study), so that the
  search and random search are compared through the same export. Random's study
  holds every trial it ran, a few epochs past the search's budget (quality.py
  picks its checkpoint within the budget), so this row is, if anything, generous
  to random search.

    python bench/kept_exports.py --work w/A1 w/A2 --data DIR \\
        --quality bench/results/quality-s4.json --name s4-A
    python bench/kept_exports.py --merge bench/results/kept_exports-s4-{A,B}.json \\
        --quality bench/results/quality-s4.json --name s4

Writes ``bench/results/kept_exports-NAME.json`` and ``.md``; the ``.md`` holds
the issue's targets again with these rows: the product's export against the
better refit hand baseline and against random search's ensemble.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402  (bench/quality.py: the held-out split, the CLI and the scorer)

ROWS = {
    "finetune+refit": ("finetune", ["--refit", "--no-ensemble"]),
    "probe+refit": ("probe", ["--refit", "--no-ensemble"]),
    "random+ensemble": ("random", ["--ensemble", "--refit"]),
}
"""Row name: (the arm whose kept study is exported, the export's flags)."""


def export_row(folder: Path, row: str, test: list[tuple[str, str]]) -> dict[str, Any]:
    """One kept study exported as ``row`` says, scored on ``test``."""
    name, seed, _ = quality.parse_run_name(folder.name)
    scored, held, seconds = quality.export_scored(folder / "study.db", folder.name,
                                                  ROWS[row][1], folder / f"export-{row}", test)
    return {
        "set": name, "seed": seed, "row": row,
        "test_accuracy": scored["accuracy"], "test_macro_f1": scored["macro_f1"],
        "test_n": scored["n"], "kind": held["kind"], "trained_on": held["trained_on"],
        "members": [m["trial"] for m in held.get("members", [])],
        "seconds": round(seconds, 1),
    }


def means(rows: list[dict[str, Any]], quality_run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per set: each row's and each quality arm's test accuracies by seed."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for s in quality_run["sets"]:
        t = table.setdefault(s["name"], {})
        for r in s["runs"]:
            t.setdefault(r["arm"], {})[r["seed"]] = r["test_accuracy"]
            if "ensemble_test_accuracy" in r:
                t.setdefault(quality.ENSEMBLE_ROW, {})[r["seed"]] = r["ensemble_test_accuracy"]
    for r in rows:
        table.setdefault(r["set"], {}).setdefault(r["row"], {})[r["seed"]] = r["test_accuracy"]
    return table


def markdown(report: dict[str, Any], quality_run: dict[str, Any]) -> str:
    table = means(report["rows"], quality_run)
    product = quality.ENSEMBLE_ROW
    shown = ["finetune", "probe", *ROWS, "random", "search", product]
    lines = [f"# Kept-study exports: {report['name']}", "",
             f"Machine: {report['machine']}. Commit {report['commit']}. Studies from quality "
             f"run `{quality_run['name']}` (commit {quality_run['commit']}). The exports took "
             f"{sum(r['seconds'] for r in report['rows']) / 60:.1f} min in all (one after "
             "another; runs made side by side overlap)"
             + (f", this run {report['minutes']:.1f} min." if not report.get("merged") else "."),
             "",
             f"Command: `{report['command']}`", "",
             "Test accuracy, mean ± std over seeds, on quality.py's held-out test set. "
             "`+refit`: the trial trained again on train + validation; `+ensemble`: the "
             "product's default export (greedy ensemble, members refit); the other rows "
             "are quality.py's (checkpoints; `search+ensemble` is the product's export).", "",
             "| set | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    gaps_hand, gaps_random = [], []
    targets = []
    for name, t in table.items():
        cells = []
        for row in shown:
            v = list(t.get(row, {}).values())
            cells.append(f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}"
                         if len(v) > 1 else (f"{v[0]:.3f}" if v else "-"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if not all(row in t for row in (*ROWS, product)):
            continue
        mean = {row: statistics.fmean(t[row].values()) for row in t}
        hand_row = max(("finetune+refit", "probe+refit"), key=lambda r: mean[r])
        gaps_hand.append(mean[product] - mean[hand_row])
        gaps_random.append(mean[product] - mean["random+ensemble"])
        targets.append(
            f"- {name}: export {mean[product]:.3f} vs better refit hand baseline ({hand_row}) "
            f"{mean[hand_row]:.3f}: {'met' if gaps_hand[-1] >= 0 else 'MISSED'} "
            f"(per seed {quality.seed_diffs(t[product], t[hand_row])}); vs random+ensemble "
            f"{mean['random+ensemble']:.3f}: {'met' if gaps_random[-1] >= 0 else 'MISSED'} "
            f"(per seed {quality.seed_diffs(t[product], t['random+ensemble'])})")
    if gaps_hand:
        mean_gap = statistics.fmean(gaps_hand)
        targets.append(f"- over all sets: export − better refit hand baseline = "
                       f"{100 * mean_gap:+.1f} points (target +3: "
                       f"{'met' if mean_gap >= 0.03 else 'MISSED'}); export − random+ensemble"
                       f" = {100 * statistics.fmean(gaps_random):+.1f} points")
    lines += ["", "## Targets with these rows", "", *targets]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, nargs="+", default=[],
                   help="quality.py --keep work folders")
    p.add_argument("--data", type=Path, default=None,
                   help="the sets, as given to quality.py --data")
    p.add_argument("--quality", type=Path, required=True,
                   help="the quality run's JSON the studies came from (its split, its rows)")
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="put the rows of runs made side by side together; runs nothing")
    p.add_argument("--name", default="run")
    args = p.parse_args(argv)
    quality_run = json.loads(args.quality.read_text())
    parts = [json.loads(f.read_text()) for f in args.merge or []]
    rows: list[dict[str, Any]] = [r for part in parts for r in part["rows"]]
    t0 = time.monotonic()
    if not args.merge:
        if not args.work or args.data is None:
            p.error("give --work (kept quality studies) and --data, or --merge")
        split = (quality_run.get("pool_per_class"), quality_run.get("test_per_class"))
        tests: dict[str, list[tuple[str, str]]] = {}
        for row in args.rows:
            arm = ROWS[row][0]
            for folder in sorted(f for w in args.work for f in w.glob(f"*-s*-{arm}")
                                 if (f / "study.db").exists()):
                name = quality.parse_run_name(folder.name)[0]
                if name not in tests:
                    tests[name] = quality.hold_out(quality.read_set(args.data / name)[1],
                                                   *split)[1]
                r = export_row(folder, row, tests[name])
                rows.append(r)
                print(f"{r['set']} s{r['seed']} {row}: test acc {r['test_accuracy']:.3f}"
                      f"  {r['seconds']:.0f}s", flush=True)
    report = {
        "name": args.name, "machine": quality.machine(),
        "commit": ", ".join(dict.fromkeys(part["commit"] for part in parts)) if parts
        else quality.git_commit(), "merged": bool(parts),
        "quality_run": quality_run["name"],
        "minutes": (time.monotonic() - t0) / 60,
        "command": "python bench/kept_exports.py " + " ".join(
            quality.portable(a) for a in (argv if argv is not None else sys.argv[1:])),
        "rows": rows,
    }
    stem = quality.RESULTS / f"kept_exports-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report, quality_run))
    print(markdown(report, quality_run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
