"""Every kind of bad input: exit code 2, one line on stderr naming the value,
no traceback; a failing run leaves the stored trials alone; --debug shows the
traceback."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autotransfer.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_bad_input(result, *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr that contains every
    needle, and no traceback anywhere."""
    detail = f"exit {result.exit_code}\nstderr: {result.stderr!r}\nexception: {result.exception!r}"
    assert result.exit_code == 2, detail
    assert isinstance(result.exception, SystemExit | None), detail
    assert "Traceback" not in result.output, detail
    assert result.stdout == "", detail
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("error: "), detail
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


# ---------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"train.epochs": "many"}, ["train.epochs", '"many"', "integer"]),
        ({"search.batch_size": "big"}, ["search.batch_size", '"big"']),
        ({"search.lr": 0}, ["search.lr", "= 0", "must be > 0"]),
        ({"search.lr": -0.001}, ["search.lr", "-0.001", "must be > 0"]),
        ({"search.lr": {"low": 0.0, "high": 0.1}}, ["search.lr", '"low": 0.0', "must be > 0"]),
        ({"search.alpha": 1.0}, ["search.alpha", "1.0", "[0, 1)"]),
        ({"search.alpha": -0.1}, ["search.alpha", "-0.1", "[0, 1)"]),
        ({"search.alpha": {"low": 0.0, "high": 1.0}}, ["search.alpha", '"high": 1.0', "[0, 1)"]),
        ({"trian": {"epochs": 2}}, ["trian", "unknown key", "did you mean 'train'"]),
        ({"search.backbone": ["timm:x"]}, ["search.backbone", "did you mean 'backbones'"]),
        ({"search.lr": {"low": 0.1, "high": 0.001}}, ["search.lr", '"low": 0.1', "swap"]),
        ({"search.freeze": {"low": 0.9, "high": 0.1}}, ["search.freeze", '"low": 0.9', "swap"]),
        ({"retention": "source"}, ["retention 'source' needs a 'source:' data set"]),
        ({"search.backbones": ["resnet18"]}, ["'resnet18'", "family:model"]),
        ({"data.image_size": 4}, ["data.image_size", "= 4", "greater than or equal to 8"]),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_invalid_spec_field(write_spec, storage_url: str, overrides: dict, needles: list) -> None:
    spec = write_spec(**overrides)
    line = assert_bad_input(invoke("search", spec, "--storage", storage_url), *needles)
    assert spec.name in line  # which file


def test_malformed_yaml(write_spec, storage_url: str) -> None:
    spec = write_spec(text="name: tiny\nsearch:\n  backbones: [timm:x\n")
    assert_bad_input(invoke("search", spec, "--storage", storage_url),
                     spec.name, "not valid YAML", "line 4")


def test_missing_spec_file(tmp_path: Path, storage_url: str) -> None:
    missing = tmp_path / "nope.yaml"
    assert_bad_input(invoke("search", missing, "--storage", storage_url), "nope.yaml", "not found")


# ---------------------------------------------------------------- backbones


@pytest.mark.parametrize(
    ("backbone", "needles"),
    [
        ("nofamily:resnet18@none", ["unknown backbone family 'nofamily'", "timm"]),
        ("timm:not_a_real_model@none", ["timm has no model 'not_a_real_model'"]),
        ("timm:test_resnet@packaged", ["no packaged weights for timm:test_resnet"]),
        ("timm:test_resnet@missing.safetensors", ["missing.safetensors", "not found"]),
    ],
)
def test_unknown_backbone(write_spec, storage_url: str, backbone: str, needles: list) -> None:
    spec = write_spec()
    result = invoke("search", spec, "--backbones", backbone, "--storage", storage_url)
    assert_bad_input(result, *needles)
    assert not Path(storage_url.removeprefix("sqlite:///")).with_name(
        "autotransfer-artifacts").exists()


# ---------------------------------------------------------------- data


