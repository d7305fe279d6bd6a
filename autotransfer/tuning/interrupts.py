"""SIGTERM (preemption, ``kill``, Slurm, Kubernetes) and Ctrl-C (SIGINT).

While :func:`handle_signals` is active, the first SIGTERM or SIGINT raises
:class:`Interrupted` in the main thread, wherever it is. The objective catches
it, marks the running trial (user attribute ``interrupted``: the signal's
name, ``fail_reason`` ``interrupted``), queues it again from its last epoch
state (see :mod:`autotransfer.store.recovery`) and lets it fail; the command then
exits with 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C) and one
line saying how to resume. A second signal while that happens ends the process
at once (the heartbeat recovery then takes care of the trial).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from autotransfer.store.optuna_internals import OPTIMIZE_LOGGER

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """The process got SIGTERM or SIGINT; ``exit_code`` is 128 + its number."""

    def __init__(self, signum: int) -> None:
        self.signame = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {self.signame}")


def signal_name(exc: BaseException) -> str:
    """The signal behind a ``KeyboardInterrupt`` (a plain one is Ctrl-C)."""
    return getattr(exc, "signame", "SIGINT")


class _QuietInterruptedTrial(logging.Filter):
    """Drops Optuna's "Trial N failed ... KeyboardInterrupt" warning (with its
    traceback) and the "Trial N failed with value None" line after it: the
    progress line and the exit message already say what happened."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        number = re.match(r"Trial (\d+) failed", record.getMessage())
        if number is None:
            return True
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            self.numbers.add(number.group(1))
            return False
        return number.group(1) not in self.numbers


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` in the block (main thread
    only; elsewhere the block runs with the handlers as they are)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if received:
            print(
                f"{signal.Signals(signum).name} again: exiting now; the running trial is "
                "retried when its heartbeat goes stale",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)
        received.append(signum)
        raise Interrupted(signum)

    quiet, logger = _QuietInterruptedTrial(), logging.getLogger(OPTIMIZE_LOGGER)
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
        for s, old in previous.items():
            signal.signal(s, old)
