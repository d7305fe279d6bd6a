"""``autotransfer report``: a study as one static HTML page that works offline."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from autotransfer.cli.options import DEFAULT, Storage, StudyName
from autotransfer.exceptions import UserInputError


def report(
    out: Annotated[
        Path,
        typer.Argument(help="HTML file to write (replaced if it exists).", show_default=False,
                       metavar="OUT.html"),
    ],
    storage: Storage = DEFAULT,
    study_name: StudyName = None,
) -> None:
    """Write an HTML report of a study (history, importances, pruning, trials).

    The page has the study summary, optimisation history, parameter importances,
    accuracy per backbone, learning curves and pruning, parallel coordinates and
    the trials table.

    plotly.js is embedded, so the page opens offline. Reading a study that is
    still running is safe; run it again to refresh the page.
    """
    from autotransfer.report.page import render_report
    from autotransfer.store.studies import load_study

    out = out.expanduser()
    if out.is_dir():
        raise UserInputError(
            f"report path '{out}' is a directory; give a file name, e.g. report.html"
        )
    folder = out.resolve().parent
    if not folder.is_dir():
        raise UserInputError(
            f"report path '{out}': folder '{folder}' does not exist; create it first"
        )
    study = load_study(storage, study_name)
    page = render_report(study)
    write_atomically(out, page)
    n = len(study.get_trials(deepcopy=False))
    typer.echo(f"wrote report of study '{study.study_name}' ({n} trials) to {out}")


def write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a browser reloading the page never
    sees half of it."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    except OSError as exc:
        raise UserInputError(f"cannot write report '{path}': {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is a plain file
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserInputError(f"cannot write report '{path}': {exc.strerror}") from None
