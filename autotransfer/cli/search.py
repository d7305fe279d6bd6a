"""``autotransfer search``: run or resume a study."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from autotransfer.cli.options import DEFAULT, Storage, StudyName


def search(
    spec: Annotated[
        Path | None,
        typer.Argument(
            help="YAML study spec. Default: the embedded digits study (studies/digits.yaml).",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Image folder (one sub-folder per class), sklearn:digits, or a text data "
            "set: a .csv or .jsonl file with a text and a label column.",
        ),
    ] = None,
    val_data: Annotated[
        str | None,
        typer.Option(
            "--val-data",
            help="A validation set you already have, in the same format and with the same "
            "classes as --data; then none is split off --data.",
        ),
    ] = None,
    test_data: Annotated[
        str | None,
        typer.Option(
            "--test-data",
            help="A test set you already have, in the same format and with the same classes "
            "as --data; then none is split off --data.",
        ),
    ] = None,
    text_column: Annotated[
        str | None,
        typer.Option(
            "--text-column", help="Text data: the column holding the texts (default: text)."
        ),
    ] = None,
    label_column: Annotated[
        str | None,
        typer.Option(
            "--label-column", help="Text data: the column holding the labels (default: label)."
        ),
    ] = None,
    backbones: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated candidates family:model[@weights], e.g. "
            "timm:resnet18@pretrained,timm:tf_efficientnet_lite0@packaged.",
        ),
    ] = None,
    n_trials: Annotated[
        int | None,
        typer.Option(
            "--n-trials", min=1,
            help="Trials to add to the study, run by this search and any `autotransfer "
            "worker` that joins it (an exact total).",
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, help="Stop starting trials after this many seconds.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs per trial.")] = None,
    storage: Storage = DEFAULT,
    study_name: StudyName = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for sampling, splits and training.")
    ] = None,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            help="Directory for trial checkpoints; default: autotransfer-artifacts/ beside "
            "the SQLite file (or in the working directory for other databases).",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of tables.")
    ] = False,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="When the search ends, export the best trial to this new directory "
            "(see `autotransfer export`).",
        ),
    ] = None,
) -> None:
    """Search how to fine-tune: backbone, freeze depth, learning rate and α.

    Runs the study in SPEC (or the embedded default) and prints the trials and the
    best one. Running it again resumes the study: new trials are added.
    """
    from autotransfer.cli.render import print_search_outcome
    from autotransfer.spec.model import load_spec
    from autotransfer.tuning.progress import Progress
    from autotransfer.tuning.search import run_search

    overrides = {
        "data.path": data,
        "data.val": val_data,
        "data.test": test_data,
        "data.text_column": text_column,
        "data.label_column": label_column,
        "search.backbones": [b.strip() for b in backbones.split(",") if b.strip()]
        if backbones is not None
        else None,
        "n_trials": n_trials,
        "timeout": timeout,
        "train.epochs": epochs,
        "name": study_name,
        "seed": seed,
    }
    for key, value in (("data.path", data), ("data.val", val_data), ("data.test", test_data)):
        if value is not None and Path(value).exists():
            overrides[key] = str(Path(value).resolve())
    resolved = load_spec(spec, overrides)
    if export is not None:
        from autotransfer.export.writer import check_target

        check_target(export)  # refuse a bad export path before the search, not after
        target = export.resolve()
        if artifacts is not None and artifacts.resolve() in (target, *target.parents):
            from autotransfer.exceptions import UserInputError

            raise UserInputError(
                f"--export '{export}' is inside --artifacts '{artifacts}' (the trial "
                "checkpoints); give an export directory outside it"
            )
    outcome = run_search(
        resolved, storage, artifacts, Progress(epochs=resolved.train.epochs)
    )
    print_search_outcome(outcome, json_out)
    if export is not None:
        from autotransfer.export.writer import export_trial

        done = export_trial(
            outcome.study, export, outcome.best.number, message=lambda m: typer.echo(m, err=True)
        )
        typer.echo(f"exported trial {done.trial} to {done.path}", err=True)
