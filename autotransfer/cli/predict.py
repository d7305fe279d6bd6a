"""``autotransfer predict``: classify images or texts with an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from autotransfer.exceptions import DataError


def predict(
    export_dir: Annotated[
        Path, typer.Argument(help="Directory made by `autotransfer export`.", show_default=False)
    ],
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Image model: image files or folders of images. Text model: text files "
            "(.txt one text per line, or the text column of a .csv/.jsonl).",
            show_default=False,
        ),
    ] = None,
    text: Annotated[
        list[str] | None,
        typer.Option("--text", "-t", help="Text model: a text to classify (repeatable)."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    top_k: Annotated[
        int, typer.Option("--top-k", min=1, help="Classes to show per image, best first.")
    ] = 1,
    runtime: Annotated[
        str,
        typer.Option(help="Program to run: onnx (ONNX Runtime) or torchscript."),
    ] = "onnx",
    device: Annotated[
        str,
        typer.Option(
            help="auto (a GPU when the runtime can use one: onnxruntime-gpu, or TorchScript "
            "with CUDA torch), cpu, cuda or cuda:N.",
        ),
    ] = "auto",
) -> None:
    """Predict the class of each image or text: label and probability, one row each."""
    import json
    import sys

    from autotransfer.export.predict import load

    model = load(export_dir, runtime, device)  # type: ignore[arg-type]
    if model.modality == "text":
        texts = [*(text or []), *(model.read_texts(inputs) if inputs else [])]
        if not texts:
            raise DataError("no inputs; give text files or --text \"some text\"")
        predictions = model.predict(texts, top_k=top_k)
    else:
        if text:
            raise DataError(
                f"--text {text[0]!r}: this model classifies images; give image files or folders"
            )
        if not inputs:
            raise DataError("no inputs; give image files or folders of images")
        predictions = model.predict(inputs, top_k=top_k)
    if json_out:
        out = {
            "export": str(export_dir),
            "runtime": runtime,
            "predictions": [p.to_dict() for p in predictions],
        }
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=None, show_edge=False)
    table.add_column("input", overflow="fold")
    table.add_column("label")
    table.add_column("probability", justify="right")
    if top_k > 1:
        table.add_column(f"top {min(top_k, len(model.labels))}")
    for p in predictions:
        row = [p.input, p.label, f"{p.probability:.4f}"]
        if top_k > 1:
            row.append("  ".join(f"{t['label']} {t['probability']:.3f}" for t in p.top_k))
        table.add_row(*row)
    width = None if sys.stdout.isatty() else 160
    Console(width=width, highlight=False, soft_wrap=False).print(table)
