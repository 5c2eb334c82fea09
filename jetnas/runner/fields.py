"""Typed fields for the stage recipes (`jetnas.runner.recipes`): declaring a field with its range (`arg`),
checking a value against its field (`check_value`: type, then range), and reading a recipe class as a command's
signature (`recipe_parameters`) and help (`field_docs`, from the `Args:` sections of the class docstrings).

Nothing here imports torch: the CLI reads recipes to build `--help`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from functools import cache


def arg(default=MISSING, *, min=None, above=None, max=None, below=None, choices=None):  # noqa: A002 - read as ranges
    """A recipe field with its default and the range its value must lie in: `min <= v`, `above < v`, `v <= max`,
    `v < below`, `v in choices` (for a list, every item; None passes: it means unset)."""
    limits = {"min": min, "above": above, "max": max, "below": below, "choices": choices}
    return field(default=default, metadata={k: v for k, v in limits.items() if v is not None})


def docstring_args(doc: str | None) -> dict[str, str]:
    """The `name: text` entries of the `Args:` section of a (dedented) docstring, continuation lines joined."""
    helps, in_args, last = {}, False, None
    for line in (doc or "").splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if in_args and line.startswith("        ") and last:  # continuation of the previous argument
            helps[last] += " " + line.strip()
        elif in_args and line.startswith("    ") and ":" in line:
            last, text = line.strip().split(":", 1)
            helps[last] = text.strip()
        elif in_args and line and not line.startswith(" "):
            in_args = False
    return helps


def _is_sequence(annotation) -> bool:
    return typing.get_origin(annotation) in (list, tuple, collections.abc.Sequence)


def _members(annotation) -> list:
    """The types a value of `annotation` may have (`int | None` -> [int, NoneType])."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}


def _as(kind, value):
    """`value` as a `kind` (returned unchanged) or a reason it is not one."""
    if kind is type(None):
        return (None, None) if value is None else (value, "must be unset")
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):  # a `bool | str` field on the command line
            return value.lower() == "true", None
        return (value, None) if isinstance(value, bool) else (value, "must be true or false")
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (value, "must be an integer")
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (value, None) if ok else (value, "must be a number")
    if _is_sequence(kind):
        item = (typing.get_args(kind) or (str,))[0]
        plural = {int: "integers", float: "numbers"}.get(item, "strings")
        if isinstance(value, str):  # the command line's and a YAML recipe's way to write a list: "4096,16384"
            try:
                return [item(part) for part in value.split(",") if part.strip()], None
            except ValueError:
                return value, f"must be comma-separated {plural}"
        if isinstance(value, int) and not isinstance(value, bool) and item is int:
            return [value], None
        if isinstance(value, (list, tuple)) and all(_as(item, v)[1] is None for v in value):
            return list(value), None
        return value, f"must be a list of {plural}"
    if isinstance(kind, type):
        return (value, None) if isinstance(value, kind) else (value, f"must be {_KIND.get(kind, kind.__name__)}")
    return value, None


def _spelled(choice) -> str:
    """A choice as a recipe or the command line writes it (`true`, not `True`)."""
    return str(choice).lower() if isinstance(choice, bool) else str(choice)


def _out_of_range(meta: dict, value) -> str | None:
    if "choices" in meta and value not in meta["choices"]:
        return f"must be one of {', '.join(_spelled(c) for c in meta['choices'])}"
    for key, test, words in (("min", lambda v, x: v >= x, ">="), ("above", lambda v, x: v > x, ">"),
                             ("max", lambda v, x: v <= x, "<="), ("below", lambda v, x: v < x, "<")):
        if key in meta and not test(value, meta[key]):
            return f"must be {words} {meta[key]}"
    return None


@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_value(cls: type[Recipe], name: str, value) -> tuple[object, str | None]:
    """`(value, problem)`: `value` of the field `name` of `cls` normalised (a comma-separated string or a single
    number for a list field becomes a list), and what is wrong with it (`"must be an integer"`, `"must be >= 1"`,
    ...), or None. A field that does not exist is a problem too."""
    spec = {f.name: f for f in fields(cls)}.get(name)
    if spec is None:
        return value, "is not an argument"
    problems = []
    for kind in _members(_hints(cls)[name]):
        converted, problem = _as(kind, value)
        if problem is None:
            value = converted
            break
        problems.append(problem)
    else:
        # the reason of the first type the field takes (an `int | None` field given "ten": "must be an integer")
        return value, problems[0]
    if value is None:
        return value, None
    for item in (value if isinstance(value, list) else [value]):
        problem = _out_of_range(spec.metadata, item)
        if problem:
            return value, problem
    return value, None


def field_docs(cls: type[Recipe]) -> dict[str, str]:
    """Each field's line of documentation: the `Args:` sections of `cls` and its bases (the subclass's wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__doc__" in vars(klass) and klass.__doc__:
            docs.update(docstring_args(inspect.cleandoc(klass.__doc__)))
    return {f.name: docs.get(f.name, "") for f in fields(cls)}


def recipe_parameters(cls: type[Recipe]) -> list[inspect.Parameter]:
    """The fields as keyword parameters, in the order a command lists them: the required ones, then those `cls`
    declares itself, then those it inherits (a search's own options before the options all searches share)."""
    hints = _hints(cls)
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in fields(base)}
    every = fields(cls)
    required = [f for f in every if f.default is MISSING and f.default_factory is MISSING]
    own = [f for f in every if f not in required and f.name not in inherited]
    rest = [f for f in every if f not in required and f.name in inherited]
    return [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name],
                              default=inspect.Parameter.empty if f in required else f.default)
            for f in required + own + rest]


def default_of(cls: type[Recipe], name: str):
    """The default of the field `name` of `cls`."""
    return {f.name: f.default for f in fields(cls)}[name]


@dataclass
class Recipe:
    """A stage's arguments; constructing one validates every field (types, ranges) and then `check()`."""

    def __post_init__(self):
        for f in fields(self):
            value, problem = check_value(type(self), f.name, getattr(self, f.name))
            if problem:
                raise ValueError(f"--{f.name.replace('_', '-')} {problem}, got {getattr(self, f.name)!r}")
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Checks that involve several fields (none by default)."""
