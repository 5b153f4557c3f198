"""The recipe catalog: finds recipe files and reads their metadata without importing them.

A recipe's docstring, TAGS, DATASET, TARGET, SMOKE, BENCH, DISTRIBUTED, TRAINS and Config fields are read with
`ast`, so `dlnotes list` and `--help` never import torch, and one recipe with a broken optional dependency
cannot break the listing. The module constants a recipe may set:

    TAGS = ("vision", "classification")   `dlnotes list --tag`
    DATASET = "MNIST-10k (offline)"        shown by `list` and `show`
    TARGET = ("test_acc", 0.985)           what a full default run must reach (`("val_loss", 1.6, "<=")`: at most)
    SMOKE = {"epochs": 1}                  the tiny run of `--smoke`, `dlnotes smoke` and the tests
    BENCH = {"prompt": "..."}              what `dlnotes bench` runs instead of the defaults (whose run would wait
                                           for a person); a recipe with BENCH and no TARGET is benched for speed
    DISTRIBUTED = True                     offers --nproc/--nnodes/--node-rank/--rdzv-endpoint
    TRAINS = False                         trains nothing to checkpoint: no --resume/--save-every/--keep

Every value must be a literal (a number, string, tuple, dict, True/False), and so must every Config default:
the catalog reads them without running the file. A file it cannot read (a syntax error, a computed default,
a field that is not int/float/str/bool, a malformed TARGET) is listed as unreadable, with file:line and why,
and the other recipes keep working. A recipe run as a script (`python my_copy.py`) is imported anyway, so
there its flags come from the Config class itself and a computed default such as `3e-3 / 2` is fine.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import io
import os
import sys
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from dlnotes.errors import UserError

FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
# the module constants the catalog reads
METADATA = ("TAGS", "DATASET", "TARGET", "ALSO_TARGETS", "SMOKE", "BENCH", "DISTRIBUTED", "TRAINS")


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
    # ALSO_TARGETS = (("knn_acc", 0.70),): further figures a default run must reach. TARGET stays the one that
    # times a run (bench's time to target) and picks best.pt; a run meets its targets only when it meets all.
    also_targets: tuple[Target, ...] = ()
    smoke: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] = field(default_factory=dict)
    fields: tuple[FieldSpec, ...] = ()
    can_predict: bool = False
    distributed: bool = False
    trains: bool = True  # False (TRAINS = False): no checkpoints, so no --resume/--save-every/--keep

    def field(self, name: str) -> FieldSpec | None:
        return next((f for f in self.fields if f.name == name), None)


def recipe_id(path: str | Path) -> str:
    """`recipes/cnn_mnist.py` is recipe `cnn-mnist`."""
    return Path(path).stem.replace("_", "-")


def recipes_dir() -> Path:
    """`$DLNOTES_RECIPES` when set (a folder of recipe files read instead of the shipped ones); otherwise the
    recipes inside the wheel (`dlnotes/recipes/`), or the repo's `recipes/` in an editable install."""
    if folder := os.environ.get("DLNOTES_RECIPES"):
        return Path(folder).expanduser()
    packaged = Path(__file__).parent / "recipes"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "recipes"


def all_recipes() -> dict[str, RecipeInfo]:
    """The readable recipes by id (the unreadable ones are in `unreadable()`)."""
    return _read_folder(recipes_dir())[0]


def unreadable() -> dict[str, str]:
    """Recipe files whose metadata cannot be read, by id: the one-line reason, starting with file:line."""
    return _read_folder(recipes_dir())[1]


@cache
def _read_folder(folder: Path) -> tuple[dict[str, RecipeInfo], dict[str, str]]:
    readable, broken = {}, {}
    for path in sorted(p for p in folder.glob("*.py") if not p.name.startswith("_")):
        try:
            readable[recipe_id(path)] = read_recipe(path)
        except UserError as err:
            broken[recipe_id(path)] = str(err)
    return readable, broken


