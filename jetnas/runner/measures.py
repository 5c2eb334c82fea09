"""The decode-throughput measurement of a search candidate, named in a recipe by `measure`.

None is the default protocol, `jetnas.bench.measure.replicated_decode_throughput` (the one of `jetnas bench` and
the GPU benchmark: one prompt prefilled, its cache copied into every row); "none" measures nothing (where the
measurement is optional); "MODULE:FUNCTION" imports a function with the same signature.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

DEFAULT = "jetnas.bench.measure:replicated_decode_throughput"


def resolve_measure(measure: str | None, required: bool) -> Callable | None:
    """The decode-throughput function `measure` names (see the module docstring); None for "none"."""
    if measure is None:
        try:
            from jetnas.bench.measure import replicated_decode_throughput
        except ImportError as err:
            raise ImportError(f"decode throughput needs jetnas.bench.measure.replicated_decode_throughput, which "
                              f"cannot be imported here ({err}); pass --measure MODULE:FUNCTION"
                              + ("" if required else " or --measure none to skip the decode measurement")) from err
        return replicated_decode_throughput
    if measure == "none":
        if required:
            raise ValueError("the hardware search chooses by measured decode throughput: --measure none is not allowed")
        return None
    module, sep, name = measure.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--measure must be MODULE:FUNCTION or none, got {measure!r}")
    try:
        imported = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"--measure {measure!r}: cannot import {module!r} ({err}); is it on PYTHONPATH?") from err
    fn = getattr(imported, name, None)
    if not callable(fn):
        raise ValueError(f"--measure {measure!r}: {module} has no function {name!r}")
    return fn


def measure_name(measure: str | None) -> str:
    """How a search's records name its measurement (part of what decides whether a finished candidate is reused)."""
    return DEFAULT if measure is None else str(measure)
