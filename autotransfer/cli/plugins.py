"""``autotransfer plugins``: which plugins loaded, what they provide, which failed."""

from __future__ import annotations

from typing import Annotated

import typer


def plugins(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON records.")] = False,
) -> None:
    """List the loaded plugins: distribution and version, hooks, families, load errors.

    Plugins come from the `autotransfer` entry-point group; set
    AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD=1 to load the built-in ones only. A plugin
    that failed to import is listed with its error; the others keep working.
    """
    import json
    import sys
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from autotransfer.plugins.host import get_plugin_host

    host = get_plugin_host()
    rows = []
    for p in host.plugins:
        families = sorted(f for f, plugin in host.family_plugins.items() if plugin == p.name)
        rows.append({**asdict(p), "hooks": list(p.hooks), "families": families})
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        table = Table(title="plugins (entry-point group 'autotransfer')", title_justify="left")
        for col in ("plugin", "distribution", "version", "builtin", "families", "hooks", "error"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["name"], r["distribution"], r["version"], "yes" if r["builtin"] else "no",
                ", ".join(r["families"]), ", ".join(r["hooks"]), r["error"] or "",
            )
        Console(width=None if sys.stdout.isatty() else 200, highlight=False, soft_wrap=False).print(
            table
        )
    for r in rows:
        if r["error"]:
            typer.echo(f"warning: plugin '{r['name']}' ({r['distribution']}) failed to load: "
                       f"{r['error']}", err=True)