def get(recipe: str) -> RecipeInfo:
    recipes = all_recipes()
    if recipe in recipes:
        return recipes[recipe]
    if recipe in unreadable():
        raise UserError(f"Recipe '{recipe}' cannot be read: {unreadable()[recipe]}")
    close = difflib.get_close_matches(recipe, list(recipes), n=1, cutoff=0.4)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(f"Unknown recipe '{recipe}'.{hint} See `dlnotes list`.")


def read_recipe(path: Path) -> RecipeInfo:
    """Read a recipe file's metadata from its syntax tree; nothing in it is executed. A file that cannot be
    read this way is a UserError naming file:line and what is wrong."""
    tree, source = _parse(path)
    constants = _module_constants(tree, path)
    nodes = _config_nodes(tree)
    comments = _line_comments(source, nodes.values())
    fields = []
    for name, node in nodes.items():
        if node.value is None:
            continue  # no default: not a flag (and Config() says so if it is needed)
        try:
            default = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError):
            written = ast.get_source_segment(source, node.value) or ast.unparse(node.value)
            raise UserError(f"{path}:{node.lineno}: Config.{name} = {written}: a default must be a literal "
                            "(the catalog reads it without running the file)") from None
        fields.append(FieldSpec(name, _field_type(path, name, node, ast.unparse(node.annotation)), default,
                                comments.get(node.lineno, "")))
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return _info(path, ast.get_docstring(tree), constants, fields, can_predict="predict" in functions)


def read_module(module: ModuleType, config_class: type) -> RecipeInfo:
    """The metadata of a recipe that is already imported (`python my_copy.py` calls `cli(Config, main)`): the
    flags come from the Config dataclass itself, so a computed default (`lr: float = 3e-3 / 2`) just works;
    their help text is still each field's line comment in the file."""
    path = Path(module.__file__ or sys.argv[0])
    tree, source = _parse(path)
    nodes = _config_nodes(tree, config_class.__name__)
    comments = _line_comments(source, nodes.values())
    fields = []
    for spec in dataclasses.fields(config_class):
        if not spec.init or spec.default is dataclasses.MISSING:
            continue  # as in the file: only fields with a plain default are flags
        node = nodes.get(spec.name)
        type_name = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))
        help_text = comments.get(node.lineno, "") if node else ""
        fields.append(FieldSpec(spec.name, _field_type(path, spec.name, node, type_name), spec.default, help_text))
    constants = {name: getattr(module, name) for name in METADATA if hasattr(module, name)}
    can_predict = callable(getattr(module, "predict", None))
    return _info(path, inspect.cleandoc(module.__doc__ or ""), constants, fields, can_predict=can_predict)


def read_target(path: Path) -> Target | None:
    """Only a recipe file's TARGET (a run needs nothing else, and its Config may have computed defaults)."""
    return read_targets(path)[0]


def read_targets(path: Path) -> tuple[Target | None, tuple[Target, ...]]:
    """A recipe file's TARGET and ALSO_TARGETS, read without running the file."""
    tree, _ = _parse(path)
    constants = _module_constants(tree, path, ("TARGET", "ALSO_TARGETS"))
    return _target(path, constants.get("TARGET")), _also_targets(path, constants.get("ALSO_TARGETS", ()))


def _info(path: Path, doc: str | None, constants: dict[str, Any], fields: list[FieldSpec],
          can_predict: bool) -> RecipeInfo:
    title, _, notes = (doc or recipe_id(path)).partition("\n")
    smoke, bench = constants.get("SMOKE", {}), constants.get("BENCH", {})
    for name, value in (("SMOKE", smoke), ("BENCH", bench)):
        if not isinstance(value, dict):
            raise UserError(f"{path}: {name} must be a dict of Config values, not {value!r}")
    return RecipeInfo(
        id=recipe_id(path),
        path=path,
        title=title.strip(),
        notes=notes.strip(),
        tags=tuple(constants.get("TAGS", ())),
        dataset=constants.get("DATASET", ""),
        target=_target(path, constants.get("TARGET")),
        also_targets=_also_targets(path, constants.get("ALSO_TARGETS", ())),
        smoke=dict(smoke),
        bench=dict(bench),
        fields=tuple(fields),
        can_predict=can_predict,
        distributed=bool(constants.get("DISTRIBUTED", False)),
        trains=bool(constants.get("TRAINS", True)),
    )


