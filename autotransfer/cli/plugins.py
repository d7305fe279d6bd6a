"""``autotransfer plugins``: which plugins loaded, what they provide, which are broken."""

from __future__ import annotations

from typing import Annotated

import typer


def plugins(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON records.")] = False,
) -> None:
    """List the plugins: distribution and version, status, families, hooks, errors.

    Plugins come from the `autotransfer` entry-point group; set
    AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD=1 to load the built-in ones only. Each
    family's model list is read, so a plugin that fails to import, to register
    or to list its models shows as broken, with the hook and the reason; the
    others keep working. A plugin refused by the allow or deny list shows as
    denied.
    """
    import json
    import sys
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from autotransfer.exceptions import BrokenPluginError
    from autotransfer.plugins.host import BROKEN, get_plugin_host

    host = get_plugin_host()
    models: dict[str, int] = {}
    for name in sorted(host.families):
        try:  # the diagnosis: a family whose model list raises is quarantined
            models[name] = len(host.list_models(name))
        except BrokenPluginError:
            continue
    rows = []
    for p in host.plugins:
        families = sorted(f for f, plugin in host.family_plugins.items() if plugin == p.name)
        rows.append({
            **asdict(p), "hooks": list(p.hooks), "families": families,
            "models": {f: models.get(f) for f in families},
        })
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        table = Table(title="plugins (entry-point group 'autotransfer')", title_justify="left")
        for col in ("plugin", "distribution", "version", "builtin", "status", "families",
                    "hooks", "error"):
            table.add_column(col)
        for r in rows:
            error = f"{r['hook']}: {r['error']}" if r["status"] == BROKEN else r["error"] or ""
            table.add_row(
                r["name"], r["distribution"], r["version"], "yes" if r["builtin"] else "no",
                r["status"], ", ".join(r["families"]), ", ".join(r["hooks"]), error,
            )
        Console(width=None if sys.stdout.isatty() else 200, highlight=False, soft_wrap=False).print(
            table
        )
    for r in rows:
        if r["status"] == BROKEN:
            typer.echo(
                f"warning: plugin '{r['name']}' ({r['distribution']} {r['version']}) is broken "
                f"and not in use: {r['hook']}: {r['error']}", err=True,
            )
