"""The `dlnotes` command: list, show, run, smoke, bench, cp, predict, runs, serve, ask.

Only the commands that train or predict import torch (through the recipe); `list`, `show` and every
`--help` read the catalog's metadata and stay fast.
"""

from __future__ import annotations

import functools
import inspect
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from dlnotes import catalog
from dlnotes.errors import UserError
from dlnotes.launch import build_config, execute, print_error, quiet_idle_threads
from dlnotes.listing import print_recipes, target_text

app = typer.Typer(
    help="dlnotes: a runnable deep-learning cookbook. Start with `dlnotes list`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def console() -> Console:
    """A fresh Console per command, so the width follows the terminal (or $COLUMNS) at that moment."""
    return Console()


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """A UserError inside a command is one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as err:
            print_error(str(err))
            raise typer.Exit(err.exit_code) from None

    return wrapper


@app.command("list")
def list_recipes(
    tag: str | None = typer.Option(None, "--tag", help="Only recipes with this tag."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the recipes in the catalog. A recipe file whose metadata cannot be read is one row "(unreadable:
    why)" (in --json: an "unreadable" entry with the reason), and the others are listed as usual."""
    print_recipes(tag, as_json)


@app.command()
@user_errors
def show(
    recipe: str = typer.Argument(..., help="Recipe id, e.g. cnn-mnist."),
    code: bool = typer.Option(True, "--code/--no-code", help="Also print the source."),
) -> None:
    """The recipe's lesson (notes with tensor shapes) and its source."""
    from rich.markdown import Markdown
    from rich.syntax import Syntax

    info = catalog.get(recipe)
    console().print(Markdown(f"# {info.id}: {info.title}\n\n{info.notes}"))
    console().print(f"\ntags: {', '.join(info.tags)}   dataset: {info.dataset}   target: {target_text(info)}")
    console().print("flags: " + " ".join(f"{f.flag}={f.default!r}" for f in info.fields))
    if code:
        console().print(Syntax(info.path.read_text(), "python", line_numbers=True))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def run(ctx: typer.Context, recipe: str | None = typer.Argument(None, help="Recipe id.")) -> None:
    """Train a recipe: `dlnotes run ID [recipe flags] [--smoke]`; `dlnotes run ID --help` lists its flags."""
    if recipe is None or recipe.startswith("-"):
        console().print("Usage: dlnotes run ID [FLAGS]   (dlnotes run ID --help shows the recipe's flags)")
        console().print("Recipes: " + ", ".join(catalog.all_recipes()))
        raise typer.Exit(0 if recipe in ("--help", "-h") else 2)
    try:
        info = catalog.get(recipe)
    except UserError as err:
        print_error(str(err))
        raise typer.Exit(err.exit_code) from None
    code = execute(info, list(ctx.args), prog=f"dlnotes run {info.id}")
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def smoke(
    recipes: list[str] | None = typer.Argument(None, help="Recipe ids (default: all)."),
    device: str = typer.Option("cpu", "--device", help="auto | cpu | cuda | mps"),
) -> None:
    """Run recipes with their tiny SMOKE settings; a pass/fail/time table; non-zero exit if any failed
    (an unreadable recipe file, too)."""
    infos = [catalog.get(r) for r in recipes] if recipes else list(catalog.all_recipes().values())
    table = Table(title="smoke")
    for column in ("recipe", "result", "seconds", "metrics / error"):
        table.add_column(column)
    broken = {} if recipes else catalog.unreadable()
    for rid, why in broken.items():
        table.add_row(rid, "FAIL", "—", f"unreadable: {why}")
    failed = len(broken)
    with tempfile.TemporaryDirectory(prefix="dlnotes-smoke-") as out:
        for info in infos:
            start = time.perf_counter()
            try:
                module = catalog.load_module(info)
                values = catalog.config_values(info, smoke=True, device=device, out=out)
                metrics = module.main(build_config(module, values)) or {}
                result, detail = "pass", ", ".join(f"{k}={v:.3g}" for k, v in metrics.items())
            except Exception as err:  # a smoke table reports every failure instead of stopping at the first
                failed += 1
                result, detail = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0]
            table.add_row(info.id, result, f"{time.perf_counter() - start:.1f}", detail)
    console().print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def bench(
    recipes: list[str] | None = typer.Argument(None, help="Recipe ids (default: every recipe with a TARGET or BENCH)."),
    repeat: int = typer.Option(1, "--repeat", min=1,
                               help="Runs per recipe, run k with seed k-1; the table shows medians."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | mps"),
    out: Path = typer.Option(Path("runs"), "--out", help="bench.json, bench.md and the runs go under OUT/bench/."),
) -> None:
    """Run recipes' default configurations: time to target, final metric, throughput, peak memory."""
    from dlnotes.bench import benchable, run_bench
    from dlnotes.device import pick_device

    infos = benchable(recipes)
    if not recipes:
        for rid, why in catalog.unreadable().items():
            console().print(f"note: skipped {rid}, unreadable: {why}", highlight=False)
    pick_device(device)  # an unknown or absent device fails here, once, not in every worker
    folder, rows = run_bench(infos, repeat, device, out, report=lambda line: console().print(line, highlight=False))
    print("\n" + (folder / "bench.md").read_text())  # plain: a Markdown table must not be wrapped
    console().print(f"bench.json and bench.md in {folder}")
    if any(row["errors"] or (row["met"] is not None and row["met"] < row["runs"]) for row in rows):
        raise typer.Exit(1)


@app.command()
@user_errors
def cp(
    recipe: str = typer.Argument(..., help="Recipe id."),
    dest: Path = typer.Argument(..., help="File or folder to copy it to."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Copy a recipe out to edit; the copy runs on its own: `python DEST --epochs 1`."""
    info = catalog.get(recipe)
    target = dest / info.path.name if dest.is_dir() else dest
    if target.is_symlink():  # copying through a link (dangling or not) would write wherever it points
        raise UserError(f"{target} is a symbolic link; give a plain file name.")
    if target.is_dir():
        raise UserError(f"{target} is a folder; give a file name.")
    if target.exists() and target.resolve() == info.path.resolve():
        raise UserError(f"{target} is the recipe itself; copy it somewhere else.")
    if target.exists() and not force:
        raise UserError(f"{target} exists; pass --force to overwrite it.")
    if not target.parent.is_dir():
        raise UserError(f"Folder {target.parent} does not exist.")
    try:
        shutil.copyfile(info.path, target)
    except OSError as err:
        raise UserError(f"Cannot write {target}: {err.strerror}.") from err
    console().print(f"Copied {info.id} to {target}. Run it with: python {target} --help")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def predict(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe id."),
    run_dir: Path = typer.Option(..., "--run", help="A run directory of this recipe (runs/ID/STAMP)."),
) -> None:
    """Use a trained run: `dlnotes predict ID --run DIR INPUT... [recipe options]`.

    INPUTs are what the recipe takes (image files, texts, ...); options after them come from the
    keyword arguments of the recipe's `predict` function (e.g. `--episodes 10` for dqn)."""
    from dlnotes.flags import parse_predict_args  # click: not imported for `dlnotes list`

    info = catalog.get(recipe)
    if not info.can_predict:
        raise UserError(f"Recipe '{info.id}' trains no model to predict with.")
    if not run_dir.is_dir():
        raise UserError(f"Run directory {run_dir} does not exist.")
    module = catalog.load_module(info)
    inputs, options = parse_predict_args(module.predict, list(ctx.args), prog=f"dlnotes predict {info.id}")
    if not inputs and inspect.signature(module.predict).parameters["inputs"].default is inspect.Parameter.empty:
        first_line = (inspect.getdoc(module.predict) or "").splitlines()[:1]
        raise UserError(f"Give at least one input: dlnotes predict {info.id} --run DIR INPUT... "
                        f"({first_line[0] if first_line else 'see the recipe'})")
    for result in module.predict(run_dir, inputs, **options):  # one line per input, for people and for scripts
        if "top" in result:
            answer = "   ".join(f"{label} {prob:.3f}" for label, prob in result["top"])
        else:
            answer = result["output"]
        print(f"{result['input']}: {answer}")


@app.command()
@user_errors
def runs(
    recipe: str | None = typer.Argument(None, help="Only this recipe's runs."),
    out: Path = typer.Option(Path("runs"), "--out", help="Where runs were written."),
) -> None:
    """Past runs with their final metrics."""
    from dlnotes.tracking import list_runs

    if recipe:
        catalog.get(recipe)
    table = Table(title=f"runs under {out}")
    for column in ("recipe", "run", "metrics", "target", "seconds"):
        table.add_column(column, overflow="fold")
    for run_dir in list_runs(out, recipe):
        table.add_row(run_dir.parent.name, str(run_dir), *_run_row(run_dir))
    console().print(table)


def _run_row(run_dir: Path) -> tuple[str, str, str]:
    """metrics, target, seconds of a run directory; a broken config.json or summary.json is shown, not fatal."""
    try:
        json.loads((run_dir / "config.json").read_text())
        summary_file = run_dir / "summary.json"
        if not summary_file.is_file():
            return "(unfinished)", "—", "—"
        summary = json.loads(summary_file.read_text())
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in summary["metrics"].items() if isinstance(v, float))
        met = {True: "met", False: "not met", None: "—"}[summary["target_met"]]
        return metrics, met, f"{summary['wall_time_s']:.0f}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"(unreadable: {type(err).__name__})", "—", "—"


@app.command()
@user_errors
def serve(
    model: str = typer.Option("", "--model", help="A model folder, a .gguf file, or empty for SmolLM2-135M-Instruct."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address; loopback by default."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str = typer.Option("", "--api-key", envvar="DLNOTES_API_KEY",
                                help="Require this bearer token (default: no key)."),
    api_key_file: str = typer.Option("", "--api-key-file", help="Read the bearer token from this file's first line."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | mps"),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Largest max_tokens a request may ask for."),
    timeout: float = typer.Option(600, "--timeout", help="Seconds per request, waiting included; then it ends."),
    queue: int = typer.Option(16, "--queue", help="Requests that may wait for the model; more get 503."),
    max_body: int = typer.Option(1 << 20, "--max-body", help="Largest request body in bytes (413 beyond)."),
    allow_host: list[str] = typer.Option([], "--allow-host", help="Also accept this Host name (repeat; * = any)."),
    allow_origin: list[str] = typer.Option([], "--allow-origin",
                                           help="Also accept browser requests from this origin (repeat; * = any)."),
) -> None:
    """An OpenAI-compatible chat server (`/v1/models`, `/v1/chat/completions`) for a local model."""
    from dlnotes.llm.schema import Limits
    from dlnotes.llm.server import serve as run_server

    limits = Limits(max_body=max_body, max_tokens=max_tokens, queue=queue, timeout=timeout,
                    allow_hosts=tuple(allow_host), allow_origins=tuple(allow_origin))
    run_server(model=model, host=host, port=port, api_key=api_key, device=device, api_key_file=api_key_file,
               limits=limits)


@app.command()
@user_errors
def ask(
    question: str = typer.Argument("", help='A question about the cookbook, e.g. "how do I resume a run?"'),
    k: int = typer.Option(3, "--k", help="Chunks retrieved into the prompt."),
    generate: bool = typer.Option(True, "--generate/--no-generate",
                                  help="Answer with the chat model, or only retrieve."),
    index: str = typer.Option("", "--index", help="A rag run directory (or its index.pt); default: a cached index, "
                                                  "rebuilt when the lessons change."),
    model: str = typer.Option("", "--model", help="Chat model folder or .gguf; empty = SmolLM2-135M-Instruct."),
    base_url: str = typer.Option("", "--base-url", help="An OpenAI-compatible server instead of the embedded one."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | mps"),
    max_tokens: int = typer.Option(120, "--max-tokens", help="Longest answer, in tokens."),
    tiny: bool = typer.Option(False, "--tiny", hidden=True, help="Tiny random encoder and chat model (tests)."),
) -> None:
    """Answer from the cookbook's own lessons (the rag recipe): retrieve chunks, answer citing them, name recipes."""
    if not question.strip():  # before torch is imported
        raise UserError('Give a question, e.g.: dlnotes ask "how do I resume a run?"')
    rag = catalog.load_module(catalog.get("rag"))
    rag.ask(question, index=index, k=k, generate=generate, model=model, base_url=base_url, device=device,
            max_tokens=max_tokens, tiny=tiny)


TORCH_COMMANDS = ("run", "smoke", "bench", "predict", "ask")  # serve sets its own wait policy (llm/server.py)


def main() -> None:
    """The Typer app (dlnotes.entry answers the plain `dlnotes list` before this module is imported)."""
    if len(sys.argv) > 1 and sys.argv[1] in TORCH_COMMANDS:  # the others never start OpenMP threads: skip the 40 ms
        quiet_idle_threads()
    app()
