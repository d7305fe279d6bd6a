"""`autotransfer worker`: joining a study that `search` created, and refusing
studies it cannot join (one line, exit 2)."""

from __future__ import annotations

from pathlib import Path

import optuna
from typer.testing import CliRunner

from autotransfer.cli import app
from autotransfer.store.records import TARGET_ATTR

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_worker_joins_a_study_made_by_search(write_spec, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'w.db'}"
    spec = write_spec(**{"name": "joined", "n_trials": 1, "train.epochs": 1})
    made = invoke("search", spec, "--storage", storage, "--json")
    assert made.exit_code == 0, made.output
    # The study has its 1 trial: a worker finds nothing to do.
    idle = invoke("worker", "--storage", storage, "--study-name", "joined")
    assert idle.exit_code == 0, idle.output
    assert idle.stdout.strip() == "worker ran 0 trial(s); study 'joined' now has 1 (1 complete)"
    study = optuna.load_study(study_name="joined", storage=storage)
    study.set_user_attr(TARGET_ATTR, 4)  # as a search stopped early would leave it
    joined = invoke("worker", "--storage", storage, "--study-name", "joined", "--n-trials", "2")
    assert joined.exit_code == 0, joined.output
    assert ("worker on study 'joined': 1 trial(s) stored; running until the study has 4 "
            "trial(s) or this worker has run 2") in joined.stderr
    assert joined.stdout.strip() == "worker ran 2 trial(s); study 'joined' now has 3 (3 complete)"
    # A second worker takes the rest of the budget, and no more.
    rest = invoke("worker", "--storage", storage, "--study-name", "joined")
    assert rest.exit_code == 0, rest.output
    assert rest.stdout.strip() == "worker ran 1 trial(s); study 'joined' now has 4 (4 complete)"
    assert "stopping: study 'joined' has its 4 trials" in rest.stderr
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    # The worker ran the saved spec: its epochs, its search space, its artifacts dir.
    assert all(t.user_attrs["epochs_run"] == 1 for t in trials)
    assert all(t.params["backbone"] == "timm:test_resnet@none" for t in trials)
    assert len({t.params["lr"] for t in trials}) == 4  # the worker drew new parameters
    checkpoints = tmp_path / "autotransfer-artifacts"
    assert all((checkpoints / t.user_attrs["checkpoint"]).is_file() for t in trials)


def test_worker_refuses_what_it_cannot_join(write_spec, image_folder, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'w.db'}"
    missing = invoke("worker", "--storage", storage, "--study-name", "nope")
    assert missing.exit_code == 2
    assert missing.output.strip().startswith(
        f"error: no study storage at '{tmp_path / 'w.db'}': the file does not exist")
    assert not (tmp_path / "w.db").exists()
    optuna.create_study(study_name="foreign", storage=storage)
    foreign = invoke("worker", "--storage", storage, "--study-name", "foreign")
    assert foreign.exit_code == 2
    assert foreign.output.strip() == (
        "error: study 'foreign' was not made by autotransfer (it has no saved spec); "
        "create studies with `autotransfer search`"
    )
    other = invoke("worker", "--storage", storage, "--study-name", "other")
    assert other.exit_code == 2
    assert other.output.strip() == "error: no study 'other' in the storage; studies: foreign"
    spec = write_spec(**{"name": "mine", "n_trials": 1, "train.epochs": 1})
    assert invoke("search", spec, "--storage", storage).exit_code == 0
    elsewhere = tmp_path / "not-mounted"
    moved = invoke("worker", "--storage", storage, "--study-name", "mine",
                   "--artifacts", elsewhere)
    assert moved.exit_code == 2
    assert f"artifacts directory '{elsewhere}' (from --artifacts) does not exist" in moved.output
    # Data with other classes than the study's.
    other_data = image_folder("other", classes={"cat": (9, 9, 9), "dog": (200, 200, 200)})
    wrong = invoke("worker", "--storage", storage, "--study-name", "mine", "--data", other_data)
    assert wrong.exit_code == 2
    assert "has classes ['cat', 'dog'] but study 'mine' was made with ['blue', 'green', 'red']" \
        in wrong.output
    # The search that shares the study cannot change what it means either.
    changed = invoke("search", write_spec(**{"name": "mine", "train.epochs": 2, "seed": 5}),
                     "--storage", storage)
    assert changed.exit_code == 2
    assert changed.output.strip() == (
        "error: study 'mine' exists with a different spec (changed: seed, train.epochs); run it "
        "with its own spec, or start a new study with --study-name NEW"
    )
    assert len(optuna.load_study(study_name="mine", storage=storage).trials) == 1
    assert "Traceback" not in moved.output + foreign.output + missing.output


def test_worker_help_explains_joining() -> None:
    result = invoke("worker", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for expected in ("--storage", "--study-name", "--artifacts", "--n-trials",
                     "Join a study that `autotransfer search` created"):
        assert expected in text
