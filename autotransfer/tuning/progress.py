"""Live progress on stderr: one line per trial start, per epoch and per trial end.

A failed trial is one line (number, reason, message); Optuna's own "Trial N
failed" warning, with the traceback, is shown only with ``debug``
(:func:`quiet_failed_trials`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape

from autotransfer.engine.trainer import EpochResult, TrialParams
from autotransfer.exceptions import AutotransferError
from autotransfer.store.summary import device_label
from autotransfer.tuning.trial_log import dropping_failed_trial_warnings


class Progress:
    """Prints what the search is doing, as it happens, to stderr.

    ``debug``: also let Optuna print its own warning and traceback for a failed
    trial (the command line's ``--debug``).
    """

    def __init__(
        self, console: Console | None = None, epochs: int = 0, debug: bool = False
    ) -> None:
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.epochs = epochs
        self.debug = debug

    def message(self, text: str) -> None:
        self.console.print(text)

    def line(self, text: str) -> None:
        """``text`` as it is (a worker's output: no markup)."""
        self.console.print(text, markup=False, highlight=False)

    def trial_started(
        self, number: int, params: TrialParams, k: int, n_blocks: int,
        device: dict[str, Any] | None = None, probe_epochs: int = 0,
    ) -> None:
        where = f"  on {device_label(device)}" if device else ""
        trunk = (
            f" (trunk ×{params.trunk_lr_scale:.2g})"
            if k < n_blocks and params.trunk_lr_scale != 1.0 else ""
        )
        probe = (
            f" after {probe_epochs} probe epoch{'s' if probe_epochs > 1 else ''}"
            if probe_epochs and k < n_blocks else ""
        )
        self.console.print(
            f"[bold]trial {number}[/] {params.backbone}  freeze {k}/{n_blocks}{probe}  "
            f"lr {params.lr:.2e}{trunk}  wd {params.weight_decay:.1e}  batch {params.batch_size}  "
            f"α {params.alpha:.2f}{where}"
        )

    def epoch(self, number: int, result: EpochResult) -> None:
        star = " *" if result.is_best else ""
        self.console.print(
            f"  trial {number} epoch {result.epoch}/{self.epochs}  loss {result.train_loss:.3f}  "
            f"val_acc {result.val.accuracy:.3f}  val_f1 {result.val.macro_f1:.3f}  "
            f"{result.seconds:.1f}s{star}"
        )

    def trial_finished(self, number: int, state: str, detail: str) -> None:
        color = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(state, "white")
        detail = escape(" ".join(detail.split()))  # one line, whatever a plugin's message holds
        self.console.print(f"  trial {number} [{color}]{state.lower()}[/]: {detail}")


@contextlib.contextmanager
def quiet_failed_trials(progress: Progress) -> Iterator[None]:
    """In the block, a failed trial prints only its progress line, unless
    ``progress.debug``."""
    if progress.debug:
        yield
        return
    # Our errors: the trial's own progress line, or the command's error line,
    # already says what happened.
    with dropping_failed_trial_warnings(AutotransferError):
        yield
