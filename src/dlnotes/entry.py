"""The `dlnotes` command's entry point: the plain forms of `dlnotes list` are answered by dlnotes.listing
without importing Typer or torch; every other command line goes to the Typer app in dlnotes.cli."""

from __future__ import annotations

import sys


def main() -> None:
    from dlnotes.listing import plain_list_options, print_recipes

    options = plain_list_options(sys.argv[1:])
    if options is not None:
        print_recipes(**options)
        return
    from dlnotes import cli

    cli.main()
