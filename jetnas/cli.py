"""The `jetnas` command line: one entry point, subcommands from one table, flags from function signatures.

Each subcommand is a plain function: its docstring's first paragraph is the help text, its parameters become
kebab-case flags (`max_new_tokens` -> `--max-new-tokens`), their annotations give the types, defaults of None
mean "unset". A parameter with no default is required; a positional-only one (before `/`) is a positional
argument. Lists (`list[int]`, `Sequence[int]`) are comma-separated; a `tuple[str, ...]` parameter is a flag that can
be repeated. A stage's command takes its typed recipe's fields (`jetnas.commands.recipe_command`), so the recipe
is where its flags, types and help are written.
"""

from __future__ import annotations

import argparse
import collections.abc
import importlib
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable

from jetnas.runner.fields import docstring_args
from jetnas.runner.threads import apply_threads

# name -> "module:function"; modules are imported only when their command runs, so `jetnas --help` is instant
COMMANDS: dict[str, str] = {
    "bench": "jetnas.commands.bench:bench",
    "convert": "jetnas.commands.models:convert",
    "eval": "jetnas.commands.evaluate:evaluate",
    "generate": "jetnas.commands.models:generate",
    "info": "jetnas.cli:info",
    "run": "jetnas.commands.run:run",
    "search blocks": "jetnas.commands.stages:search_blocks",
    "search hardware": "jetnas.commands.stages:search_hardware",
    "search placement": "jetnas.commands.nas:search_placement",
    "supernet": "jetnas.commands.nas:supernet",
    "train": "jetnas.commands.stages:train",
}


GROUP_HELP = {"search": "PostNAS searches run on a trained super-network"}


def info() -> dict:
    """Show versions, the kernel backends usable here, the CPU threads torch uses and why (the rule of
    `jetnas.runner.threads`), and the registered layer types (last line: JSON)."""
    import torch
    import transformers

    import jetnas
    from jetnas.layers import LAYER_TYPES
    from jetnas.ops.backend import fla_usable, triton_usable
    from jetnas.runner import threads

    report = {
        "jetnas": jetnas.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "triton_usable": triton_usable(),
        "fla_usable": fla_usable(),
        "threads": torch.get_num_threads(),
        "threads_rule": (threads.applied or threads.choose_threads())[1],
        "layer_types": list(LAYER_TYPES),
    }
    for key, value in report.items():
        print(f"{key:>14}: {value}", file=sys.stderr)
    return report