def _data_case(case: str, tmp_path: Path, make: Callable[..., Path]) -> tuple[Path, list[str]]:
    if case == "missing folder":
        return tmp_path / "no-such-folder", ["no-such-folder", "does not exist"]
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", ["empty", "no class sub-folders"]
    if case == "a file":
        (tmp_path / "file.png").write_bytes(b"x")
        return tmp_path / "file.png", ["file.png", "is a file"]
    if case == "too few images":
        root = make(per_class=12)
        for p in sorted((root / "green").iterdir())[2:]:
            p.unlink()
        return root, ["class 'green' has 2 image(s)", "at least 4"]
    if case == "non-image files":
        root = make(per_class=12)
        (root / "red" / "notes.txt").write_text("hello")
        return root, ["red/notes.txt", "not images"]
    if case == "unreadable images":
        root = make(per_class=12)
        for i in range(6):
            (root / "blue" / f"broken{i}.png").write_bytes(b"not a png")
        return root, ["6 of 42 images", "cannot be read"]
    if case == "one class":
        root = make(per_class=12, classes={"only": (10, 20, 30)})
        return root, ["one class ('only')", "at least 2"]
    if case == "empty class folder":
        root = make(per_class=12)
        (root / "void").mkdir()
        return root, ["void", "no images"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["missing folder", "empty folder", "a file", "too few images", "non-image files",
     "unreadable images", "one class", "empty class folder"],
)
def test_bad_data(case: str, write_spec, image_folder, tmp_path: Path, storage_url: str) -> None:
    data, needles = _data_case(case, tmp_path, image_folder)
    spec = write_spec()
    result = invoke("search", spec, "--data", data, "--storage", storage_url)
    assert_bad_input(result, *needles)


def test_bad_data_path_in_spec(write_spec, tmp_path: Path, storage_url: str) -> None:
    spec = write_spec(**{"data.path": str(tmp_path / "gone")})
    assert_bad_input(invoke("search", spec, "--storage", storage_url), "gone", "does not exist")


def test_unknown_builtin_data_set(write_spec, storage_url: str) -> None:
    result = invoke("search", write_spec(), "--data", "sklearn:iris", "--storage", storage_url)
    assert_bad_input(result, "'sklearn:iris'", "sklearn:digits")


def _given_set_case(case: str, tmp_path: Path, make: Callable[..., Path]) -> tuple[list, list]:
    """Flags for a bad --val-data/--test-data, and what the error must name."""
    if case == "text for images":
        (tmp_path / "val.csv").write_text("text,label\na,red\n")
        return ["--val-data", tmp_path / "val.csv"], ["data.val", "val.csv", "text data",
                                                      "image", "same format"]
    if case == "same as data":
        return ["--test-data", "DATA"], ["data.test is data.path", "separate test set"]
    if case == "val is test":
        other = make("other", per_class=3)
        return ["--val-data", other, "--test-data", other], ["data.val and data.test",
                                                             "two separate sets"]
    if case == "missing":
        return ["--val-data", tmp_path / "no-val"], ["no-val", "does not exist"]
    if case == "other classes":
        other = make("other", per_class=3, classes={"red": (200, 40, 40), "grey": (9, 9, 9)})
        return ["--test-data", other], ["data.test", "no examples of 'blue', 'green'",
                                        "classes not in data.path: 'grey'"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["text for images", "same as data", "val is test", "missing", "other classes"]
)
def test_bad_given_val_or_test_set(
    case: str, write_spec, image_folder, tmp_path: Path, storage_url: str
) -> None:
    data = image_folder("data", per_class=12)
    flags, needles = _given_set_case(case, tmp_path, image_folder)
    flags = [data if f == "DATA" else f for f in flags]
    result = invoke("search", write_spec(), "--data", data, *flags, "--storage", storage_url)
    assert_bad_input(result, *needles)
    assert not Path(storage_url.removeprefix("sqlite:///")).with_name(
        "autotransfer-artifacts").exists()


# ---------------------------------------------------------------- storage


