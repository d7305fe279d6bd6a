"""Quality benchmark: does the search's pick beat what a practitioner does by hand?

For each data set x seed x arm it runs the product through its public surface
only (the ``autotransfer search`` command with a generated spec and ``--json``;
``autotransfer export`` with explicit ``--refit``/``--ensemble`` flags;
``autotransfer.load().predict``) and scores the exported model on a held-out
test set that the product never sees. The arms:

- ``finetune``: plain full fine-tune, one trial: freeze 0, lr 1e-3, alpha 0.
- ``probe``: linear probe, one trial: freeze 1.0 (every trunk block frozen),
  lr 1e-2, alpha 0.
- ``search``: the search at the spec's defaults (TPE, Hyperband with the general
  defaults, ``n_trials`` trials, l2sp, default ranges and split).
- ``random``: the same spec with ``sampler.type: random``, run until it has
  trained at least as many epochs as ``search`` did (pruned trials count the
  epochs they ran); its pick is the best validation trial among the first
  trials whose epochs add up to at most the search's, exported with
  ``autotransfer export --trial``.

Every arm's pick is scored as the trial's own checkpoint (``export --trial N
--no-refit --no-ensemble``). The search is also scored as the product exports it
by default: a greedy ensemble of its completed trials, each member refit on train +
validation (``export --ensemble --refit``, the ``search+ensemble`` row; off with
``--no-ensemble``; members from their checkpoints with ``--no-refit``). With
``--refit-row`` the search's single pick refit on train + validation is scored too
(``export --refit --no-ensemble``, the ``search+refit`` row).

Every arm trains ``--epochs`` epochs per trial (6) with the same backbone
(pretrained ``timm:tf_efficientnet_lite0@packaged`` for images,
``hf:sentence-transformers/all-MiniLM-L6-v2@packaged`` for texts), the same
pool of labelled examples and the same seed (spec ``seed`` and ``data.seed``),
so the arms of one seed see the same train/validation split. All other spec
fields are the product's defaults, whatever they are at the commit under test.

The held-out test set: each class is shuffled once (seed 12345, independent of
the run seed); its first ``--pool-per-class`` examples (30) form the pool the
product gets, labelled data a user would have, and up to ``--test-per-class`` (40)
of the rest the test set, written apart from the pool, so changes of the product's
own split defaults do not change it. A class too small for both keeps at least 25 %
for the test. The test set is larger than the product's own validation split on
purpose: the noise of the measurement should not hide the differences between arms.
The product's own test split of the pool (``test`` in its JSON) is recorded too.

    python bench/datasets.py                   # build the four sets (see its docstring)
    python bench/quality.py                    # all sets, seeds 0 1 2 (bench/README.md: timing)
    python bench/quality.py --quick            # one set per modality, one seed, tiny sizes
    python bench/quality.py --sets emoji fortunes --seeds 0 --name mytry

Writes ``bench/results/quality-<name>.json`` and ``.md`` (``--name`` defaults to
``cpu<cores>``; ``--quick`` runs write ``quality-<name>-quick``). Work files
(studies, exports, pools) go to ``--work`` (a temporary directory by default).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import datasets  # noqa: E402  (bench/datasets.py, next to this file)

RESULTS = ROOT / "bench" / "results"
IMAGE_BACKBONE = "timm:tf_efficientnet_lite0@packaged"
TEXT_BACKBONE = "hf:sentence-transformers/all-MiniLM-L6-v2@packaged"
ARMS = ["finetune", "probe", "search", "random"]
FIXED = {
    # a practitioner's plain fine-tune: one learning rate for trunk and head
    "finetune": {"freeze": 0.0, "lr": 1.0e-3, "alpha": 0.0, "trunk_lr_scale": 1.0},
    "probe": {"freeze": 1.0, "lr": 1.0e-2, "alpha": 0.0},
}
ENSEMBLE_ROW = "search+ensemble"
"""``autotransfer export --ensemble --refit``: a greedy ensemble of the search's
completed trials, chosen on validation, each member refit on train + validation
(``--no-refit``: from the checkpoints), scored on the held-out test."""
REFIT_ROW = "search+refit"
"""The search arm's pick refit on train + validation (``export --refit``)."""
TEST_FRACTION = 0.25
"""The least share of a class held out for the test set."""
TEST_SEED = 12345
POOL_PER_CLASS = 30
TEST_PER_CLASS = 40


# ------------------------------------------------------------------ data

