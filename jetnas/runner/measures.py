"""The decode-throughput measurement of a search candidate, named in a recipe by `measure` (never an import path: a
recipe is data, and must not be able to run arbitrary code).

Names:

- `replicated` (the default): `jetnas.bench.measure.replicated_decode_throughput`, the protocol of `jetnas bench`
  and the GPU benchmark (one prompt prefilled, its cache copied into every row, then the batch decodes);
- `none`: measure nothing but the cache size (the block search only; the shape search chooses by throughput);
- a plugin: an installed package declares `[project.entry-points."jetnas.measures"] NAME = "module:function"`;
- in-process, `register_measure(NAME, function)` (notebooks, tests).

A measurement is a function `(model, batch_size, context_length, new_tokens, device) -> dict` returning at least
`decode_tokens_per_s` (and ideally `prefill_tokens_per_s` and `cache_bytes_per_sequence`), like
`replicated_decode_throughput`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

DEFAULT = "replicated"
NONE = "none"
ENTRY_POINT_GROUP = "jetnas.measures"
_REGISTERED: dict[str, Callable] = {}


def _replicated() -> Callable:
    from jetnas.bench.measure import replicated_decode_throughput

    return replicated_decode_throughput


#: the measurements jetnas ships, imported only when used (they need torch)
BUILTIN: dict[str, Callable[[], Callable]] = {DEFAULT: _replicated}


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def register_measure(name: str, fn: Callable) -> None:
    """Make `fn` available as `measure: NAME` in this process."""
    if name in BUILTIN or name == NONE:
        raise ValueError(f"measure name {name!r} is built in; choose another")
    _REGISTERED[name] = fn


def measure_names() -> list[str]:
    """Every name a recipe may give: the built-in ones, `none`, those registered here and the plugins'."""
    return [*BUILTIN, NONE, *_REGISTERED, *(n for n in _entry_points() if n not in _REGISTERED)]


def check_measure(name: str, required: bool) -> None:
    """Refuse a name that is not a measurement (or `none` where the measurement is required), with the valid
    names; imports nothing heavy, so recipes are checked before anything loads."""
    if name == NONE and required:
        raise ValueError("the hardware search chooses by measured decode throughput: --measure none is not allowed")
    if name not in measure_names():
        raise ValueError(f"--measure {name!r} is not a known decode measurement; known: {', '.join(measure_names())} "
                         f"(plugins add names through the {ENTRY_POINT_GROUP!r} entry-point group)")


def resolve_measure(name: str, required: bool) -> Callable | None:
    """The function `name` names (see the module docstring); None for `none`."""
    check_measure(name, required)
    if name == NONE:
        return None
    if name in BUILTIN:
        return BUILTIN[name]()
    if name in _REGISTERED:
        return _REGISTERED[name]
    return _entry_points()[name].load()


def measure_name(fn: Callable | None) -> str:
    """How a search's records name its measurement: the function's `module:qualname` (what decides whether a
    finished candidate is reused), `none` for no measurement."""
    if fn is None:
        return NONE
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
