"""Command-line flags generated from a recipe's Config fields: one source of truth for every flag.

`dlnotes run ID --help` and `python recipes/ID.py --help` show the same flags. `dlnotes` builds them from the
metadata the catalog reads with `ast` (`catalog.read_recipe`), so asking for help never imports torch; a
recipe run as a script builds them from its imported Config class (`catalog.read_module`). Both give a
`RecipeInfo`, and `build_command` takes either.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import click

from dlnotes.catalog import RecipeInfo
from dlnotes.distributed import LAUNCH_FLAGS
from dlnotes.errors import UserError
from dlnotes.options import RunOptions

RUN_OPTION_HELP = {
    "resume": "Continue the run in this directory from its newest checkpoint (only --epochs, --total-steps, "
              "--device and --out may change).",
    "save_every": "Also write a checkpoint every N optimizer steps (0 = only at the end of each epoch).",
    "keep": "Keep the newest N step checkpoints (plus best.pt).",
    "nproc": "Train with N processes on this machine (torchrun + DistributedDataParallel).",
    "nnodes": "Machines in a multi-node job (each runs the same command with its own --node-rank).",
    "node_rank": "This machine's index in a multi-node job, 0 .. NNODES-1.",
    "rdzv_endpoint": "HOST:PORT of node 0 in a multi-node job (default: a free loopback port for one machine).",
}


def require_positive(config: Any, *names: str) -> None:
    """Called from a Config's __post_init__: a zero or negative step count, size or rate is a user error."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}.")


def require_choice(config: Any, name: str, choices: Iterable[str]) -> None:
    """Called from a Config's __post_init__: a `--dataset`-style field must be one of `choices`."""
    value, allowed = getattr(config, name), tuple(choices)
    if value not in allowed:
        raise UserError(f"Unknown --{name.replace('_', '-')} '{value}': use one of {', '.join(allowed)}.")


def build_command(info: RecipeInfo, prog: str) -> click.Command:
    params: list[click.Parameter] = []
    for spec in info.fields:
        if spec.type is bool:
            params.append(click.Option([f"{spec.flag}/--no-{spec.flag[2:]}"], default=spec.default, help=spec.help,
                                       show_default=True))
        else:
            params.append(click.Option([spec.flag], type=spec.type, default=spec.default, help=spec.help,
                                       show_default=True))
    smoke_help = f"Tiny run with the recipe's SMOKE settings {info.smoke}."
    params.append(click.Option(["--smoke"], is_flag=True, help=smoke_help))
    if info.trains:  # a recipe with TRAINS = False writes no checkpoints: nothing to resume or keep
        params.append(click.Option(["--resume"], default="", metavar="RUN_DIR", help=RUN_OPTION_HELP["resume"]))
        params.append(click.Option(["--save-every"], type=click.IntRange(min=0), default=0, show_default=True,
                                   help=RUN_OPTION_HELP["save_every"]))
        params.append(click.Option(["--keep"], type=click.IntRange(min=1), default=1, show_default=True,
                                   help=RUN_OPTION_HELP["keep"]))
    if info.distributed:
        params.append(click.Option(["--nproc"], type=click.IntRange(min=1), default=1, show_default=True,
                                   help=RUN_OPTION_HELP["nproc"]))
        params.append(click.Option(["--nnodes"], type=click.IntRange(min=1), default=1, show_default=True,
                                   help=RUN_OPTION_HELP["nnodes"]))
        params.append(click.Option(["--node-rank"], type=click.IntRange(min=0), default=0, show_default=True,
                                   help=RUN_OPTION_HELP["node_rank"]))
        params.append(click.Option(["--rdzv-endpoint"], default="", metavar="HOST:PORT",
                                   help=RUN_OPTION_HELP["rdzv_endpoint"]))
    return click.Command(prog, params=params, help=f"{info.title}\n\nFlags come from the recipe's Config.",
                         callback=lambda **values: values)


def parse_args(info: RecipeInfo, args: list[str], prog: str) -> tuple[dict[str, Any], RunOptions] | None:
    """Turn argv into Config values. Returns None when help was shown. Bad flags raise UserError."""
    refused = [a for a in args if a.split("=")[0] in LAUNCH_FLAGS]
    if refused and not info.distributed:
        raise UserError(f"Recipe '{info.id}' does not support distributed training ({refused[0].split('=')[0]}); "
                        "see DISTRIBUTED in `dlnotes show " + info.id + "`.")
    command = build_command(info, prog)
    try:
        with command.make_context(prog, list(args)) as ctx:
            values = command.invoke(ctx)
            explicit = {
                name
                for name in values
                if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
            }
    except click.exceptions.Exit:
        return None  # --help was printed
    except click.ClickException as err:
        raise UserError(err.format_message().replace("\n", " ")) from err
    launch = {name: values.pop(name) for name in ("nproc", "nnodes", "node_rank", "rdzv_endpoint", "resume",
                                                  "save_every", "keep") if name in values}
    options = RunOptions(smoke=values.pop("smoke"), **launch, explicit=frozenset(explicit & set(values)))
    if options.smoke:
        unknown = set(info.smoke) - set(values)
        if unknown:
            raise UserError(f"SMOKE of recipe '{info.id}' names unknown fields: {sorted(unknown)}")
        values.update({k: v for k, v in info.smoke.items() if k not in explicit})
    return values, options


def parse_predict_args(predict: Callable[..., Any], args: list[str], prog: str) -> tuple[list[str], dict[str, Any]]:
    """Inputs and options for a recipe's `predict(run_dir, inputs, **options)`: each keyword argument with a
    default becomes a flag (`episodes: int = 10` -> `--episodes 10`); everything else is an input."""
    types = {"int": int, "float": float, "str": str, "bool": bool, int: int, float: float, str: str, bool: bool}
    params: list[click.Parameter] = [click.Argument(["inputs"], nargs=-1)]
    for name, param in list(inspect.signature(predict).parameters.items())[2:]:
        flag = "--" + name.replace("_", "-")
        kind = types.get(param.annotation, str)
        if kind is bool:
            params.append(click.Option([f"{flag}/--no-{flag[2:]}"], default=param.default, show_default=True))
        else:
            params.append(click.Option([flag], type=kind, default=param.default, show_default=True))
    command = click.Command(prog, params=params, callback=lambda **values: values)
    try:
        with command.make_context(prog, args) as ctx:
            values = command.invoke(ctx)
    except click.ClickException as err:
        raise UserError(err.format_message().replace("\n", " ")) from err
    return list(values.pop("inputs")), values
