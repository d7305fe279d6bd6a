"""``autotransfer dashboard``: serve optuna-dashboard on the study storage.

optuna-dashboard has no authentication and its HTTP API can rename and delete
studies, so it binds to the loopback interface unless ``--allow-remote`` is given.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated, Any

import typer

from autotransfer.cli.options import DEFAULT, Storage
from autotransfer.exceptions import UserInputError

REMOTE_WARNING = (
    "warning: serving the dashboard on {host}: anyone who can reach this address can read "
    "every study in the storage and delete it (optuna-dashboard has no authentication); "
    "prefer the default 127.0.0.1 and an SSH tunnel (ssh -L {port}:127.0.0.1:{port} HOST)"
)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: may resolve to anything
        return False


def dashboard(
    storage: Storage = DEFAULT,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on. Anything but a loopback address "
                     "needs --allow-remote."),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free port).")
    ] = 8080,
    allow_remote: Annotated[
        bool,
        typer.Option("--allow-remote", help="Allow a non-loopback --host. The dashboard is "
                     "unauthenticated and can delete studies: only on a trusted network."),
    ] = False,
) -> None:
    """Serve optuna-dashboard (live plots and trial tables) on the study storage.

    Safe to run while a search writes to the same storage; stop it with Ctrl+C.
    """
    local = is_loopback(host)
    if not local and not allow_remote:
        raise UserInputError(
            f"--host {host} would expose the unauthenticated dashboard (it can delete studies) "
            "beyond this machine; pass --allow-remote to do it anyway, or use an SSH tunnel"
        )
    try:
        from optuna_dashboard import wsgi
    except ImportError:
        raise UserInputError(
            "the dashboard needs optuna-dashboard, which is not installed; "
            "pip install optuna-dashboard"
        ) from None
    from autotransfer.store.storage import open_storage, redact, require_existing

    require_existing(storage)
    rdb = open_storage(storage)  # SQLite with a long busy timeout: never trips a running search
    if not local:
        typer.echo(REMOTE_WARNING.format(host=host, port=port or "PORT"), err=True)
    server = _make_server(host, port, wsgi(rdb))
    bound = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    n = len(rdb.get_all_studies())
    typer.echo(
        f"dashboard for {redact(storage)} ({n} {'study' if n == 1 else 'studies'}) at "
        f"http://{shown}:{bound}/dashboard  (Ctrl+C to stop)",
        err=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("dashboard stopped", err=True)
    finally:
        server.server_close()


def _make_server(host: str, port: int, app: Any) -> Any:
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per poll of the web page would bury the search's progress

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        return make_server(host.strip("[]"), port, app, server_class=Server,
                           handler_class=QuietHandler)
    except OSError as exc:
        raise UserInputError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "choose another --port or --host"
        ) from None
