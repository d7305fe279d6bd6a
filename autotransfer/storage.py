"""Where studies live: Optuna's RDB storage (SQLAlchemy) plus an artifact store.

The default is the SQLite file ``autotransfer.db`` in the working directory, with
checkpoints in ``autotransfer-artifacts/`` beside it. Any SQLAlchemy URL works
(PostgreSQL when many workers or machines share one study); then ``--artifacts``
must name a directory every worker can reach.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore

from autotransfer.exceptions import StorageError

DEFAULT_STORAGE = "sqlite:///autotransfer.db"
ARTIFACTS_DIRNAME = "autotransfer-artifacts"
SQLITE_TIMEOUT_S = 300  # Optuna's 5 s default makes concurrent SQLite workers crash.


_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:password|passwd|pwd|pass|secret|token|api_?key|sslpassword)=)[^&#]*"
)


def redact(url: str) -> str:
    """The URL with its password (and secret-looking query values) hidden, for
    messages and logs."""
    try:
        from sqlalchemy.engine import make_url

        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL: show it, but never what looks like a password
        shown = re.sub(r"([^:/@\s]*):[^@\s]*@", r"\1:***@", url)
    return _SECRET_QUERY.sub(r"\1***", shown)


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Open (creating if needed) the Optuna storage at ``url``.

    Raises:
        StorageError: the URL is malformed, names an unknown database or a
            driver that is not installed, or the database cannot be reached.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(
            f"storage URL '{redact(url)}' is not a database URL; use e.g. "
            f"{DEFAULT_STORAGE} or postgresql+psycopg://user@host/db"
        ) from None
    engine_kwargs: dict[str, object] = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().resolve().parent
            if not folder.is_dir():
                raise StorageError(
                    f"storage URL '{redact(url)}': folder '{folder}' does not exist; create it first"
                )
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        # Optuna logs its own storage set-up at INFO; keep stderr for our progress.
        optuna.logging.set_verbosity(logging.WARNING)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except NoSuchModuleError:
        raise StorageError(
            f"storage URL '{redact(url)}' has an unknown scheme '{parsed.drivername}'; "
            "use sqlite:///FILE.db or postgresql+psycopg://..."
        ) from None
    except ImportError as exc:
        # Optuna re-raises the driver's ModuleNotFoundError as a bare ImportError.
        missing = exc if isinstance(exc, ModuleNotFoundError) else exc.__cause__
        name = getattr(missing, "name", None) or parsed.drivername
        raise StorageError(
            f"storage URL '{redact(url)}' needs the database driver '{name}', which is not "
            f"installed; pip install it (for PostgreSQL: pip install 'autotransfer[postgres]')"
        ) from None
    except ArgumentError as exc:  # e.g. a SQLite URL with a user or password
        reason = str(exc).splitlines()[0].split(":")[0]
        raise StorageError(
            f"storage URL '{redact(url)}' cannot be used ({reason}); use e.g. "
            f"{DEFAULT_STORAGE} or postgresql+psycopg://user@host/db"
        ) from None
    except (OperationalError, optuna.exceptions.StorageInternalError) as exc:
        reason = str(getattr(exc, "orig", exc)).splitlines()[0]
        raise StorageError(f"cannot open storage '{redact(url)}': {reason}") from None


def default_artifacts_dir(url: str) -> Path:
    """Beside the SQLite file; in the working directory for other databases."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).expanduser().resolve().parent / ARTIFACTS_DIRNAME
    return Path.cwd() / ARTIFACTS_DIRNAME


def artifact_store(path: Path) -> FileSystemArtifactStore:
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))
