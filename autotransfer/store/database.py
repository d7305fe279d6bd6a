"""Database helpers for many processes on one storage: a lock they all share,
and connections that wait out a server restart.

:func:`shared_lock` is a PostgreSQL advisory lock, or a file lock beside a
SQLite file; the trial budget (:mod:`autotransfer.store.budget`) and the creation of
Optuna's tables (:func:`autotransfer.store.storage.open_storage`: processes opening a
new database at once would race to create them) use it.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

# How long a new connection to a database server (not SQLite) is retried once the
# storage is open: a server restart or a short outage mid-study delays the next
# write instead of failing the trial.
RECONNECT_PATIENCE_S = 120.0
# First key of our PostgreSQL advisory locks (the second names what is locked),
# so they do not collide with another application's locks on the same database.
_PG_LOCK_SPACE = 0x61_74_72  # "atr"

Lock = Callable[[], AbstractContextManager[None]]
_log = logging.getLogger(__name__)
_memory_locks: dict[str, threading.Lock] = {}


def lockable(storage_url: str) -> bool:
    """Whether :func:`shared_lock` can lock this database across processes."""
    from sqlalchemy.engine import make_url

    return make_url(storage_url).get_backend_name() in ("sqlite", "postgresql")


def shared_lock(storage_url: str, key: str, patience: float = RECONNECT_PATIENCE_S) -> Lock:
    """A lock named ``key`` that every process using ``storage_url`` shares.

    ``patience``: seconds a refused PostgreSQL connection is retried (0 when the
    database must answer at once, e.g. while the storage is first opened).

    PostgreSQL: a session advisory lock on its own short-lived connection (the
    server drops it if the process dies). SQLite: a file lock beside the database
    file (``FILE.db.lock``, one for all keys: SQLite has one writer at a time
    anyway); an in-memory database lives in one process, so a thread lock. Other
    databases: no lock (see :func:`lockable`).
    """
    from sqlalchemy.engine import make_url

    url = make_url(storage_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.username or url.password or url.host:
            return lambda: nullcontext()  # not a valid SQLite URL: opening it fails anyway
        if url.database in (None, "", ":memory:"):
            return _held(_memory_locks.setdefault(key, threading.Lock()))
        from filelock import FileLock

        path = Path(url.database).expanduser().resolve()
        return _held_if_writable(FileLock(str(path) + ".lock"))
    if backend == "postgresql":
        return _postgres_lock(storage_url, key, patience)
    return lambda: nullcontext()


def _held(lock: AbstractContextManager[object]) -> Lock:
    @contextmanager
    def held() -> Iterator[None]:
        with lock:
            yield

    return held


def _held_if_writable(lock: AbstractContextManager[object]) -> Lock:
    """A file lock, or none where its file cannot be made (a read-only folder:
    then no process can write the database there either)."""

    @contextmanager
    def held() -> Iterator[None]:
        try:
            lock.__enter__()
        except PermissionError:
            yield
            return
        try:
            yield
        finally:
            lock.__exit__(None, None, None)

    return held


def _postgres_lock(storage_url: str, key: str, patience: float) -> Lock:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    # A new connection per hold: nothing idle for a server timeout or restart to break.
    engine = retry_connects(sqlalchemy.create_engine(storage_url, poolclass=NullPool), patience)
    params = {"space": _PG_LOCK_SPACE, "key": zlib.crc32(key.encode()) - 2**31}

    @contextmanager
    def held() -> Iterator[None]:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:space, :key)"), params)
            conn.commit()
            try:
                yield
            finally:
                try:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:space, :key)"), params)
                    conn.commit()
                except sqlalchemy.exc.DBAPIError:
                    pass  # the connection is gone, and the server released the lock with it

    return held


def retry_connects(engine: Engine, patience: float = RECONNECT_PATIENCE_S) -> Engine:
    """Make ``engine`` retry a refused connection for up to ``patience`` seconds.

    With ``pool_pre_ping`` a pooled connection that a server restart or an idle
    timeout closed is replaced at its next use; this covers the moment the server
    is still down, so the write waits for it rather than failing the trial.
    """
    from sqlalchemy import event

    where = engine.url.render_as_string(hide_password=True)

    @event.listens_for(engine, "do_connect")
    def connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> Any:
        deadline = time.monotonic() + patience
        delay = 0.2
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                reason = (str(exc).strip() or type(exc).__name__).splitlines()[-1]
                _log.warning("storage %s unreachable (%s); retrying for up to %.0f s",
                             where, reason, patience)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    return engine
