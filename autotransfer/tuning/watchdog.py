"""The progress watchdog: ends a trial that hangs.

Optuna's heartbeat thread keeps beating while the main thread is stuck (a
deadlocked data source, a driver call that never returns), so heartbeats alone
never end a hung trial. The trainer calls :meth:`Watchdog.beat` after every
batch; when no batch has finished for ``train.stall_timeout`` seconds, the
watchdog thread sends a signal to the main thread, whose handler raises
:class:`TrialStalled` there: the trial fails with reason ``timeout`` and the
study goes on with the next trial.

If the main thread does not respond within ``stall_timeout`` seconds (at least
5, at most 30: :data:`RESPOND_S`; it is stuck in C code, where Python cannot
raise), the watchdog marks the trial FAIL (``timeout``) in the storage itself,
says so on stderr, and ends the process with exit code 1 rather than hang
forever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

WATCHDOG_SIGNAL = signal.SIGUSR2
RESPOND_S = 30.0
"""Seconds the main thread has to end a stalled trial before the process exits."""
MIN_RESPOND_S = 5.0
"""... at least (with a short ``train.stall_timeout``)."""
UNRESPONSIVE_EXIT = 1


class TrialStalled(BaseException):  # noqa: N818 - raised like KeyboardInterrupt
    """Raised in the main thread when the running trial made no progress.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that a plugin's
    ``except Exception`` does not swallow it.
    """


class Watchdog:
    """Ends the running trial when no batch finishes for ``timeout`` seconds.

    Args:
        timeout: seconds without progress (``train.stall_timeout``).
        respond_s: seconds the main thread has to react before
            ``on_unresponsive`` runs (default: ``timeout``, between
            :data:`MIN_RESPOND_S` and :data:`RESPOND_S`).
    """

    def __init__(self, timeout: float, respond_s: float | None = None) -> None:
        self.timeout = timeout
        self.respond_s = (
            max(MIN_RESPOND_S, min(RESPOND_S, timeout)) if respond_s is None else respond_s
        )
        self.fired = False
        self._last = time.monotonic()
        self._done = threading.Event()

    def beat(self) -> None:
        """Record progress (a batch finished)."""
        self._last = time.monotonic()

    @contextlib.contextmanager
    def watch(self, on_unresponsive: Callable[[float], None]) -> Iterator[Callable[[], None]]:
        """Watch the block; yields :meth:`beat`.

        ``on_unresponsive(idle_seconds)`` runs in the watchdog thread when the main
        thread ignored the signal; it should record the failure, then the process
        exits. Outside the main thread (signals cannot reach it) nothing is watched.
        """
        if threading.current_thread() is not threading.main_thread():
            yield lambda: None
            return
        self.fired = False
        self._done = threading.Event()
        self.beat()
        previous = signal.signal(WATCHDOG_SIGNAL, self._on_signal)
        thread = threading.Thread(
            target=self._run,
            args=(threading.main_thread().ident, on_unresponsive, self._done),
            name="autotransfer-watchdog",
            daemon=True,
        )
        thread.start()
        try:
            yield self.beat
        finally:
            self._done.set()
            thread.join()
            signal.signal(WATCHDOG_SIGNAL, previous)

    def _run(
        self, main: int | None, on_unresponsive: Callable[[float], None], done: threading.Event
    ) -> None:
        while not done.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle < self.timeout:
                continue
            self.fired = True
            if main is not None:
                signal.pthread_kill(main, WATCHDOG_SIGNAL)
            if done.wait(self.respond_s):
                return
            try:
                on_unresponsive(time.monotonic() - self._last)
            finally:
                sys.stderr.flush()
                os._exit(UNRESPONSIVE_EXIT)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.fired and not self._done.is_set():
            raise TrialStalled(f"no batch finished for {self.timeout:g}s (train.stall_timeout)")
