"""Where studies live: Optuna's RDB storage (SQLAlchemy) plus an artifact store.

The default is the SQLite file ``autotransfer.db`` in the working directory, with
checkpoints in ``autotransfer-artifacts/`` beside it. Any SQLAlchemy URL works
(PostgreSQL when many workers or machines share one study); then ``--artifacts``
must name a directory every worker can reach.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial

from autotransfer.exceptions import StorageError
from autotransfer.store.database import retry_connects, shared_lock

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


@dataclass(frozen=True)
class Heartbeat:
    """A writer's heartbeat: each running trial records one every ``interval``
    seconds; a trial whose last one is older than ``grace_period`` is failed and
    passed to ``stale_trial_callback`` (made by
    :func:`autotransfer.store.recovery.heartbeat`)."""

    interval: int
    grace_period: int
    stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None]


def open_storage(url: str, heartbeat: Heartbeat | None = None) -> optuna.storages.RDBStorage:
    """Open (creating if needed) the Optuna storage at ``url``.

    Only the study that runs trials has a ``heartbeat``
    (:func:`autotransfer.store.opening.open_for_trials`); readers pass nothing.

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
                    f"storage URL '{redact(url)}': folder '{folder}' does not exist; "
                    "create it first"
                )
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        # Optuna logs its own storage set-up at INFO; keep stderr for our progress.
        optuna.logging.set_verbosity(logging.WARNING)
        # One process at a time creates Optuna's tables in a new database. A server
        # that refuses the connection now is a bad URL or a server down: fail at once.
        with shared_lock(url, "schema", patience=0)(), warnings.catch_warnings():
            # heartbeats are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, **_heartbeat_kwargs(heartbeat)
            )
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
    if parsed.get_backend_name() != "sqlite":
        # Only now: a database that cannot be reached at start fails at once.
        retry_connects(storage.engine)
    return storage


def require_existing(url: str) -> None:
    """Readers call this first: opening a SQLite file that does not exist would
    create an empty database there (a stray file for a typo). Other URLs and
    malformed ones pass; :func:`open_storage` explains those.

    Raises:
        StorageError: ``url`` names a SQLite file that does not exist.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    if parsed.username or parsed.password or parsed.host:
        return  # not a usable SQLite URL
    if not Path(parsed.database).expanduser().is_file():
        raise StorageError(
            f"no study storage at '{parsed.database}': the file does not exist; run "
            "`autotransfer search` first, or give the --storage of an existing one"
        )


def _heartbeat_kwargs(heartbeat: Heartbeat | None) -> dict[str, object]:
    if heartbeat is None:
        return {}
    return {
        "heartbeat_interval": heartbeat.interval,
        "grace_period": heartbeat.grace_period,
        "heartbeat_stale_trial_callback": heartbeat.stale_trial_callback,
    }


def default_artifacts_dir(url: str) -> Path:
    """Beside the SQLite file; in the working directory for other databases."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).expanduser().resolve().parent / ARTIFACTS_DIRNAME
    return Path.cwd() / ARTIFACTS_DIRNAME


class ArtifactStore(Protocol):
    """What autotransfer uses of an Optuna artifact store (Optuna's own protocol
    lives in a private module)."""

    def open_reader(self, artifact_id: str) -> BinaryIO: ...

    def write(self, artifact_id: str, content_body: BinaryIO) -> None: ...

    def remove(self, artifact_id: str) -> None: ...


class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
    """Optuna's file-system artifact store, with atomic writes.

    Optuna's own ``write`` opens the final path and copies into it, so a crash or
    a full disk leaves a truncated file under the artifact id. Here the bytes go
    to a temporary file in the same directory, are flushed to disk, and only then
    renamed onto the artifact id (``os.replace`` is atomic on one file system): an
    artifact is either whole or absent.
    """

    def __init__(self, base_path: str | Path) -> None:
        super().__init__(base_path)
        self.root = Path(base_path)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        # An id is one file name in the root: never a path out of it.
        if not artifact_id or Path(artifact_id).name != artifact_id or artifact_id in ("..", "."):
            raise ValueError(f"Invalid artifact_id: {artifact_id}")
        target = self.root / artifact_id
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(content_body, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def artifact_store(path: Path) -> FileSystemArtifactStore:
    path.mkdir(parents=True, exist_ok=True)
    return AtomicFileSystemArtifactStore(str(path))
