"""One trial's training, with no Optuna and no storage: trainer, evaluation, retention terms."""