def read_set(folder: Path) -> tuple[str, list[tuple[str, str]]]:
    """(modality, [(item, label)]) of a materialised set: items are PNG paths
    (image folder, one sub-folder per class) or texts (``data.csv``)."""
    if (folder / "data.csv").exists():
        with (folder / "data.csv").open(encoding="utf-8", newline="") as f:
            return "text", [(r["text"], r["label"]) for r in csv.DictReader(f)]
    items = [(str(p), p.parent.name) for p in sorted(folder.glob("*/*.png"))]
    if not items:
        raise SystemExit(f"error: {folder} holds neither data.csv nor class folders of PNGs")
    return "image", items


def hold_out(items: list[tuple[str, str]], pool_per_class: int | None = POOL_PER_CLASS,
             test_per_class: int | None = TEST_PER_CLASS, fraction: float = TEST_FRACTION,
             seed: int = TEST_SEED) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Stratified (pool, test) split, fixed by ``seed``: per class, a shuffle; the
    first ``pool_per_class`` items are the pool (fewer when that would leave under
    ``fraction`` of the class for the test; ``None``: all but ``fraction``), then
    up to ``test_per_class`` of the rest are the test (``None``: all the rest)."""
    by_class: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for item in items:
        by_class[item[1]].append(item)
    rng = np.random.default_rng(seed)
    pool, test = [], []
    for label in sorted(by_class):
        group = by_class[label]
        order = rng.permutation(len(group))
        n_pool = len(group) - max(1, round(fraction * len(group)))
        if pool_per_class is not None:
            n_pool = min(n_pool, pool_per_class)
        rest = order[n_pool:]
        pool += [group[i] for i in order[:n_pool]]
        test += [group[i] for i in (rest if test_per_class is None else rest[:test_per_class])]
    return pool, test


def write_pool(modality: str, pool: list[tuple[str, str]], dest: Path) -> Path:
    """The pool the product gets, as a data path: a class-folder copy or a CSV."""
    if modality == "text":
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / "pool.csv"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(pool)
        return path
    for src, label in pool:
        (dest / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / label / Path(src).name)
    return dest


# ------------------------------------------------------------------ product calls

def cli(*args: str, cwd: Path) -> dict[str, Any]:
    """Run ``autotransfer ARGS --json``; its JSON result (stdout)."""
    exe = shutil.which("autotransfer") or str(Path(sys.executable).parent / "autotransfer")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"autotransfer {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout) if "--json" in args else {}


def make_spec(arm: str, name: str, data: Path, modality: str, backbone: str, seed: int,
              epochs: int, image_size: int, n_trials: int, threads: int | None = None
              ) -> dict[str, Any]:
    """The spec of one arm: only what the arm needs to say; the rest is default."""
    spec: dict[str, Any] = {
        "name": name,
        "data": {"path": str(data), "seed": seed},
        "search": {"backbones": [backbone]},
        "train": {"epochs": epochs},
        "n_trials": n_trials,
        "seed": seed,
    }
    if modality == "image":
        spec["data"]["image_size"] = image_size
    if threads:
        spec["train"]["threads"] = threads  # speed (float sums may differ in the last bits)
    if arm in FIXED:
        spec["search"].update(FIXED[arm])
        spec["n_trials"] = 1
        spec["pruner"] = {"type": "none"}
    elif arm == "random":
        # Pure random search: no start portfolio queued before the sampler.
        spec["sampler"] = {"type": "random", "portfolio": False}
    return spec


def score(export_dir: Path, test: list[tuple[str, str]]) -> dict[str, float]:
    import autotransfer

    model = autotransfer.load(export_dir)
    preds = [p.label for p in model.predict([item for item, _ in test])]
    truth = [label for _, label in test]
    labels = sorted(set(truth))
    f1s = []
    for c in labels:
        tp = sum(p == c and t == c for p, t in zip(preds, truth, strict=True))
        fp = sum(p == c and t != c for p, t in zip(preds, truth, strict=True))
        fn = sum(p != c and t == c for p, t in zip(preds, truth, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    acc = sum(p == t for p, t in zip(preds, truth, strict=True)) / len(truth)
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s), "n": len(truth)}


def export_scored(db: Path, study: str, flags: list[str], out: Path,
                  test: list[tuple[str, str]]) -> tuple[dict[str, float], dict[str, Any], float]:
    """``autotransfer export FLAGS`` of ``study`` (in the SQLite file ``db``) into
    ``out`` (replaced if there), scored on ``test``: (its scores, config.json's
    ``model``: what the export holds, the export's seconds)."""
    if out.exists():
        shutil.rmtree(out)
    t0 = time.monotonic()
    cli("export", "--storage", f"sqlite:///{db}", "--study-name", study, *flags, str(out),
        cwd=db.parent)
    seconds = time.monotonic() - t0
    held = json.loads((out / "config.json").read_text())["model"]
    return score(out, test), held, seconds


def run_name(name: str, seed: int, arm: str) -> str:
    """A run's study name and work folder: ``<set>-s<seed>-<arm>``."""
    return f"{name}-s{seed}-{arm}"


def parse_run_name(run: str) -> tuple[str, int, str]:
    """(set, seed, arm) of a :func:`run_name`."""
    stem, arm = run.rsplit("-", 1)
    name, seed = stem.rsplit("-s", 1)
    return name, int(seed), arm


def epochs_of(trials: list[dict[str, Any]]) -> int:
    return sum(int(t.get("epochs_run") or 0) for t in trials)


def run_arm(arm: str, ctx: dict[str, Any], budget: int | None = None) -> dict[str, Any]:
    """One arm on one set and seed: the search, the pick's export, its test score."""
    name = run_name(ctx["set"], ctx["seed"], arm)
    work: Path = ctx["work"] / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    spec = make_spec(arm, name, ctx["data"], ctx["modality"],
                     ctx["backbone"], ctx["seed"], ctx["epochs"], ctx["image_size"],
                     ctx["n_trials"], ctx.get("threads"))
    (work / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    db = work / "study.db"
    # export reads the artifacts' folder from the study
    common = ["--storage", f"sqlite:///{db}", "--artifacts", str(work / "art")]
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    result = cli("search", "spec.yaml", *common, "--json", cwd=work)
    trials = result["trials"]
    runs = 1
    if arm == "random" and budget is not None:
        while epochs_of(trials) < budget:
            done = [t for t in trials if t.get("epochs_run")]
            per_trial = max(1.0, epochs_of(done) / max(1, len(done)))
            more = max(1, int(np.ceil((budget - epochs_of(trials)) / per_trial)))
            result = cli("search", "spec.yaml", *common, "--n-trials", str(more), "--json",
                         cwd=work)
            trials = result["trials"]
            runs += 1
        # the pick within the budget: first trials whose epochs add up to <= budget
        used, within = 0, []
        for t in sorted(trials, key=lambda t: t["number"]):
            used += int(t.get("epochs_run") or 0)
            if used > budget:
                break
            within.append(t)
        done = [t for t in within if t["state"] == "COMPLETE" and t.get("value") is not None]
        # the product's rule: highest validation accuracy, then lowest validation loss
        pick = max(done, key=lambda t: (
            t["value"], -(float("inf") if t.get("val_loss") is None else t["val_loss"]),
            -t["number"]))
        trials_counted = within
    else:
        pick = next(t for t in trials if t["number"] == result["best_trial"])
        trials_counted = trials
    search_seconds = time.monotonic() - t0
    # Every row names what it exports, whatever the spec's export defaults are: the
    # arms (and the search's first row) are the trial's own checkpoint.
    test, _, _ = export_scored(db, name, ["--trial", str(pick["number"]), "--no-refit",
                                          "--no-ensemble"], work / "export", ctx["test"])
    rows: dict[str, Any] = {}
    # A failed extra export (a refit that diverged, say) is recorded, not fatal.
    if arm == "search" and ctx.get("refit_row"):
        # the same pick refit on train + validation for its best epoch count
        t1 = time.monotonic()
        try:
            scored, _, _ = export_scored(db, name, ["--refit", "--no-ensemble"], work / "refit",
                                         ctx["test"])
            rows.update({"refit_test_accuracy": scored["accuracy"],
                         "refit_test_macro_f1": scored["macro_f1"],
                         "refit_seconds": round(time.monotonic() - t1, 1)})
        except RuntimeError as exc:
            rows["refit_error"] = str(exc)[-500:]
    if arm == "search" and ctx.get("ensemble"):
        # the greedy ensemble of the study's trials, each member refit (export --ensemble)
        t1 = time.monotonic()
        refit_flag = "--refit" if ctx.get("refit") else "--no-refit"
        try:
            scored, held, _ = export_scored(db, name, ["--ensemble", refit_flag],
                                            work / "ensemble", ctx["test"])
            rows.update({
                "ensemble_members": [m["trial"] for m in held["members"]
                                     for _ in range(m["weight"])],
                "ensemble_refit": held["trained_on"] == "train+val",
                "ensemble_refit_epochs": sum(m.get("epochs", 0) for m in held["members"]),
                "ensemble_val_accuracy": held["val_accuracy"],
                "ensemble_test_accuracy": scored["accuracy"],
                "ensemble_test_macro_f1": scored["macro_f1"],
                "ensemble_seconds": round(time.monotonic() - t1, 1),
            })
        except RuntimeError as exc:
            rows["ensemble_error"] = str(exc)[-500:]
    out = {
        "arm": arm,
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_n": test["n"],
        "picked_trial": pick["number"],
        "picked_params": pick["params"],
        "picked_val_accuracy": pick.get("val_accuracy"),
        "picked_best_epoch": pick.get("best_epoch"),
        "product_test": result.get("test") if pick["number"] == result.get("best_trial") else None,
        "n_trials": len(trials_counted),
        "n_trials_run": len(trials),
        "n_pruned": sum(t["state"] == "PRUNED" for t in trials_counted),
        "epochs_trained": epochs_of(trials_counted),
        "epochs_trained_all": epochs_of(trials),
        "cli_runs": runs,
        "wall_seconds": round(time.monotonic() - t0, 1),
        "search_seconds": round(search_seconds, 1),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
        **rows,
        "trials": [{k: t.get(k) for k in ("number", "state", "value", "params", "epochs_run",
                                          "best_epoch", "pruned_at_epoch", "val_f1",
                                          "val_loss")}
                   for t in trials],
    }
    if not ctx.get("keep"):
        shutil.rmtree(work, ignore_errors=True)
    return out


def prepare_set(name: str, folder: Path, work: Path, pool_per_class: int | None = POOL_PER_CLASS,
                test_per_class: int | None = TEST_PER_CLASS) -> dict[str, Any]:
    """Read a materialised set, hold out its test set, write the pool."""
    modality, items = read_set(folder)
    pool, test = hold_out(items, pool_per_class, test_per_class)
    data = write_pool(modality, pool, work / f"{name}-pool")
    meta_file = folder / "dataset.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    return {
        "name": name, "modality": modality, "data": data, "test": test,
        "n_examples": len(items), "n_pool": len(pool), "n_test": len(test),
        "n_classes": len({label for _, label in items}),
        "source": meta.get("source", "generated (test)"), "licence": meta.get("licence", "-"),
        "labels": meta.get("labels", "-"), "runs": [],
    }


def run_seed(prepared: dict[str, Any], seed: int, arms: list[str], work: Path, epochs: int,
             image_size: int, n_trials: int, backbones: dict[str, str], keep: bool = False,
             log: Any = print, on_run: Any = None, threads: int | None = None,
             refit: bool = True, ensemble: bool = False, refit_row: bool = False) -> None:
    """Every arm on one prepared set and seed; runs are appended to it. With
    ``ensemble``, the search is also exported as a greedy ensemble (members refit
    with ``refit``) and scored (the ``search+ensemble`` row); with ``refit_row``, its
    pick is also refit on train + validation and scored (``refit_test_*``: the
    ``search+refit`` row)."""
    ctx = {"set": prepared["name"], "seed": seed, "work": work, "data": prepared["data"],
           "modality": prepared["modality"], "backbone": backbones[prepared["modality"]],
           "epochs": epochs, "image_size": image_size, "n_trials": n_trials,
           "test": prepared["test"], "keep": keep, "threads": threads, "refit": refit,
           "ensemble": ensemble, "refit_row": refit_row}
    budget = None
    for arm in arms:
        if arm == "random" and budget is None:
            raise SystemExit("error: the random arm needs the search arm before it")
        r = run_arm(arm, ctx, budget)
        r["seed"] = seed
        if arm == "search":
            budget = r["epochs_trained"]
        prepared["runs"].append(r)
        log(f"{prepared['name']} seed {seed} {arm:8s}: test acc {r['test_accuracy']:.3f} "
            f"F1 {r['test_macro_f1']:.3f}  val {r['picked_val_accuracy']:.3f}  "
            f"{r['n_trials']} trials {r['epochs_trained']} epochs  {r['wall_seconds']:.0f}s"
            f"  load {r['load_before']:.1f}"
            + (f"  refit: test acc {r['refit_test_accuracy']:.3f}" if "refit_test_accuracy" in r
               else "")
            + (f"  ensemble of {len(r['ensemble_members'])}: test acc "
               f"{r['ensemble_test_accuracy']:.3f}" if "ensemble_test_accuracy" in r else ""))
        if on_run:
            on_run()


def public(prepared: dict[str, Any], arms: list[str], backbones: dict[str, str]
           ) -> dict[str, Any]:
    out = {k: v for k, v in prepared.items() if k not in ("data", "test")}
    out["backbone"] = backbones[prepared["modality"]]
    out["summary"] = summarise(prepared["runs"], arms)
    return out


def run_set(name: str, folder: Path, seeds: list[int], arms: list[str], work: Path,
            epochs: int, image_size: int, n_trials: int, backbones: dict[str, str],
            keep: bool = False, log: Any = print, refit: bool = True, ensemble: bool = False,
            refit_row: bool = False, pool_per_class: int | None = POOL_PER_CLASS,
            test_per_class: int | None = TEST_PER_CLASS) -> dict[str, Any]:
    """Every seed and arm on one set (the test's entry point)."""
    prepared = prepare_set(name, folder, work, pool_per_class, test_per_class)
    for seed in seeds:
        run_seed(prepared, seed, arms, work, epochs, image_size, n_trials, backbones, keep, log,
                 refit=refit, ensemble=ensemble, refit_row=refit_row)
    return public(prepared, arms, backbones)


def summarise(runs: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    def ms(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    out = {}
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        out[arm] = {
            "test_accuracy": ms([r["test_accuracy"] for r in rs]),
            "test_macro_f1": ms([r["test_macro_f1"] for r in rs]),
            "val_accuracy": ms([r["picked_val_accuracy"] for r in rs]),
            "epochs_trained": ms([r["epochs_trained"] for r in rs]),
            "wall_seconds": ms([r.get("search_seconds", r["wall_seconds"]) for r in rs]),
            "seeds": len(rs),
        }
    ensembles = [r for r in runs if r["arm"] == "search" and "ensemble_test_accuracy" in r]
    if ensembles:
        out[ENSEMBLE_ROW] = {
            "test_accuracy": ms([r["ensemble_test_accuracy"] for r in ensembles]),
            "test_macro_f1": ms([r["ensemble_test_macro_f1"] for r in ensembles]),
            "val_accuracy": ms([r["ensemble_val_accuracy"] for r in ensembles]),
            "epochs_trained": ms([r["epochs_trained"] + r.get("ensemble_refit_epochs", 0)
                                  for r in ensembles]),
            "wall_seconds": ms([r["search_seconds"] + r.get("ensemble_seconds", 0.0)
                                for r in ensembles]),
            "members": ms([len(set(r["ensemble_members"])) for r in ensembles]),
            "seeds": len(ensembles),
        }
    refits = [r for r in runs if r["arm"] == "search" and "refit_test_accuracy" in r]
    if refits:
        out[REFIT_ROW] = {
            "test_accuracy": ms([r["refit_test_accuracy"] for r in refits]),
            "test_macro_f1": ms([r["refit_test_macro_f1"] for r in refits]),
            "val_accuracy": ms([r["picked_val_accuracy"] for r in refits]),
            "epochs_trained": ms([r["epochs_trained"] + (r["picked_best_epoch"] or 0)
                                  for r in refits]),
            "wall_seconds": ms([r["search_seconds"] + r["refit_seconds"] for r in refits]),
            "seeds": len(refits),
        }
    return out


# ------------------------------------------------------------------ report

def machine() -> str:
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {cuda}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Quality benchmark: {report['name']}", "",
             f"Machine: {report['machine']}. Commit {report['commit']}. "
             f"Started {report['started']}, {report['wall_minutes']:.1f} min in all; "
             f"1-min load average seen {report['load_min']:.1f} to {report['load_max']:.1f} "
             "(2 cores: above 2 means other work shared them).", "",
             f"Command: `{report['command']}`", "",
             f"Seeds {report['seeds']}; {report['epochs']} epochs per trial; images at "
             f"{report['image_size']} px; search arm {report['n_trials']} trials (spec "
             "defaults otherwise); finetune = freeze 0, lr 1e-3, α 0; probe = freeze 1.0, "
             "lr 1e-2, α 0; random = sampler.type random, picked within the search's "
             "trained epochs. " + split_text(report), "",
             "## Test accuracy and macro-F1 (mean ± std over seeds)", "",
             "| set | arm | test acc | test macro-F1 | picked val acc | epochs | wall s |",
             "|---|---|---|---|---|---|---|"]
    for s in report["sets"]:
        for arm, m in s["summary"].items():
            lines.append(
                f"| {s['name']} | {arm} | {m['test_accuracy']['mean']:.3f} ± "
                f"{m['test_accuracy']['std']:.3f} | {m['test_macro_f1']['mean']:.3f} ± "
                f"{m['test_macro_f1']['std']:.3f} | {m['val_accuracy']['mean']:.3f} | "
                f"{m['epochs_trained']['mean']:.0f} | {m['wall_seconds']['mean']:.0f} |")
    extra = [(row, field) for row, field in ((REFIT_ROW, "refit_test_accuracy"),
                                             (ENSEMBLE_ROW, "ensemble_test_accuracy"))
             if any(row in s["summary"] for s in report["sets"])]
    lines += ["", "## Per seed (test accuracy; picked trial's val accuracy in brackets)", "",
              "| set | seed | " + " | ".join(report["arms"] + [row for row, _ in extra]) + " |",
              "|---|---|" + "---|" * (len(report["arms"]) + len(extra))]
    for s in report["sets"]:
        for seed in report["seeds"]:
            cells = []
            for arm in report["arms"]:
                r = next((r for r in s["runs"] if r["seed"] == seed and r["arm"] == arm), None)
                cells.append("-" if r is None else
                             f"{r['test_accuracy']:.3f} ({r['picked_val_accuracy']:.3f})")
            for _, field in extra:
                r = next((r for r in s["runs"] if r["seed"] == seed and r["arm"] == "search"
                          and field in r), None)
                cells.append("-" if r is None else f"{r[field]:.3f}")
            lines.append(f"| {s['name']} | {seed} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets (issue 15), from the means above", ""]
    lines += targets(report)
    lines += ["", "## Data sets", "",
              "| set | modality | examples (pool / test) | classes | source | licence | labels |",
              "|---|---|---|---|---|---|---|"]
    for s in report["sets"]:
        lines.append(f"| {s['name']} | {s['modality']} | {s['n_examples']} ({s['n_pool']} / "
                     f"{s['n_test']}) | {s['n_classes']} | {s['source']} | {s['licence']} | "
                     f"{s['labels']} |")
    return "\n".join(lines) + "\n"


PICK_ROWS = ("search", REFIT_ROW, ENSEMBLE_ROW)
"""The search's pick as the product can export it: the trial's checkpoint, refit,
greedy ensemble; each is held to the targets against the hand baselines."""


def split_text(report: dict[str, Any]) -> str:
    """How the report's sets were split into the product's pool and the test set."""
    pool, test = report.get("pool_per_class"), report.get("test_per_class")
    if pool is None and test is None:  # reports made before the options existed
        return ("Test = a fixed stratified 25 % held out from each set (never given to the "
                "product); the product gets the other 75 % and splits it with its own defaults.")
    return (f"Per class, the product gets {pool or 'all but 25 %'} examples (its pool, split "
            "with its own defaults) and the test set holds "
            f"{'all the rest' if test is None else f'up to {test} of the rest'} (fixed shuffle, "
            "at least 25 % of a class; never given to the product).")


def seed_diffs(a: dict[int, float], b: dict[int, float]) -> str:
    """``a`` − ``b`` seed by seed (test accuracies by seed), in points, for the seeds
    both have: the rows of one seed share the pool, its split and the test set."""
    return " ".join(f"{100 * (a[seed] - b[seed]):+.1f}" for seed in sorted(a) if seed in b)


def paired(s: dict[str, Any], hand: str) -> str:
    """Per-seed differences, in points, of the product's export (the ensemble row,
    else the search's checkpoint) against the better hand baseline and random's pick."""
    by_arm: dict[str, dict[int, float]] = defaultdict(dict)
    for r in s["runs"]:
        by_arm[r["arm"]][r["seed"]] = r["test_accuracy"]
    export = {r["seed"]: r.get("ensemble_test_accuracy", r["test_accuracy"])
              for r in s["runs"] if r["arm"] == "search"}
    out = [f"{other} {seed_diffs(export, by_arm[other])}" for other in (hand, "random")
           if set(export) & set(by_arm[other])]
    return f" (export − arm per seed: {'; '.join(out)})" if out else ""


def targets(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    gaps: dict[str, list[float]] = defaultdict(list)
    for s in report["sets"]:
        m = s["summary"]
        if not all(a in m for a in ARMS):
            continue
        acc = {a: v["test_accuracy"]["mean"] for a, v in m.items()}
        hand = max(acc["finetune"], acc["probe"])
        parts = []
        for row in PICK_ROWS:
            if row in acc:
                gaps[row].append(acc[row] - hand)
                parts.append(f"{row} {acc[row]:.3f} ({'met' if acc[row] >= hand else 'MISSED'})")
        vs_random = [f"{row} {'met' if acc[row] >= acc['random'] else 'MISSED'}"
                     for row in ("search", ENSEMBLE_ROW) if row in acc]
        lines.append(f"- {s['name']}: better hand baseline {hand:.3f}; " + ", ".join(parts)
                     + f"; vs random's pick {acc['random']:.3f}: " + ", ".join(vs_random)
                     + paired(s, "finetune" if acc["finetune"] >= acc["probe"] else "probe"))
    for row, name in ((REFIT_ROW, "refit on train + validation"),
                      (ENSEMBLE_ROW, "greedy ensemble")):
        g = [s["summary"][row]["test_accuracy"]["mean"]
             - s["summary"]["search"]["test_accuracy"]["mean"]
             for s in report["sets"] if row in s["summary"] and "search" in s["summary"]]
        if g:
            lines.append(f"- {name} vs the search's own checkpoint: "
                         + ", ".join(f"{100 * x:+.1f}" for x in g)
                         + f" points (mean {100 * statistics.fmean(g):+.1f})")
    for row, g in gaps.items():
        mean_gap = statistics.fmean(g)
        lines.append(f"- over all sets: {row} − better hand baseline = {100 * mean_gap:+.1f} "
                     f"points (target +3: {'met' if mean_gap >= 0.03 else 'MISSED'})")
    return lines


def portable(arg: str) -> str:
    """A command-line argument as the results may show it: a path inside the
    repository relative to it, any other absolute path as ``DIR`` (the
    results must not name the machine's own folders)."""
    if not arg.startswith("/"):
        return arg
    path = Path(arg).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else "DIR"


def span_minutes(reports: list[dict[str, Any]]) -> float:
    """Minutes from the earliest ``started`` to the latest end (start + wall)."""
    import datetime as dt

    def start(r: dict[str, Any]) -> dt.datetime:
        return dt.datetime.strptime(r["started"], "%Y-%m-%d %H:%M:%S UTC")

    first = min(start(r) for r in reports)
    return max((start(r) - first).total_seconds() / 60 + r["wall_minutes"] for r in reports)


def merge(reports: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One report from several made side by side with the same settings (each
    process on its own sets or seeds): runs of a set are pooled and summarised
    again; the wall time runs from the first start to the last end (runs made one
    after another in one process add up)."""
    first = reports[0]
    for r in reports[1:]:
        for key in ("epochs", "image_size", "n_trials", "per_class", "arms", "pool_per_class",
                    "test_per_class"):
            if r.get(key) != first.get(key):
                raise SystemExit(f"error: cannot merge: '{key}' differs ({first.get(key)} vs "
                                 f"{r.get(key)}); merge runs made with the same settings")
    sets: dict[str, dict[str, Any]] = {}
    for r in reports:
        for s in r["sets"]:
            if s["name"] in sets:
                sets[s["name"]]["runs"] += s["runs"]
            else:
                sets[s["name"]] = {**s, "runs": list(s["runs"])}
    for s in sets.values():
        s["summary"] = summarise(s["runs"], first["arms"])
    return {
        **first, "name": name,
        "commit": ", ".join(dict.fromkeys(r["commit"] for r in reports)),
        "started": min(r["started"] for r in reports),
        "wall_minutes": span_minutes(reports),
        "command": " ; ".join(r["command"] for r in reports)
        + " (side by side) ; python bench/quality.py --merge ...",
        "seeds": sorted({seed for r in reports for seed in r["seeds"]}),
        "load_min": min(r["load_min"] for r in reports),
        "load_max": max(r["load_max"] for r in reports),
        "sets": list(sets.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="*", default=None,
                        help=f"data sets (default: all of {', '.join(datasets.BUILDERS)})")
    parser.add_argument("--data", type=Path, default=datasets.DEFAULT_OUT,
                        help="where the sets are (built there if missing)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="*", default=ARMS, choices=ARMS)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-trials", type=int, default=10, help="the search arm's trials")
    parser.add_argument("--per-class", type=int, default=100,
                        help="examples per class of the built sets, at most (pool and test)")
    parser.add_argument("--pool-per-class", type=int, default=POOL_PER_CLASS,
                        help="labelled examples per class given to the product (default: "
                        "%(default)s; 0: all but 25 %%)")
    parser.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS,
                        help="held-out test examples per class, at most (default: %(default)s;"
                        " 0: all the rest)")
    parser.add_argument("--image-backbone", default=IMAGE_BACKBONE)
    parser.add_argument("--text-backbone", default=TEXT_BACKBONE)
    parser.add_argument("--threads", type=int, default=None,
                        help="train.threads of every spec, and the threads that score the "
                        "exports here (default: the product's, all cores); 1 helps on a machine"
                        " shared with other work")
    parser.add_argument("--quick", action="store_true",
                        help="emoji + fortunes, seed 0, 30 per class, 32 px, 3 trials, 2 epochs")
    parser.add_argument("--name", default=f"cpu{os.cpu_count()}",
                        help="results file: bench/results/quality-NAME.json/.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep studies and exports")
    parser.add_argument("--no-refit", dest="refit", action="store_false",
                        help="ensemble members from their checkpoints, not refit on train + "
                        "validation")
    parser.add_argument("--refit-row", action="store_true",
                        help="also score the search's single pick refit on train + validation "
                        "(export --refit --no-ensemble; the search+refit row)")
    parser.add_argument("--ensemble", action=argparse.BooleanOptionalAction, default=True,
                        help="also score a greedy ensemble of the search's completed trials "
                        "(export --ensemble: chosen on validation, each member refit unless "
                        "--no-refit; the search+ensemble row)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="merge result files of runs made side by side (e.g. one per "
                        "set) into quality-NAME.json/.md; runs nothing")
    args = parser.parse_args(argv)
    if args.merge:
        report = merge([json.loads(p.read_text()) for p in args.merge], args.name)
        stem = args.results / f"quality-{args.name}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return 0
    if args.quick:
        args.sets = args.sets or ["emoji", "fortunes"]
        args.seeds, args.per_class, args.image_size = [0], 30, 32
        args.pool_per_class, args.test_per_class = 20, 10
        args.n_trials, args.epochs = 3, 2
        args.name += "-quick"
    names = args.sets or list(datasets.BUILDERS)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the scoring here, beside the other process
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="autotransfer-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    backbones = {"image": args.image_backbone, "text": args.text_backbone}
    prepared = []
    for name in names:
        if name in datasets.BUILDERS:
            out = args.data / f"per-class-{args.per_class}" if args.per_class != 100 else args.data
            folder = datasets.build(name, out, per_class=args.per_class)
        else:
            folder = Path(name)
        prepared.append(prepare_set(folder.name, folder, work, args.pool_per_class or None,
                                    args.test_per_class or None))
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"quality-{args.name}"

    def write() -> dict[str, Any]:
        sets = [public(p, args.arms, backbones) for p in prepared if p["runs"]]
        loads = [r[k] for s in sets for r in s["runs"] for k in ("load_before", "load_after")]
        report = {
            "name": args.name, "machine": machine(), "commit": git_commit(),
            "started": started, "wall_minutes": (time.monotonic() - t0) / 60,
            "command": "python bench/quality.py " + " ".join(
                portable(a) for a in (argv if argv is not None else sys.argv[1:])),
            "seeds": args.seeds, "arms": args.arms, "epochs": args.epochs,
            "image_size": args.image_size, "n_trials": args.n_trials,
            "per_class": args.per_class, "pool_per_class": args.pool_per_class or None,
            "test_per_class": args.test_per_class or None,
            "threads": args.threads, "test_fraction": TEST_FRACTION,
            "test_seed": TEST_SEED, "fixed_arms": FIXED, "load_min": min(loads),
            "load_max": max(loads), "sets": sets,
        }
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
        return report

    # seeds outermost: a run stopped early still has every set at the first seeds
    for seed in args.seeds:
        for p in prepared:
            print(f"== {p['name']} seed {seed}", flush=True)
            run_seed(p, seed, args.arms, work, args.epochs, args.image_size, args.n_trials,
                     backbones, args.keep, log=lambda s: print(s, flush=True), on_run=write,
                     threads=args.threads, refit=args.refit, ensemble=args.ensemble,
                     refit_row=args.refit_row)
    report = write()
    print(markdown(report))
    print(f"wrote {stem}.json and .md")
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
