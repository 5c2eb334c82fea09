"""The functions behind `jetnas` subcommands (the table is in `jetnas.cli`): thin adapters from a command's flags to
a `jetnas.runner` call. Each returns a dict, printed as the last stdout line in JSON.

A stage's command takes its recipe's fields (`recipe_command`): the recipe dataclass is the one statement of the
stage's arguments, their types, ranges and help, for the command line and for `jetnas run` alike. Command modules
import nothing heavy at the top: the CLI imports all of them to build its parser.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from jetnas.runner.fields import Recipe, field_docs, recipe_parameters


def recipe_command(recipe: type[Recipe]) -> Callable[[Callable[[Recipe], dict]], Callable[..., dict]]:
    """Make `fn(recipe) -> dict` a command whose parameters are `recipe`'s fields: the returned function takes them
    as keywords (or in its signature's order), builds the recipe (which validates them) and calls `fn`. Its
    signature and its docstring (`fn`'s, then an `Args:` section from the recipe's field docs) are what the CLI
    builds the flags and their help from."""
    parameters = recipe_parameters(recipe)
    signature = inspect.Signature(parameters, return_annotation=dict)
    docs = field_docs(recipe)

    def wrap(fn: Callable[[Recipe], dict]) -> Callable[..., dict]:
        @functools.wraps(fn)
        def command(*args, **kwargs) -> dict:
            bound = signature.bind(*args, **kwargs)
            return fn(recipe(**bound.arguments))

        command.__signature__ = signature
        command.__annotations__ = {**{p.name: p.annotation for p in parameters}, "return": dict}
        args = "\n".join(f"    {p.name}: {docs[p.name]}" for p in parameters)
        command.__doc__ = f"{inspect.getdoc(fn)}\n\nArgs:\n{args}"
        return command

    return wrap

