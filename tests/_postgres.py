"""A throwaway PostgreSQL server for the tests: its own cluster in a temporary
directory, on 127.0.0.1 and a free port, trust authentication, no fsync.

Uses the server binaries of Debian's ``postgresql`` package
(``/usr/lib/postgresql/VERSION/bin``, or ``pg_ctl`` on ``PATH``). ``initdb``
refuses to run as root, so as root the cluster belongs to the ``postgres`` user
and every server command runs through ``runuser -u postgres --``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "postgres"


def find_bin_dir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``, newest version first; None if absent."""
    found = shutil.which("pg_ctl")
    candidates = [Path(found).parent] if found else []
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    candidates += [Path(p) for p in reversed(versions)]
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One private cluster; :meth:`start` it, :meth:`create_database`, :meth:`stop`."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.as_root = os.geteuid() == 0
        # Not under pytest's tmp dir: as root that is private to root, and the
        # server runs as the postgres user.
        self.root = Path(tempfile.mkdtemp(prefix="autotransfer-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._databases = 0
        if self.as_root:
            shutil.chown(self.root, USER, USER)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", USER, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stdout}{result.stderr}\n{log}")
        return result

    def start(self) -> None:
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust",
                      "-E", "UTF8", "--no-sync", "--no-instructions")
            with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.write(
                    f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.root}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "max_connections = 200\n"
                )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                  check=False)

    def restart(self) -> None:
        """Stop (disconnecting every client) and start again; returns once it is up."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w",
                  "-t", "60", "restart")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={USER} dbname={database}", autocommit=True
        ) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        self._databases += 1
        name = f"test_{self._databases}"
        self.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