def _parse(path: Path) -> tuple[ast.Module, str]:
    try:
        source = path.read_text(encoding="utf-8")
        return ast.parse(source, filename=str(path)), source
    except SyntaxError as err:
        raise UserError(f"{path}:{err.lineno}: syntax error: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it: {err}") from None


def _module_constants(tree: ast.Module, path: Path, names: tuple[str, ...] = METADATA) -> dict[str, Any]:
    """The values of the module-level constants `names` that the file assigns; each must be a literal."""
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in names:
                try:
                    constants[name] = ast.literal_eval(node.value)
                except (ValueError, TypeError, SyntaxError):
                    raise UserError(f"{path}:{node.lineno}: {name} must be a literal (the catalog reads it "
                                    "without running the file)") from None
    return constants


def _target(path: Path, value: Any) -> Target | None:
    if value is None:
        return None
    try:
        metric, number, *direction = value
        if not isinstance(metric, str) or len(direction) > 1:
            raise ValueError
        return Target(metric, float(number), *direction)
    except (TypeError, ValueError):
        raise UserError(f"{path}: TARGET must be (metric, value) or (metric, value, '<='), "
                        f"not {value!r}") from None


def _also_targets(path: Path, value: Any) -> tuple[Target, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(item, (tuple, list)) for item in value):
        raise UserError(f"{path}: ALSO_TARGETS must be a tuple of (metric, value[, '<=']) tuples, not {value!r}")
    return tuple(_target(path, item) for item in value)


def _line_comments(source: str, nodes: Iterable[ast.stmt]) -> dict[int, str]:
    """The comment on each statement's lines, by line number. Only these statements' lines are tokenized (all
    of a file took most of `dlnotes list`'s time), and a one-line statement's comment is simply what follows
    its code."""
    lines = source.splitlines()
    comments = {}
    for node in nodes:
        if node.end_lineno == node.lineno:  # the column is in UTF-8 bytes
            rest = lines[node.lineno - 1].encode()[node.end_col_offset :].decode().strip()
            if rest.startswith("#"):
                comments[node.lineno] = rest.lstrip("#").strip()
            continue
        text = "\n".join(lines[node.lineno - 1 : node.end_lineno]).lstrip() + "\n"
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                comments[node.lineno + tok.start[0] - 1] = tok.string.lstrip("#").strip()
    return comments


def _config_nodes(tree: ast.Module, class_name: str = "Config") -> dict[str, ast.AnnAssign]:
    """The annotated fields of the module's Config class, by name (with their line numbers)."""
    config = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    body = config.body if config else []
    return {n.target.id: n for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _field_type(path: Path, name: str, node: ast.AnnAssign | None, type_name: str) -> type:
    if type_name not in FIELD_TYPES:
        where = f"{path}:{node.lineno}" if node else str(path)
        raise UserError(f"{where}: Config.{name} is {type_name}; flags are int, float, str or bool")
    return FIELD_TYPES[type_name]


def config_values(info: RecipeInfo, smoke: bool = False, bench: bool = False, **overrides: Any) -> dict[str, Any]:
    """A recipe's Config values: the defaults, then SMOKE (when `smoke`) or BENCH (when `bench`), then `overrides`
    for fields it has (so `device="cpu", out=...` can be passed to every recipe)."""
    values = {f.name: f.default for f in info.fields}
    if smoke:
        values |= info.smoke
    elif bench:
        values |= info.bench
    return values | {k: v for k, v in overrides.items() if info.field(k)}


def load_module(info: RecipeInfo) -> ModuleType:
    """Import a recipe file as module `dlnotes_recipe_<name>` (heavy imports happen here, not before)."""
    name = "dlnotes_recipe_" + info.path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(loaded.__file__ or "") == info.path:
        return loaded
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
