"""The catalog survives an edit: a recipe file it cannot read is one row in `list` and one line everywhere
else, the other recipes keep working, and a copied recipe with a computed default still runs as a script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from dlnotes import catalog
from dlnotes.errors import UserError
from dlnotes.tracking import latest_run

WORKING = '''"""A tiny language model that trains nothing: a stand-in with a lower-is-better target."""
from dataclasses import dataclass

TAGS = ("text",)
DATASET = "none"
TARGET = ("val_loss", 1.6, "<=")
SMOKE = {"steps": 1}


@dataclass
class Config:
    steps: int = 10  # how many steps
    device: str = "cpu"


def main(cfg: Config) -> dict[str, float]:
    return {"val_loss": 1.5}
'''

CONFIG = '"""An edited recipe."""\nfrom dataclasses import dataclass\n\n\n@dataclass\nclass Config:\n'  # lines 1-6

# name -> (source, the line its message names, what the message says)
BROKEN = {
    "computed": (CONFIG + "    epochs: int = 3\n    lr: float = 3e-3 / 2  # halved\n", 8,
                 "Config.lr = 3e-3 / 2: a default must be a literal"),
    "syntax-error": (CONFIG + "    lr: float = 3e-3 *  # halved\n", 7, "syntax error"),
    "bad-type": (CONFIG + "    sizes: list = (1, 2)\n", 7, "Config.sizes is list; flags are int, float, str or bool"),
    "bad-target": ('"""Doc."""\nTARGET = ("val_loss", 1.6, "<")\n', None, "TARGET must be (metric, value)"),
}


@pytest.fixture
def recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A recipes folder (`$DLNOTES_RECIPES`) with one working recipe and one file for each way to be unreadable."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "tiny_lm.py").write_text(WORKING)
    for name, (source, _, _) in BROKEN.items():
        (folder / f"{name.replace('-', '_')}.py").write_text(source)
    monkeypatch.setenv("DLNOTES_RECIPES", str(folder))
    return folder


def where(folder: Path, name: str) -> str:
    """`path:line` (or just the path) that the message about recipe `name` must start with."""
    path, line = folder / f"{name.replace('-', '_')}.py", BROKEN[name][1]
    return f"{path}:{line}:" if line else f"{path}:"


@pytest.mark.parametrize("name", BROKEN)
def test_an_unreadable_file_is_a_user_error_naming_file_line_and_why(name: str, recipes: Path) -> None:
    with pytest.raises(UserError) as err:
        catalog.read_recipe(recipes / f"{name.replace('-', '_')}.py")
    message = str(err.value)
    assert message.startswith(where(recipes, name)) and BROKEN[name][2] in message and "\n" not in message


def test_list_shows_each_unreadable_file_as_one_row_next_to_the_working_ones(recipes: Path, invoke) -> None:
    result = invoke("list", env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    assert "1 recipes, 4 unreadable" in result.output
    lines = result.output.splitlines()
    for name in BROKEN:
        row = [line for line in lines if f" {name} " in line]
        assert len(row) == 1, result.output
        assert f"(unreadable: {where(recipes, name).removeprefix(f'{recipes}/')}" in row[0], row[0]
        assert BROKEN[name][2] in row[0]
    row = next(line for line in lines if " tiny-lm " in line)
    assert "A tiny language model" in row and "val_loss ≤ 1.6" in row  # a lower-is-better target, with ≤

    rows = {row["id"]: row for row in json.loads(invoke("list", "--json").output)}
    assert rows["tiny-lm"]["target"] == ["val_loss", 1.6, "<="] and "unreadable" not in rows["tiny-lm"]
    assert set(rows) == {"tiny-lm", *BROKEN}
    for name in BROKEN:
        assert rows[name]["unreadable"].startswith(where(recipes, name)) and rows[name]["target"] is None


@pytest.mark.parametrize("verb", [["run"], ["show"], ["smoke"], ["bench"], ["cp", "."], ["predict", "--run", "."]])
def test_every_verb_on_an_unreadable_recipe_is_one_line(verb: list[str], recipes: Path, invoke) -> None:
    command, *rest = verb
    result = invoke(command, "computed", *rest)
    assert_one_line_error(result, "Recipe 'computed' cannot be read", where(recipes, "computed"),
                           "must be a literal")


def test_smoke_of_everything_fails_for_the_unreadable_files_and_runs_the_rest(recipes: Path, invoke) -> None:
    result = invoke("smoke", env={"COLUMNS": "1000"})
    assert result.exit_code == 1, result.output
    assert result.output.count("FAIL") == len(BROKEN) and "unreadable" in result.output
    assert next(line for line in result.output.splitlines() if " tiny-lm " in line).count("pass") == 1


def test_a_working_recipe_still_trains_next_to_a_broken_one(recipes: Path, tmp_path: Path, invoke,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(Path(catalog.__file__).parents[2] / "recipes" / "mlp.py", recipes / "mlp.py")
    monkeypatch.delitem(sys.modules, "dlnotes_recipe_mlp", raising=False)  # this copy is imported under that name
    result = invoke("run", "mlp", "--smoke", "--device", "cpu", "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert (latest_run(tmp_path / "runs", "mlp") / "checkpoint.pt").is_file()


def test_an_edited_copy_with_a_computed_default_runs_as_a_script(tmp_path: Path, invoke) -> None:
    """`dlnotes cp`, then `lr: float = 4e-3 / 2`: the copy's flags come from its imported Config."""
    assert invoke("cp", "mlp", tmp_path / "my.py").exit_code == 0
    copy = tmp_path / "my.py"
    source = copy.read_text()
    assert "    lr: float = 2e-3  #" in source
    copy.write_text(source.replace("    lr: float = 2e-3  #", "    lr: float = 4e-3 / 2  #"))

    def python(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(copy), *args], capture_output=True, text=True, timeout=300)

    shown = python("--help")
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    lr_help = " ".join(shown.stdout.split("--lr", 1)[1].split()[:12])  # the --lr entry, however it is wrapped
    assert "one-cycle peak learning rate" in lr_help and "[default: 0.002]" in lr_help, shown.stdout
    run = python("--epochs", "1", "--limit-batches", "2", "--device", "cpu", "--out", str(tmp_path / "runs"))
    assert run.returncode == 0, run.stderr
    config = json.loads((latest_run(tmp_path / "runs", "my") / "config.json").read_text())["config"]
    assert config["lr"] == 0.002


@pytest.mark.parametrize("recipe", sorted(catalog.all_recipes()))
def test_a_recipe_run_as_a_script_reads_what_the_catalog_reads(recipe: str) -> None:
    """`python recipes/ID.py` (flags from the imported Config) and `dlnotes run ID` (flags read with ast) agree:
    the same fields, types, defaults and help, the same TARGET, SMOKE and markers."""
    info = catalog.get(recipe)
    module = catalog.load_module(info)
    assert catalog.read_module(module, module.Config) == info