@pytest.mark.parametrize(
    ("url", "needles"),
    [
        ("foo://x", ["foo://x", "unknown scheme 'foo'"]),
        ("not a url", ["'not a url'", "not a database URL"]),
        ("sqlite:///{tmp}/no/such/dir/s.db", ["no/such/dir", "does not exist"]),
    ],
)
@pytest.mark.parametrize("command", ["search", "trials"])
def test_unusable_storage(
    url: str, needles: list, command: str, write_spec, tmp_path: Path
) -> None:
    url = url.format(tmp=tmp_path)
    args = ["search", write_spec()] if command == "search" else ["trials"]
    assert_bad_input(invoke(*args, "--storage", url), *needles)


@pytest.mark.parametrize(
    ("url", "driver", "shown"),
    [("mysql://u:secret@h/db", "MySQLdb", "mysql://u:***@h/db"),
     ("mysql+pymysql://u@h/db", "pymysql", "mysql+pymysql://u@h/db")],
)
def test_storage_driver_not_installed(write_spec, url: str, driver: str, shown: str) -> None:
    if importlib.util.find_spec(driver) is not None:
        pytest.skip(f"{driver} is installed")
    result = invoke("search", write_spec(), "--storage", url)
    line = assert_bad_input(result, shown, f"driver '{driver}'", "pip install")
    assert "secret" not in line  # the password is never shown


def test_trials_of_a_missing_study(storage_url: str) -> None:
    import optuna

    optuna.create_study(study_name="real", storage=storage_url)
    assert_bad_input(invoke("trials", "--storage", storage_url, "--study-name", "ghost"),
                     "no study 'ghost'", "studies: real")


# ------------------------------------------------- a failing run keeps trials


def test_a_failing_second_run_leaves_stored_trials_intact(
    write_spec, image_folder, tmp_path: Path, storage_url: str
) -> None:
    spec = write_spec(**{"train.epochs": 1, "n_trials": 2})
    ok = invoke("search", spec, "--storage", storage_url, "--json")
    assert ok.exit_code == 0, ok.output
    stored = json.loads(invoke("trials", "--storage", storage_url, "--json").stdout)["trials"]
    assert len(stored) == 2

    empty = tmp_path / "empty"
    empty.mkdir()
    bad_runs = [
        # same study, the search space changed
        (["search", write_spec(**{"train.epochs": 1, "search.batch_size": 4})],
         ["study 'tiny'", "search.batch_size"]),
        # same study, unknown backbone / bad data / bad spec value
        (["search", spec, "--backbones", "timm:nope_model@none"], ["nope_model"]),
        (["search", spec, "--data", empty], ["no class sub-folders"]),
        (["search", write_spec(**{"train.epochs": 1, "search.alpha": 1.0})], ["search.alpha"]),
    ]
    for args, needles in bad_runs:
        assert_bad_input(invoke(*args, "--storage", storage_url), *needles)
        after = json.loads(invoke("trials", "--storage", storage_url, "--json").stdout)
        assert after["trials"] == stored, f"{args} changed the stored trials"

    # A run whose every trial fails is exit 1 (the work failed), and still one line.
    doomed = write_spec(**{"name": "doomed", "train.epochs": 1, "n_trials": 1,
                           "search.lr": 1e12, "search.alpha": 0.0, "search.freeze": 0.0})
    result = invoke("search", doomed, "--storage", storage_url)
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "no successful trials in study 'doomed'" in errors[0]
    assert "non_finite" in errors[0] and "Traceback" not in result.output
    after = json.loads(invoke("trials", "--storage", storage_url, "--study-name", "tiny",
                              "--json").stdout)
    assert after["trials"] == stored


