"""``autotransfer export``: write a trial's model as a ready-to-serve directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from autotransfer.cli.options import DEFAULT, Storage, StudyName


def export(
    out_dir: Annotated[
        Path,
        typer.Argument(help="Directory to create (model files, config.json, README.md).",
                       show_default=False),
    ],
    storage: Storage = DEFAULT,
    study_name: StudyName = None,
    trial: Annotated[
        int | None,
        typer.Option("--trial", min=0, help="Trial number to export; default: the best trial."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a previous export in OUT_DIR.")
    ] = False,
    refit: Annotated[
        bool | None,
        typer.Option(
            "--refit/--no-refit",
            help="Export a model trained again on train + validation with the trial's "
            "parameters, seed and best epoch count (test metrics computed for it), or the "
            "trial's own checkpoint; default: the study spec's export.refit (on).",
            show_default=False,
        ),
    ] = None,
    ensemble: Annotated[
        bool | None,
        typer.Option(
            "--ensemble/--no-ensemble",
            help="Export a greedy ensemble of the completed trials (chosen on validation, "
            "from their checkpoints; one model averaging their probabilities, each member "
            "runs at inference) instead of one trial; with the refit, each member is refit "
            "on train + validation; default: the spec's export.ensemble (on).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Export a trial (the best by default) from its checkpoint, or refit on train + val.

    Writes model.safetensors, model.torchscript.pt (plain torch), model.onnx (plain
    onnxruntime), config.json and a model card README.md. Both programs take float32
    NCHW input, normalised with the mean/std in config.json, and return logits.
    """
    from autotransfer.export.writer import export_trial
    from autotransfer.store.studies import load_study

    study = load_study(storage, study_name)
    result = export_trial(study, out_dir, trial, force=force, message=_stderr, refit=refit,
                          ensemble=ensemble)
    print_export(result)


def _stderr(line: str) -> None:
    typer.echo(line, err=True)


def print_export(result: object, err: bool = False) -> None:
    """One summary line per export, on stdout (stderr with ``err``: after
    ``search --json``)."""
    config = result.config  # type: ignore[attr-defined]
    trial = result.trial  # type: ignore[attr-defined]
    test = config["metrics"]["test"] or {}
    acc = test.get("accuracy")
    held = config["model"]
    if held["kind"] == "ensemble":
        what = "an ensemble of trials " + ", ".join(str(m["trial"]) for m in held["members"])
        how = "each refit on train+val" if held["trained_on"] == "train+val" else "checkpoints"
    elif held["kind"] == "refit":
        what, how = f"trial {trial}", f"refit on train+val for {held['epochs']} epochs"
    else:
        what, how = f"trial {trial}", "trial weights"
    trial_acc = (config["metrics"].get("trial_test") or {}).get("accuracy")
    typer.echo(
        f"exported {what} ({result.backbone}, {how}) to {result.path}: "  # type: ignore[attr-defined]
        f"{config['num_classes']} classes, val_acc {config['metrics']['val']['accuracy']:.3f}"
        + (f", test_acc {acc:.3f}" if acc is not None else "")
        + (f" (trial {trial}'s own weights: test_acc {trial_acc:.3f})"
           if trial_acc is not None else ""),
        err=err,
    )
