"""`dlnotes list`: the catalog as a table or JSON. It is the command people type first and often, so it is
answered without Typer (building Typer's command tree, a pydantic adapter for every option of every command,
took most of its start-up) and without torch: dlnotes.entry sends its plain forms here directly."""

from __future__ import annotations

import json
import os
from typing import Any

from dlnotes import catalog


def target_text(info: catalog.RecipeInfo) -> str:
    return ", ".join(str(target) for target in (info.target, *info.also_targets) if target) or "—"


def json_row(info: catalog.RecipeInfo) -> dict[str, Any]:
    return {"id": info.id, "title": info.title, "tags": list(info.tags), "dataset": info.dataset,
            "target": info.target.as_list() if info.target else None}


def print_recipes(tag: str | None = None, as_json: bool = False) -> None:
    """Every recipe, or those with `tag`. A recipe file whose metadata cannot be read is one row "(unreadable:
    why)" (in JSON: an "unreadable" entry with the reason), and the others are listed as usual."""
    recipes = {r.id: r for r in catalog.all_recipes().values() if tag is None or tag in r.tags}
    broken = {} if tag else catalog.unreadable()  # an unreadable file's tags are unknown
    ids = sorted([*recipes, *broken])
    if as_json:
        unreadable_row = {"title": "", "tags": [], "dataset": "", "target": None}
        rows = [{"id": rid, **unreadable_row, "unreadable": broken[rid]} if rid in broken else json_row(recipes[rid])
                for rid in ids]
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console  # only for the table: JSON needs none of rich
    from rich.table import Table

    title = f"{len(recipes)} recipes" + (f", {len(broken)} unreadable" if broken else "")
    table = Table(title=title, title_justify="left")
    for column in ("id", "title", "tags", "dataset", "target"):
        table.add_column(column, overflow="fold")
    for rid in ids:
        if rid in broken:
            why = broken[rid].removeprefix(f"{catalog.recipes_dir()}{os.sep}")  # the folder is the same for all
            table.add_row(rid, f"(unreadable: {why})", "", "", "—")
        else:
            r = recipes[rid]
            table.add_row(r.id, r.title, ", ".join(r.tags), r.dataset, target_text(r))
    Console().print(table)


def plain_list_options(args: list[str]) -> dict[str, Any] | None:
    """`dlnotes list [--tag TAG] [--json]` as keyword arguments of `print_recipes`; None for any other command
    line, which goes to Typer (with its own parsing, --help and messages)."""
    if args[:1] != ["list"]:
        return None
    options: dict[str, Any] = {"tag": None, "as_json": False}
    rest = args[1:]
    while rest:
        arg = rest.pop(0)
        if arg == "--json" and not options["as_json"]:
            options["as_json"] = True
        elif arg == "--tag" and options["tag"] is None and rest and not rest[0].startswith("-"):
            options["tag"] = rest.pop(0)
        elif arg.startswith("--tag=") and options["tag"] is None and len(arg) > len("--tag="):
            options["tag"] = arg.removeprefix("--tag=")
        else:
            return None  # --help, a typo, a repeated option
    return options
