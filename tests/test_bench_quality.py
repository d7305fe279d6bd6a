"""bench/datasets.py and bench/quality.py: the set builders and the harness's
arm accounting, on a tiny generated set with a tiny random-init model (the real
sets and backbones are the benchmark's business, not the suite's)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


datasets = _load("datasets")
quality = _load("quality")
kept_exports = _load("kept_exports")


def test_balanced_is_seeded_capped_and_order_free() -> None:
    groups = {"a": [f"a{i}" for i in range(30)], "b": [f"b{i}" for i in range(5)]}
    picked = datasets.balanced(groups, per_class=10, seed=3)
    assert [len(picked["a"]), len(picked["b"])] == [10, 5]
    shuffled = {"a": list(reversed(groups["a"])), "b": groups["b"]}
    assert datasets.balanced(shuffled, per_class=10, seed=3) == picked
    assert datasets.balanced(groups, per_class=10, seed=4)["a"] != picked["a"]


@pytest.mark.parametrize("name", list(datasets.BUILDERS))
def test_builders_write_a_labelled_set(name: str, tmp_path: Path) -> None:
    sources = {"emoji": datasets.EMOJI_FONT, "stamps": datasets.STAMPS,
               "fortunes": datasets.FORTUNES, "debian-sections": Path("/usr/bin/apt-cache")}
    if not sources[name].exists():
        pytest.skip(f"{name}: its Debian source is not installed (bench/datasets.py)")
    folder = datasets.build(name, tmp_path, per_class=3, seed=0)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["n_classes"] == 8 and meta["licence"] and meta["source"]
    assert all(1 <= n <= 3 for n in meta["counts"].values())
    modality, items = quality.read_set(folder)
    assert modality == datasets.MODALITY[name]
    assert len(items) == meta["n_examples"]
    again = datasets.build(name, tmp_path / "again", per_class=3, seed=0)
    assert sorted(quality.read_set(again)[1]) == sorted(
        (item.replace(str(folder), str(again)), label) for item, label in items)


def test_a_set_built_by_an_older_builder_is_rebuilt(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def builder(out: Path, per_class: int, seed: int) -> dict:
        calls.append(per_class)
        (out / "data.csv").write_text("text,label\nhello there,a\n")
        return {"modality": "text", "counts": {"a": 1}}

    monkeypatch.setitem(datasets.BUILDERS, "fortunes", builder)
    folder = datasets.build("fortunes", tmp_path, per_class=3)
    assert json.loads((folder / "dataset.json").read_text())["version"] == 2
    datasets.build("fortunes", tmp_path, per_class=3)
    assert calls == [3]  # kept: same parameters, same builder version
    meta = json.loads((folder / "dataset.json").read_text())
    del meta["version"]  # as written before versions existed: version 1
    (folder / "dataset.json").write_text(json.dumps(meta))
    datasets.build("fortunes", tmp_path, per_class=3)
    assert calls == [3, 3]


def test_hold_out_is_stratified_fixed_and_disjoint() -> None:
    items = [(f"x{c}{i}", c) for c in "abc" for i in range(20)]
    pool, test = quality.hold_out(items, pool_per_class=None, test_per_class=None)
    assert len(test) == 15 and len(pool) == 45
    assert {label for _, label in test} == {"a", "b", "c"}
    assert not {i for i, _ in pool} & {i for i, _ in test}
    assert quality.hold_out(list(reversed(items)))[1] != [] and quality.hold_out(
        items, pool_per_class=None, test_per_class=None) == (pool, test)


def test_hold_out_gives_the_pool_a_fixed_size_and_the_test_the_rest() -> None:
    # class a is large, b has room for the pool and a little test, c is too small
    items = ([(f"a{i}", "a") for i in range(100)] + [(f"b{i}", "b") for i in range(36)]
             + [(f"c{i}", "c") for i in range(20)])
    pool, test = quality.hold_out(items, pool_per_class=30, test_per_class=40)
    count = lambda rows, c: sum(label == c for _, label in rows)  # noqa: E731
    assert [count(pool, c) for c in "abc"] == [30, 27, 15]  # b and c keep 25 % for the test
    assert [count(test, c) for c in "abc"] == [40, 9, 5]
    assert not {i for i, _ in pool} & {i for i, _ in test}
    # the pool does not depend on how much is held out for the test
    assert quality.hold_out(items, pool_per_class=30, test_per_class=None)[0] == pool


def test_fixed_arms_pin_the_space_and_random_sets_the_sampler(tmp_path: Path) -> None:
    args = (tmp_path, "image", "timm:x@none", 1, 6, 64, 10)
    finetune = quality.make_spec("finetune", "n", *args)
    assert finetune["search"] | {} == {"backbones": ["timm:x@none"], "freeze": 0.0,
                                      "lr": 1e-3, "alpha": 0.0, "trunk_lr_scale": 1.0}
    assert finetune["n_trials"] == 1
    assert quality.make_spec("probe", "n", *args)["search"]["freeze"] == 1.0
    random_sampler = quality.make_spec("random", "n", *args)["sampler"]
    assert random_sampler == {"type": "random", "portfolio": False}
    search = quality.make_spec("search", "n", *args)
    assert "sampler" not in search and "pruner" not in search and search["n_trials"] == 10


def test_harness_arms_on_a_tiny_set(tmp_path: Path, make_images) -> None:
    from conftest import TINY_BACKBONE

    folder = make_images(tmp_path / "tiny", per_class=20, size=32)
    result = quality.run_set(
        "tiny", folder, seeds=[0], arms=quality.ARMS, work=tmp_path / "work", epochs=2,
        image_size=32, n_trials=3, backbones={"image": TINY_BACKBONE, "text": "-"},
        log=lambda _: None, ensemble=True, refit_row=True, pool_per_class=None,
        test_per_class=None, keep=True)
    runs = {r["arm"]: r for r in result["runs"]}
    assert set(runs) == set(quality.ARMS)
    assert result["n_test"] == 15 and result["n_pool"] == 45
    for arm in ("finetune", "probe"):
        assert runs[arm]["n_trials"] == 1 and runs[arm]["epochs_trained"] == 2
    assert runs["finetune"]["picked_params"]["freeze"] == 0.0
    assert runs["probe"]["picked_params"]["freeze"] == 1.0
    assert runs["search"]["n_trials"] == 3
    budget = runs["search"]["epochs_trained"]
    assert budget == sum(t["epochs_run"] or 0 for t in runs["search"]["trials"])
    # random search: run to at least the search's epochs, picked within them
    assert runs["random"]["epochs_trained"] <= budget <= runs["random"]["epochs_trained_all"]
    for r in runs.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_n"] == 15
    # the search's pick, refit on train + validation, scored on the same test set
    assert 0.0 <= runs["search"]["refit_test_accuracy"] <= 1.0
    # a greedy ensemble of the search's completed trials (export --ensemble), members refit
    search = runs["search"]
    complete = {t["number"] for t in search["trials"] if t["state"] == "COMPLETE"}
    assert set(search["ensemble_members"]) <= complete and search["ensemble_refit"]
    assert search["ensemble_val_accuracy"] >= search["picked_val_accuracy"]  # starts from it
    assert all("val_loss" in t for t in search["trials"])
    assert 0.0 <= search["ensemble_test_accuracy"] <= 1.0
    summary = result["summary"]
    assert set(summary) == {*quality.ARMS, quality.REFIT_ROW, quality.ENSEMBLE_ROW}
    assert summary["search"]["seeds"] == 1
    report = {"name": "t", "machine": "m", "commit": "c", "started": "2026-11-30 10:00:00 UTC",
              "wall_minutes": 1.0,
              "load_min": 0.0, "load_max": 1.0, "command": "x", "seeds": [0],
              "epochs": 2, "image_size": 32, "n_trials": 3, "arms": quality.ARMS,
              "sets": [result]}
    md = quality.markdown(report)
    assert "| tiny | search |" in md and "over all sets" in md
    assert "| tiny | search+refit |" in md and "refit on train + validation vs" in md
    assert "| tiny | search+ensemble |" in md and "greedy ensemble vs" in md
    assert "search+ensemble − better hand baseline" in md
    # runs made side by side merge into one report, summarised again
    halves = []
    for arms in (quality.ARMS[:2], quality.ARMS[2:]):
        part = {**result, "runs": [r for r in result["runs"] if r["arm"] in arms]}
        halves.append({**report, "sets": [part], "wall_minutes": 1.0 + len(halves)})
    merged = quality.merge(halves, "m")
    assert merged["sets"][0]["summary"] == summary and merged["wall_minutes"] == 2.0
    # one run after another: from the first start to the last end
    later = {**halves[1], "started": "2026-11-30 10:05:00 UTC"}
    assert quality.merge([halves[0], later], "m")["wall_minutes"] == 7.0
    with pytest.raises(SystemExit, match="epochs"):
        quality.merge([report, {**report, "epochs": 3}], "m")
    # the fairness rows, from the kept studies: a hand baseline refit, random's ensemble
    _, test = quality.hold_out(quality.read_set(folder)[1], None, None)
    rows = [kept_exports.export_row(tmp_path / "work" / quality.run_name("tiny", 0, arm), row, test)
            for arm, row in (("finetune", "finetune+refit"), ("probe", "probe+refit"),
                             ("random", "random+ensemble"))]
    assert [(r["set"], r["seed"], r["test_n"]) for r in rows] == [("tiny", 0, 15)] * 3
    assert [r["kind"] for r in rows] == ["refit", "refit", "ensemble"]
    assert all(r["trained_on"] == "train+val" for r in rows)
    assert set(rows[2]["members"]) <= {t["number"] for t in runs["random"]["trials"]}
    md = kept_exports.markdown({"name": "k", "machine": "m", "commit": "c", "minutes": 1.0,
                                "command": "x", "rows": rows}, report)
    assert "| tiny |" in md and "vs better refit hand baseline" in md
    assert "export − better refit hand baseline" in md


def test_text_pool_is_a_csv(tmp_path: Path) -> None:
    rows = [(f"text {i}", "ab"[i % 2]) for i in range(8)]
    path = quality.write_pool("text", rows, tmp_path / "p")
    with path.open(encoding="utf-8", newline="") as f:
        assert [(r["text"], r["label"]) for r in csv.DictReader(f)] == rows


def test_the_recorded_command_names_no_folder_of_the_machine(tmp_path: Path) -> None:
    assert quality.portable("--per-class") == "--per-class"
    assert quality.portable(str(tmp_path / "work")) == "DIR"
    assert quality.portable(str(quality.ROOT / "bench" / "data")) == "bench/data"


def test_logme_ranks_informative_features_above_noise() -> None:
    import torch

    logme = _load("transferability").logme
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=g)
    signal = 3 * torch.nn.functional.one_hot(labels, 4).float() + torch.randn(200, 4, generator=g)
    noise = torch.randn(200, 16, generator=g)
    scores = [logme(f, labels) for f in (signal, torch.cat([signal, noise[:, :12]], 1), noise)]
    assert scores[0] > scores[1] > scores[2]  # signal, signal + noise, noise
    # more dimensions than examples (1280 pooled features, 144 training images)
    wide = torch.cat([signal[:50], torch.randn(50, 300, generator=g)], 1)
    assert logme(torch.randn(50, 304, generator=g), labels[:50]) < logme(wide, labels[:50])
