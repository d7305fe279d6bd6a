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
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from autotransfer.tuning.trial_log import dropping_failed_trial_warnings

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

    # Optuna's "Trial N failed ... KeyboardInterrupt" warning (with its traceback)
    # is dropped: the progress line and the exit message already say what happened.
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        with dropping_failed_trial_warnings(KeyboardInterrupt):
            yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