def _resolve(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _optional(annotation):
    """`X` of `X | None`, else the annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _list_item(annotation):
    """The item type of a comma-separated list parameter (`list[int]`, `Sequence[int]`, optional or not), or None."""
    annotation = _optional(annotation)
    if typing.get_origin(annotation) in (list, collections.abc.Sequence):
        return (typing.get_args(annotation) or (str,))[0]
    return None


def _flag_type(annotation):
    """argparse `type` for an annotation like `int`, `str | None`; anything but int, float, str, bool is a string."""
    annotation = _optional(annotation)
    if annotation is bool:
        return bool
    return annotation if annotation in (int, float, str) else str


class _CommaList(argparse.Action):
    """A comma-separated list flag (`--context 4096,16384`), its items converted to the item type; a bad item is
    refused naming the flag."""

    def __init__(self, option_strings, dest, item=str, **kwargs):
        self.item = item
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, text, option_string=None):
        try:
            value = [self.item(part) for part in text.split(",") if part != ""]
        except ValueError:
            plural = {int: "integers", float: "numbers"}.get(self.item, "values")
            raise argparse.ArgumentError(None, f"{option_string} must be comma-separated {plural}, got {text!r}")
        setattr(namespace, self.dest, value)


def _doc_summary(fn: Callable) -> str:
    return (inspect.getdoc(fn) or "").split("\n\n")[0]


def _param_help(fn: Callable) -> dict[str, str]:
    """`name: text` lines of an `Args:` section of the docstring."""
    return docstring_args(inspect.getdoc(fn))


def _shown(default) -> str:
    """A default as the user would type it (a list comma-separated)."""
    return ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jetnas",
        description="PostNAS for your pretrained model: search, train, evaluate and serve Jet-Nemotron-style hybrids.",
    )
    parser.add_argument("--autotune-configs", dest="_autotune_configs", type=int, default=None, metavar="N",
                        help="benchmark at most N of each Triton kernel's autotuning configs (a fast start on a fresh "
                             "GPU machine, somewhat slower kernels: for short runs, not for throughput measurements)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, target in COMMANDS.items():
        fn = _resolve(target)
        where = sub
        if " " in name:  # "search placement": a command group and its subcommand
            group, name = name.split(" ", 1)
            if group not in groups:
                group_parser = sub.add_parser(group, help=GROUP_HELP.get(group, ""))
                groups[group] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            where = groups[group]
        p = where.add_parser(name, help=_doc_summary(fn), description=_doc_summary(fn))
        hints, helps = typing.get_type_hints(fn), _param_help(fn)
        for pname, param in inspect.signature(fn).parameters.items():
            flag = "--" + pname.replace("_", "-")
            annotation = hints.get(pname, str)
            kind = _flag_type(annotation)
            required = param.default is inspect.Parameter.empty
            default = None if required else param.default
            # argparse %-formats help strings: a literal "5%" in a docstring must reach it as "5%%"
            help_text = helps.get(pname, "").replace("%", "%%")
            shown = "" if required or default is None else f" (default: {_shown(default)})"
            if param.kind is inspect.Parameter.POSITIONAL_ONLY:
                p.add_argument(pname, type=kind, help=help_text)
            elif typing.get_origin(_optional(annotation)) is tuple:
                p.add_argument(flag, dest=pname, action="append", default=None,
                               help=help_text + " (repeatable)")
            elif kind is bool:
                p.add_argument(flag, dest=pname, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
            elif _list_item(annotation) is not None:
                p.add_argument(flag, dest=pname, action=_CommaList, item=_list_item(annotation), required=required,
                               default=default, help=help_text + shown)
            else:
                p.add_argument(flag, dest=pname, type=kind, required=required, default=default,
                               help=help_text + shown)
        p.set_defaults(_target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command `argv` names; returns the exit status (argparse's for --help and bad flags, 2 for a user
    error, printed as one line)."""
    parser = build_parser()
    try:
        args = vars(parser.parse_args(argv))
    except SystemExit as done:  # --help, or a bad flag argparse has already explained
        return done.code if isinstance(done.code, int) else 2
    target = args.pop("_target", None)
    autotune_configs = args.pop("_autotune_configs", None)
    args.pop("command", None)
    args.pop("subcommand", None)
    if target is None:
        parser.print_help()
        return 0
    fn = _resolve(target)
    positional = [args.pop(name) for name, param in inspect.signature(fn).parameters.items()
                  if param.kind is inspect.Parameter.POSITIONAL_ONLY]
    try:
        # before the command imports torch, which reads its thread count once
        apply_threads()
        if autotune_configs is not None:
            if autotune_configs < 1:
                raise ValueError(f"--autotune-configs={autotune_configs} must be >= 1")
            from jetnas.ops.autotune import limit_autotuning

            limit_autotuning(autotune_configs)
        result = fn(*positional, **args)
    except (ValueError, FileNotFoundError) as err:
        # user errors: one clear line, no traceback
        print(f"jetnas: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # Ctrl-C, or SIGTERM between training steps (`jetnas.train.trainer.TrainingStopped`; a training stage saves
        # its last completed step first): the shell's status for an interruption, and no traceback
        print(f"jetnas: {err or 'interrupted'}", file=sys.stderr)
        return 130
    if isinstance(result, dict):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
