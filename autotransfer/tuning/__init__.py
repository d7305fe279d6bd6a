"""The search: objective, search loop, workers, watchdog, interrupts, progress."""
