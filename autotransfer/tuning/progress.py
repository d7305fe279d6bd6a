"""Live progress on stderr: one line per trial start, per epoch and per trial end."""

from __future__ import annotations

from rich.console import Console

from autotransfer.engine.trainer import EpochResult, TrialParams


class Progress:
    """Prints what the search is doing, as it happens, to stderr."""

    def __init__(self, console: Console | None = None, epochs: int = 0) -> None:
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.epochs = epochs

    def message(self, text: str) -> None:
        self.console.print(text)

    def trial_started(self, number: int, params: TrialParams, k: int, n_blocks: int) -> None:
        self.console.print(
            f"[bold]trial {number}[/] {params.backbone}  freeze {k}/{n_blocks}  "
            f"lr {params.lr:.2e}  wd {params.weight_decay:.1e}  batch {params.batch_size}  "
            f"α {params.alpha:.2f}"
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
        self.console.print(f"  trial {number} [{color}]{state.lower()}[/]: {detail}")
