"""``autotransfer search``: run or resume a study."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from autotransfer.cli.options import DEFAULT, Gpus, Storage, StudyName, TrialsPerGpu
from autotransfer.exceptions import UserInputError

if TYPE_CHECKING:
    from autotransfer.spec.model import StudySpec


def search(
    spec: Annotated[
        Path | None,
        typer.Argument(
            help="YAML study spec. Without one: with --data, the general defaults "
            "(docs/spec.md) for that data set; without --data, the embedded digits example "
            "(studies/digits.yaml).",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Image folder (one sub-folder per class), sklearn:digits, or a text data "
            "set: a .csv or .jsonl file with a text and a label column.",
        ),
    ] = None,
    val_data: Annotated[
        str | None,
        typer.Option(
            "--val-data",
            help="A validation set you already have, in the same format and with the same "
            "classes as --data; then none is split off --data.",
        ),
    ] = None,
    test_data: Annotated[
        str | None,
        typer.Option(
            "--test-data",
            help="A test set you already have, in the same format and with the same classes "
            "as --data; then none is split off --data.",
        ),
    ] = None,
    text_column: Annotated[
        str | None,
        typer.Option(
            "--text-column", help="Text data: the column holding the texts (default: text)."
        ),
    ] = None,
    label_column: Annotated[
        str | None,
        typer.Option(
            "--label-column", help="Text data: the column holding the labels (default: label)."
        ),
    ] = None,
    backbones: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated candidates family:model@weights (weights: pretrained, "
            "the default, packaged, none or a file), e.g. "
            "timm:resnet18@pretrained,timm:tf_efficientnet_lite0@packaged. Without a spec "
            "file: the pretrained candidates for the data's modality this machine can have.",
        ),
    ] = None,
    n_trials: Annotated[
        int | None,
        typer.Option(
            "--n-trials", min=1,
            help="Trials to add to the study, run by this search and any `autotransfer "
            "worker` that joins it (an exact total).",
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, help="Stop starting trials after this many seconds.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs per trial.")] = None,
    storage: Storage = DEFAULT,
    study_name: StudyName = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for sampling, splits and training.")
    ] = None,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            help="Directory for trial checkpoints; default: autotransfer-artifacts/ beside "
            "the SQLite file (or in the working directory for other databases).",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of tables.")
    ] = False,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="When the search ends, export the best trial to this new directory "
            "(see `autotransfer export`; the spec's export.refit: a model refit on train + val).",
        ),
    ] = None,
    gpus: Gpus = None,
    trials_per_gpu: TrialsPerGpu = 1,
) -> None:
    """Search how to fine-tune: backbone, freeze depth, learning rate and α.

    Runs the study in SPEC and prints the trials and the best one. Without SPEC,
    --data DIR (or FILE.csv) runs the general defaults on that data set, named after
    it, over the pretrained backbones this machine can have; with no --data either,
    the embedded digits example runs. Running it again resumes the study: new
    trials are added.
    """
    from autotransfer.cli import debug_enabled
    from autotransfer.cli.render import print_search_outcome
    from autotransfer.spec.model import load_spec
    from autotransfer.tuning.gpus import plan_gpus
    from autotransfer.tuning.progress import Progress
    from autotransfer.tuning.search import run_search

    overrides = {
        "data.path": data,
        "data.val": val_data,
        "data.test": test_data,
        "data.text_column": text_column,
        "data.label_column": label_column,
        "search.backbones": [b.strip() for b in backbones.split(",") if b.strip()]
        if backbones is not None
        else None,
        "n_trials": n_trials,
        "timeout": timeout,
        "train.epochs": epochs,
        "name": study_name,
        "seed": seed,
    }
    for key, value in (("data.path", data), ("data.val", val_data), ("data.test", test_data)):
        if value is not None and Path(value).exists():
            overrides[key] = str(Path(value).resolve())
    if spec is None and data is not None:
        resolved = general_defaults(overrides, storage)
    else:
        resolved = load_spec(spec, overrides)  # no --data: the embedded digits example
    plan = plan_gpus(gpus, trials_per_gpu, resolved.train.device)
    if export is not None:
        from autotransfer.export.writer import check_target

        check_target(export)  # refuse a bad export path before the search, not after
        target = export.resolve()
        if artifacts is not None and artifacts.resolve() in (target, *target.parents):
            raise UserInputError(
                f"--export '{export}' is inside --artifacts '{artifacts}' (the trial "
                "checkpoints); give an export directory outside it"
            )
    outcome = run_search(
        resolved, storage, artifacts,
        Progress(epochs=resolved.train.epochs, debug=debug_enabled()), plan
    )
    print_search_outcome(outcome, json_out)
    if outcome.dead_workers:
        typer.echo(f"error: {'; '.join(outcome.dead_workers)}", err=True)
        raise typer.Exit(1)
    if export is not None:
        from autotransfer.cli.export import print_export
        from autotransfer.export.writer import export_trial

        ensemble = resolved.export.ensemble
        done = export_trial(
            outcome.study, export, None if ensemble else outcome.best.number,
            message=lambda m: typer.echo(m, err=True), refit=resolved.export.refit,
            ensemble=ensemble,
        )
        print_export(done, err=True)


def general_defaults(overrides: dict[str, Any], storage: str) -> StudySpec:
    """The study a run without a spec file starts from: the general defaults for
    the data set in ``overrides["data.path"]``, named after it, with the default
    candidate backbones for its modality (or, for a study that exists already,
    the backbones it was created with, so a resumed study is the same study
    offline or online). Says on stderr what was chosen.

    Raises:
        UserInputError: an invalid flag value, or no default backbone can be had.
    """
    from autotransfer.backbones.defaults import default_backbones
    from autotransfer.spec.model import data_set_name, general_spec, modality_of

    path = str(overrides["data.path"])
    modality = modality_of(path)
    name = overrides.get("name") or data_set_name(path)
    notes: list[str] = []
    if overrides.get("search.backbones") is None:
        kept = _stored_backbones(storage, name)
        if kept is not None:
            overrides = {**overrides, "search.backbones": kept}
            notes.append(f"backbones: those study '{name}' was created with")
        else:
            choice = default_backbones(modality)
            overrides = {**overrides, "search.backbones": choice.chosen}
            notes.append(
                f"backbones: the pretrained {modality} candidates this machine can have"
            )
            notes += [f"  left out {key}: {why}" for key, why in choice.left_out.items()]
    resolved = general_spec({**overrides, "name": name})
    typer.echo(_describe_defaults(resolved, name != overrides.get("name"), notes), err=True)
    return resolved


def _stored_backbones(storage: str, name: str) -> list[dict[str, Any]] | None:
    """The backbones of study ``name`` if the storage holds it, else None."""
    from autotransfer.exceptions import AutotransferError
    from autotransfer.store.studies import load_study, stored_spec

    try:
        spec = stored_spec(load_study(storage, name))
    except AutotransferError:
        return None  # no such storage or study (a bad URL is reported by the search)
    return [b.model_dump(mode="json") for b in spec.search.backbones]


def _describe_defaults(spec: StudySpec, named_after_data: bool, notes: list[str]) -> str:
    """The defaults a run without a spec file chose, for stderr."""
    split = spec.data.split
    budget = f"{spec.n_trials} trial(s)" if spec.n_trials else "no trial limit"
    limit = f"timeout {spec.timeout:g}s" if spec.timeout else "no time limit"
    shape = (
        f"texts up to {spec.data.max_length} tokens" if spec.data.modality == "text"
        else f"images at {spec.data.image_size}px, flip {'on' if spec.data.augment.flip else 'off'}"
    )
    backbones = ", ".join(b.key for b in spec.search.backbones)
    source = notes[0] if notes else "backbones: as given"
    return "\n".join([
        f"no spec file: general defaults (docs/spec.md) for {spec.data.modality} data "
        f"'{spec.data.path}'",
        f"  study '{spec.name}'"
        + (" (named after the data; --study-name to change)" if named_after_data else ""),
        f"  {budget}, {limit}, {spec.train.epochs} epochs per trial, {shape}, split "
        f"train/val/test {split.train:g}/{split.val:g}/{split.test:g}, retention "
        f"{'/'.join(spec.retention_kinds)}, pruner {spec.pruner.type}, "
        f"sampler {spec.sampler.type}",
        f"  {source}: {backbones}",
        *notes[1:],
        "  a spec file (docs/spec.md) or flags (--backbones, --n-trials, --timeout, "
        "--epochs, ...) change them",
    ])
