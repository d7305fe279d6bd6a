"""The ``autotransfer`` command line (Typer), one module per command.

Errors from the package (:mod:`autotransfer.exceptions`) are translated here,
once: one line on stderr and the exit code (2 bad input, 1 the work failed);
``--debug`` (or ``AUTOTRANSFER_DEBUG=1``) shows the traceback instead.

Each command imports the layers it runs inside its own function, for start-up
time only: ``--help`` and the light commands never load torch.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from autotransfer.exceptions import AutotransferError

_state = {"debug": False}
# Typer 0.29 raises usage errors from its vendored click; older ones from click.
_USAGE_ERRORS = tuple(
    {click.UsageError, getattr(typer.core, "_click", click).exceptions.UsageError}
)


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("AUTOTRANSFER_DEBUG", "") not in ("", "0")


class _Group(TyperGroup):
    """Translates domain errors into one message line and an exit code.

    Exits with ``typer.Exit``: recent typer (0.29) runs on its own vendored click, whose
    main loop does not catch ``click.exceptions.Exit`` (that would print a traceback).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AutotransferError as exc:
            if debug_enabled():
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except _USAGE_ERRORS as exc:
            # A misspelt option or a bad flag value: one line too, not a box.
            if debug_enabled():
                raise
            where = exc.ctx.command_path if exc.ctx is not None else "autotransfer"
            message = " ".join(exc.format_message().split())
            typer.echo(f"error: {message}; see '{where} -h'", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (autotransfer.tuning.interrupts)
            if debug_enabled():
                raise
            name = getattr(exc, "signame", "SIGINT")
            typer.echo(
                f"interrupted ({name}): finished trials are stored and an interrupted trial "
                "is queued to resume from its last epoch; run the same command to go on",
                err=True,
            )
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None


app = typer.Typer(
    cls=_Group,
    name="autotransfer",
    help="AutoML search over how to fine-tune a pretrained backbone: which backbone, "
    "how deep to freeze it, the learning rate and the retention weight α in "
    "L = α·L_pre + (1−α)·L_fine. Results go to stdout, progress to stderr.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    _state["debug"] = debug


def _register() -> None:
    from autotransfer.cli import dashboard, export, predict, report, search, trials, worker

    app.command("search")(search.search)
    app.command("worker")(worker.worker)
    app.command("trials")(trials.trials)
    app.command("export")(export.export)
    app.command("predict")(predict.predict)
    app.command("report")(report.report)
    app.command("dashboard")(dashboard.dashboard)

    from autotransfer.cli import backbones, plugins

    app.command("backbones")(backbones.backbones)
    app.command("plugins")(plugins.plugins)


_register()


def main() -> None:
    app()
