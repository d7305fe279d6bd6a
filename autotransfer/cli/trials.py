"""``autotransfer trials``: list a study's trials."""

from __future__ import annotations

from typing import Annotated

import typer

from autotransfer.cli.options import DEFAULT, Storage, StudyName


def trials(
    storage: Storage = DEFAULT,
    study_name: StudyName = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON records.")] = False,
) -> None:
    """List the trials of a study: state, parameters, value, where pruning stopped."""
    from autotransfer.cli.render import print_trials
    from autotransfer.store.studies import load_study

    print_trials(load_study(storage, study_name), json_out)
