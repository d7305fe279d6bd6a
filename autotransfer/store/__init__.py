"""Where studies live: storage, budget, recovery, resume state, checkpoints, trial records."""
