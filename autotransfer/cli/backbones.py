"""``autotransfer backbones``: the backbone families and models that can be searched."""

from __future__ import annotations

from typing import Annotated

import typer


def backbones(
    family: Annotated[
        str | None,
        typer.Option("--family", "-f", help="List this family's models (e.g. timm, torchvision)."),
    ] = None,
    filter_: Annotated[
        str | None,
        typer.Option(
            "--filter",
            help="Glob on model names, e.g. 'resnet*' (lists models of every family "
            "unless --family is given).",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON records.")] = False,
) -> None:
    """List backbone families, or with --family/--filter their models.

    Each row names the plugin that provides the family and its distribution
    version. Use a name as family:model[@weights] in a spec or in
    `autotransfer search --backbones`.
    """
    import json
    import sys

    from rich.console import Console
    from rich.table import Table

    from autotransfer.exceptions import BackboneError, BrokenPluginError
    from autotransfer.plugins.host import get_plugin_host

    host = get_plugin_host()
    names = [host.family(family).name] if family is not None else sorted(host.families)

    def meta(name: str) -> dict[str, object]:
        fam = host.families[name]
        plugin = host.family_plugins[name]
        info = host.info(plugin)
        return {
            "family": name,
            "modality": fam.modality,
            "plugin": plugin,
            "distribution": info.distribution if info else "?",
            "version": info.version if info else "?",
            "weights": list(fam.weights_sources),
        }

    def listed(name: str, pattern: str | None) -> list[str] | None:
        """The family's models; with several families, a broken one is skipped
        with a warning (one family asked for by name: its error, exit 2)."""
        if family is not None:
            return host.list_models(name, pattern)
        try:
            return host.list_models(name, pattern)
        except BrokenPluginError as exc:
            typer.echo(f"warning: {exc}", err=True)
            return None

    rows = []
    if family is None and filter_ is None:
        for name in names:
            about = meta(name)  # before listing: a broken family is dropped
            models = listed(name, None)
            if models is not None:
                rows.append({**about, "models": len(models)})
        columns = ["family", "modality", "models", "weights", "plugin", "distribution", "version"]
        title = "backbone families (list models with --family F or --filter GLOB)"
    else:
        for name in names:
            about = meta(name)
            for model in listed(name, filter_) or []:
                rows.append({"name": f"{name}:{model}", **about})
        if not rows and family is not None and filter_ is None:
            raise BackboneError(
                f"family '{family}' has no model list: name models as {family}:<id> "
                "(e.g. a Hugging Face repo id or a local model directory)"
            )
        columns = ["name", "family", "modality", "plugin", "version"]
        title = f"{len(rows)} backbones"

    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    for r in rows:
        if r.get("models") == 0:
            typer.echo(f"{r['family']}: no model list; name models as {r['family']}:<id>", err=True)
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if col == "models" else "left")
    for r in rows:
        table.add_row(*(", ".join(v) if isinstance(v := r[c], list) else str(v) for c in columns))
    Console(width=None if sys.stdout.isatty() else 160, highlight=False, soft_wrap=False).print(
        table
    )
