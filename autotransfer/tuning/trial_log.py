"""Optuna's own "Trial N failed" log lines, dropped where ours already say it."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

from autotransfer.store.optuna_internals import OPTIMIZE_LOGGER


class _DropFailedTrialWarnings(logging.Filter):
    """Drops Optuna's "Trial N failed with parameters ... because of ..." warning
    (with its traceback) and the "Trial N failed with value None." line after it
    when the trial failed with one of ``errors``."""

    def __init__(self, errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.errors = errors
        self.numbers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        number = re.match(r"Trial (\d+) failed", record.getMessage())
        if number is None:
            return True
        if record.exc_info and isinstance(record.exc_info[1], self.errors):
            self.numbers.add(number.group(1))
            return False
        return number.group(1) not in self.numbers


@contextlib.contextmanager
def dropping_failed_trial_warnings(*errors: type[BaseException]) -> Iterator[None]:
    """In the block, Optuna logs no "Trial N failed" lines for trials that
    failed with one of ``errors``."""
    quiet, logger = _DropFailedTrialWarnings(errors), logging.getLogger(OPTIMIZE_LOGGER)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
