"""The recipe catalog: finds recipe files and reads their metadata without importing them.

A recipe's docstring, TAGS, DATASET, TARGET, SMOKE and Config fields are read with `ast`, so `dlnotes list`
and `--help` never import torch, and one recipe with a broken optional dependency cannot break the listing.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import io
import sys
import tokenize
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from dlnotes.errors import UserError

FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class FieldSpec:
    """One Config field: it becomes one command-line flag."""

    name: str
    type: type
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Target:
    """What a full default run must reach: `TARGET = ("test_acc", 0.985)` (higher is better, the default) or
    `TARGET = ("val_loss", 1.6, "<=")` (lower is better)."""

    metric: str
    value: float
    direction: str = ">="  # ">=": higher is better; "<=": lower is better

    def __post_init__(self) -> None:
        if self.direction not in (">=", "<="):
            raise ValueError(f"TARGET direction must be '>=' or '<=', not {self.direction!r}")

    def met(self, value: float) -> bool:
        return value >= self.value if self.direction == ">=" else value <= self.value

    def better(self, new: float, old: float | None) -> bool:
        """`new` improves on `old` (None: nothing yet) in the target's direction."""
        if old is None:
            return True
        return new > old if self.direction == ">=" else new < old

    def __str__(self) -> str:
        return f"{self.metric} {'≥' if self.direction == '>=' else '≤'} {self.value:g}"

    def as_list(self) -> list[Any]:
        return [self.metric, self.value, self.direction]


@dataclass(frozen=True)
class RecipeInfo:
    id: str
    path: Path
    title: str
    notes: str
    tags: tuple[str, ...] = ()
    dataset: str = ""
    target: Target | None = None
    smoke: dict[str, Any] = field(default_factory=dict)
    fields: tuple[FieldSpec, ...] = ()
    can_predict: bool = False
    distributed: bool = False

    def field(self, name: str) -> FieldSpec | None:
        return next((f for f in self.fields if f.name == name), None)


def recipe_id(path: str | Path) -> str:
    """`recipes/cnn_mnist.py` is recipe `cnn-mnist`."""
    return Path(path).stem.replace("_", "-")


def recipes_dir() -> Path:
    """Recipes ship inside the wheel as `dlnotes/recipes/`; an editable install reads the repo's `recipes/`."""
    packaged = Path(__file__).parent / "recipes"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "recipes"


@cache
def all_recipes() -> dict[str, RecipeInfo]:
    paths = sorted(p for p in recipes_dir().glob("*.py") if not p.name.startswith("_"))
    return {info.id: info for info in map(read_recipe, paths)}


def get(recipe: str) -> RecipeInfo:
    recipes = all_recipes()
    if recipe in recipes:
        return recipes[recipe]
    close = difflib.get_close_matches(recipe, list(recipes), n=1, cutoff=0.4)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(f"Unknown recipe '{recipe}'.{hint} See `dlnotes list`.")


def read_recipe(path: Path) -> RecipeInfo:
    """Read a recipe file's metadata from its syntax tree; nothing in it is executed."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    doc = ast.get_docstring(tree) or recipe_id(path)
    title, _, notes = doc.partition("\n")
    constants = _module_constants(tree)
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    target = constants.get("TARGET")
    return RecipeInfo(
        id=recipe_id(path),
        path=path,
        title=title.strip(),
        notes=notes.strip(),
        tags=tuple(constants.get("TAGS", ())),
        dataset=constants.get("DATASET", ""),
        target=Target(target[0], float(target[1]), *target[2:]) if target else None,
        smoke=dict(constants.get("SMOKE", {})),
        fields=tuple(_config_fields(tree, _line_comments(source))),
        can_predict="predict" in functions,
        distributed=bool(constants.get("DISTRIBUTED", False)),
    )


def _module_constants(tree: ast.Module) -> dict[str, Any]:
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                try:
                    constants[name] = ast.literal_eval(node.value)
                except ValueError:
                    pass  # not a literal (e.g. a computed constant): not catalog metadata
    return constants


def _line_comments(source: str) -> dict[int, str]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens if tok.type == tokenize.COMMENT}


def _config_fields(tree: ast.Module, comments: dict[int, str]) -> list[FieldSpec]:
    config = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config"), None)
    if config is None:
        return []
    fields = []
    for node in config.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value):
            continue
        type_name = ast.unparse(node.annotation)
        if type_name not in FIELD_TYPES:
            raise SyntaxError(f"Config.{node.target.id}: flags are int, float, str or bool, not {type_name}")
        fields.append(
            FieldSpec(
                name=node.target.id,
                type=FIELD_TYPES[type_name],
                default=ast.literal_eval(node.value),
                help=comments.get(node.lineno, ""),
            )
        )
    return fields


def config_values(info: RecipeInfo, smoke: bool = False, **overrides: Any) -> dict[str, Any]:
    """A recipe's Config values: the defaults, then SMOKE (when `smoke`), then `overrides` for fields it has
    (so `device="cpu", out=...` can be passed to every recipe)."""
    values = {f.name: f.default for f in info.fields}
    if smoke:
        values |= info.smoke
    return values | {k: v for k, v in overrides.items() if info.field(k)}


def load_module(info: RecipeInfo) -> ModuleType:
    """Import a recipe file as module `dlnotes_recipe_<name>` (heavy imports happen here, not before)."""
    name = "dlnotes_recipe_" + info.path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, info.path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up while the class is being built
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        del sys.modules[name]
        raise UserError(f"Recipe '{info.id}' needs a package that is not installed: {err}") from err
    return module
