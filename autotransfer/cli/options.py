"""Options shared by several commands."""

from __future__ import annotations

from typing import Annotated

import typer

from autotransfer.store.storage import DEFAULT_STORAGE

Storage = Annotated[
    str,
    typer.Option(
        "--storage",
        envvar="AUTOTRANSFER_STORAGE",
        help="SQLAlchemy URL of the Optuna storage, e.g. sqlite:///autotransfer.db or "
        "postgresql+psycopg://user:pass@host/db.",
        show_envvar=True,
    ),
]
DEFAULT = DEFAULT_STORAGE

StudyName = Annotated[
    str | None,
    typer.Option(
        "--study-name",
        help="Study to use; default: the spec's name (search) or the only study in the storage.",
    ),
]
