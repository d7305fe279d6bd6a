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


Gpus = Annotated[
    str | None,
    typer.Option(
        "--gpus",
        help="GPUs to run trials on, one worker process each: all, none (the CPU), a "
        "count (2) or indices (0,2; one GPU: 3,). Default: all when CUDA is available "
        "and train.device is auto.",
    ),
]
TrialsPerGpu = Annotated[
    int,
    typer.Option(
        "--trials-per-gpu", min=1,
        help="Worker processes per GPU (trials at once on each); more than 1 pays for "
        "small models that leave a GPU idle.",
    ),
]