# ------------------------------------------------------------------- --debug


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "from autotransfer.cli import main; main()"
    env = dict(os.environ, AUTOTRANSFER_DEBUG="")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_debug_shows_the_traceback_and_plain_run_does_not(write_spec, tmp_path: Path) -> None:
    spec = write_spec(**{"search.alpha": 1.0})
    plain = _cli("search", spec, cwd=tmp_path)
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith("error: invalid spec")
    assert "Traceback" not in plain.stderr and plain.stdout == ""

    debug = _cli("--debug", "search", spec, cwd=tmp_path)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "autotransfer.exceptions.SpecError" in debug.stderr
    assert "search.alpha" in debug.stderr


def test_debug_through_cli_runner(write_spec) -> None:
    from autotransfer.exceptions import SpecError

    result = invoke("--debug", "search", write_spec(**{"search.alpha": -0.1}))
    assert isinstance(result.exception, SpecError)
    assert result.exc_info is not None and result.exc_info[2] is not None


# ------------------------------------------- more of the battery (issue 7)


@pytest.fixture
def stored(storage_url: str) -> Callable[[], str]:
    """A study with one finished trial already in ``storage_url``; returns a
    function giving the database's digest, to show bad input changed nothing."""
    import hashlib

    import optuna

    study = optuna.create_study(storage=storage_url, study_name="tiny", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, params={"lr": 0.01},
                    distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)}))
    db = Path(storage_url.removeprefix("sqlite:///"))
    return lambda: hashlib.sha256(db.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        # empty or inverted ranges, log scale with low <= 0, empty choices
        ({"search.batch_size": []}, ["search.batch_size = []", "no batch size", "[16, 32]"]),
        ({"search.batch_size": [8, 0]}, ["search.batch_size = [8, 0]", "positive integers"]),
        ({"search.weight_decay": {"low": 0.0, "high": 0.1, "log": True}},
         ["search.weight_decay", '"low": 0.0', "log scale needs low > 0", "set log: false"]),
        ({"search.weight_decay": {"low": 0.1, "high": 0.01}},
         ["search.weight_decay", '"low": 0.1', "swap"]),
        ({"search.backbones": []}, ["search.backbones = []", "at least 1 item"]),
        ({"search.lr": {"low": 0.001}}, ["search.lr.high", "required"]),
        # wrong types and values
        ({"search.lr": "fast"}, ["search.lr", '"fast"', "a number or a mapping {low, high, log}"]),
        ({"train.epochs": 2.5}, ["train.epochs = 2.5", "integer"]),
        ({"train.optimizer": "adam"}, ["train.optimizer", '"adam"', "'adamw' or 'sgd'"]),
        ({"train.min_batch_size": 0}, ["train.min_batch_size = 0", "greater than or equal to 1"]),
        ({"timeout": 0}, ["timeout = 0", "greater than 0"]),
        ({"n_trials": 0}, ["n_trials = 0", "greater than or equal to 1"]),
        ({"data.split.train": 0.9}, ["data.split", "1.4 > 1", "lower the fractions"]),
        # unknown keys, deeper down
        ({"train.epoch": 3}, ["train.epoch", "unknown key", "did you mean 'epochs'"]),
        ({"search.learning_rate": 0.01}, ["search.learning_rate", "unknown key", "known keys"]),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_more_invalid_spec_fields(
    write_spec, storage_url: str, stored, overrides: dict, needles: list
) -> None:
    before = stored()
    spec = write_spec(**overrides)
    line = assert_bad_input(invoke("search", spec, "--storage", storage_url), *needles)
    assert spec.name in line
    assert stored() == before


def test_every_wrong_field_is_named_in_one_message(write_spec, storage_url: str) -> None:
    spec = write_spec(**{"train.epochs": "many", "search.alpha": 1.0, "trian": {"epochs": 2},
                         "data.image_size": "big", "search.batch_size": []})
    line = assert_bad_input(invoke("search", spec, "--storage", storage_url))
    for needle in ('train.epochs = "many"', "search.alpha = 1.0", "[0, 1)",
                   "trian: unknown key; did you mean 'train'", 'data.image_size = "big"',
                   "search.batch_size = []"):
        assert needle in line, f"{needle!r} not in {line!r}"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("- just\n- a list\n", ["must be a YAML mapping", "list"]),
        ("name: tiny\n\tsearch: {}\n", ["not valid YAML", "line 2"]),
        ("name: [unclosed\n", ["not valid YAML"]),
    ],
    ids=["list", "tab", "unclosed"],
)
def test_spec_that_is_not_a_yaml_mapping(write_spec, storage_url: str, text, needles) -> None:
    spec = write_spec(text=text)
    assert_bad_input(invoke("search", spec, "--storage", storage_url), spec.name, *needles)


def test_binary_spec_file(tmp_path: Path, storage_url: str) -> None:
    spec = tmp_path / "model.yaml"
    spec.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    assert_bad_input(invoke("search", spec, "--storage", storage_url),
                     "model.yaml", "not a YAML text file")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        # misspelt options and commands: click's suggestion, one line, exit 2
        (["search", "--n-trails", "3"], ["No such option: --n-trails", "--n-trials",
                                         "search -h"]),
        (["serch"], ["No such command 'serch'", "Did you mean 'search'"]),
        (["trials", "--storge", "x"], ["No such option: --storge", "--storage"]),
        # bad flag values
        (["search", "--timeout", "0"], ["'--timeout'", "greater than or equal to 0.001"]),
        (["search", "--timeout", "-5"], ["'--timeout'", "greater than or equal to 0.001"]),
        (["search", "--n-trials", "0"], ["'--n-trials'", "greater than or equal to 1"]),
        (["search", "--epochs", "two"], ["'--epochs'", "valid integer"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and isinstance(v[0], str)
    and v[0] in ("search", "serch", "trials") else None,
)
def test_usage_errors_are_one_line(args: list, needles: list, storage_url: str, stored) -> None:
    before = stored()
    assert_bad_input(invoke(*args, "--storage", storage_url) if args[0] != "serch"
                     else invoke(*args), *needles)
    assert stored() == before


def test_usage_error_with_debug_shows_clicks_own_report() -> None:
    result = invoke("--debug", "search", "--timeout", "0")
    assert result.exit_code == 2
    assert "Usage:" in result.output


def test_export_inside_the_artifacts_directory_is_refused(
    write_spec, storage_url: str, tmp_path: Path
) -> None:
    art = tmp_path / "art"
    result = invoke("search", write_spec(), "--storage", storage_url, "--artifacts", art,
                    "--export", art / "model")
    assert_bad_input(result, "--export", "inside --artifacts", "outside it")
    assert not art.exists()


@pytest.mark.parametrize("name", ["notes.txt", "README"])
def test_a_text_file_given_as_data(name: str, write_spec, tmp_path: Path, storage_url: str,
                                   stored) -> None:
    before = stored()
    text = tmp_path / name
    text.write_text("label,path\ncat,1.png\n")
    assert_bad_input(invoke("search", write_spec(), "--data", text, "--storage", storage_url),
                     name, "is a file")
    assert stored() == before


READERS = [["trials"], ["export", "out"], ["report", "out.html"]]


@pytest.mark.parametrize("command", READERS)
def test_empty_storage(command: list, storage_url: str, tmp_path: Path) -> None:
    from autotransfer.store.storage import open_storage

    open_storage(storage_url)  # a database with Optuna's tables and no study
    args = [tmp_path / a if a.startswith("out") else a for a in command]
    assert_bad_input(invoke(*args, "--storage", storage_url), "holds no study",
                     "autotransfer search")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.html").exists()


@pytest.mark.parametrize("command", [*READERS, ["worker"], ["dashboard"]])
def test_missing_sqlite_file_is_not_created(command: list, tmp_path: Path) -> None:
    """A typo in --storage must not leave an empty database behind."""
    db = tmp_path / "typo.db"
    args = [tmp_path / a if a.startswith("out") else a for a in command]
    assert_bad_input(invoke(*args, "--storage", f"sqlite:///{db}"),
                     f"no study storage at '{db}'", "autotransfer search")
    assert not db.exists()
