"""The one grammar for a model's layer types: what `--layer-types` (convert, train), a search's placement and a
search's block candidates are written in.

| written | meaning |
|---|---|
| `attn`, `swa` | full / sliding-window softmax attention |
| `gdn`, `gla`, `mamba2`, `retnet`, `deltanet`, `jet` | a linear block with its default options |
| `jet-static-qk`, `jet-dyn-qk`, ... | a named JetBlock design variant (`JET_VARIANTS`, PostNAS step 3) |
| `TYPE:KEY=VALUE+KEY=VALUE` | a block with options, e.g. `jet:qk_conv=dynamic+v_conv=static`, `gla:num_heads=4` |
| `ENTRY*N` | N layers of ENTRY, e.g. `jet*14` |
| `jet-nemotron-2b` | a preset's whole layout (`jetnas.models.presets`) |

An `swa` layer's window is the `swa` entry of the block config (`--block-config '{"swa": {"window_size": W}}'`,
`--swa-window`); without one it is the teacher's own sliding window when its config has one in use, else
`DEFAULT_SWA_WINDOW` = 512 tokens (the super-network's default, so a layout searched with default settings is built
as it was searched), capped at half the teacher's positions (`jetnas.models.convert.default_swa_window`). Single
`swa` layers may have windows of their own: `{"swa": {"window_size": 1152, "layer_windows": {"14": 256}}}`.

In a comma-separated list, options may also be separated by commas: a piece that is `KEY=VALUE` (no `:`) continues
the entry before it, so `gdn,jet:qk_conv=dynamic,v_conv=static` is two entries. Options of `jet` are the released
config keys plus the design options (`qk_conv`, `v_conv`: none|static|dynamic; `use_decay`, `use_output_gate`:
true|false); options of the other blocks are their constructor's arguments. A block's options become its entry of
the model config's `efficient_attention_config`, so all layers of one type share them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from jetnas.layers import ATTENTION_TYPES, LINEAR_LAYERS
from jetnas.layers.jet import CONV_KINDS
from jetnas.models.presets import PRESETS

#: the window of `swa` layers when neither the recipe nor the teacher gives one (see the module docstring)
DEFAULT_SWA_WINDOW = 512
#: named JetBlock design variants (PostNAS step 3): where the dynamic convolution sits, and the static Q/K convs
JET_VARIANTS: dict[str, dict] = {
    # the design: dynamic conv on V, no conv on Q/K
    "jet": {},
    # the design plus Gated DeltaNet's static short convs on Q and K ("with static Q/K convolutions")
    "jet-static-qk": {"qk_conv": "static"},
    # the dynamic conv moved to Q/K, V keeps a static short conv
    "jet-dyn-qk": {"qk_conv": "dynamic", "v_conv": "static"},
    # dynamic convs everywhere
    "jet-dyn-qkv": {"qk_conv": "dynamic"},
    # no dynamic conv at all: a static conv on V only (Gated DeltaNet without its Q/K convs)
    "jet-static-v": {"v_conv": "static"},
}
#: options a `jet` block accepts: the released config keys and the design options
JET_OPTIONS = ("num_heads", "head_dim", "expand_v", "conv_size", "dconv_generator_reduction", "norm_eps", "qk_conv",
               "v_conv", "use_decay", "use_output_gate")
_REPEAT = re.compile(r"^(.+)\*(\d+)$")


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def block_options(block_type: str) -> tuple[str, ...]:
    """The option names a block of `block_type` accepts."""
    if block_type == "jet":
        return JET_OPTIONS
    params = inspect.signature(LINEAR_LAYERS[block_type].__init__).parameters
    return tuple(p for p in params if p not in ("self", "hidden_size", "backend"))


@dataclass(frozen=True)
class BlockSpec:
    """One linear block as written: a display name, the layer type, and its options (the block's entry of the model
    config's `efficient_attention_config`). The block searches' candidates are these."""

    name: str
    block_type: str
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.block_type not in LINEAR_LAYERS:
            raise ValueError(f"candidate {self.name!r}: {self.block_type!r} is not a linear block; known: "
                             f"{', '.join(LINEAR_LAYERS)}")
        allowed = block_options(self.block_type)
        for key, value in self.options:
            if key not in allowed:
                raise ValueError(f"candidate {self.name!r}: {self.block_type} has no option {key!r}; its options: "
                                 f"{', '.join(allowed)}")
            if key in ("qk_conv", "v_conv") and value not in CONV_KINDS:
                raise ValueError(f"candidate {self.name!r}: {key}={value!r} must be one of {', '.join(CONV_KINDS)}")
            if key in ("use_decay", "use_output_gate") and not isinstance(value, bool):
                raise ValueError(f"candidate {self.name!r}: {key}={value!r} must be true or false")

    @property
    def kwargs(self) -> dict:
        return dict(self.options)

    def block_config(self) -> dict:
        """`{block_type: options}` for `efficient_attention_config` (empty without options)."""
        return {self.block_type: self.kwargs} if self.options else {}

    def with_options(self, name: str, **options) -> BlockSpec:
        """The same block with more (or overriding) options, under a new name."""
        return BlockSpec(name, self.block_type, tuple({**self.kwargs, **options}.items()))

    def written(self) -> str:
        """The written form `parse_block` reads back to this block type with exactly these options: the name's head
        (a block type or JetBlock variant) and every option. A candidate changed after parsing (block selection's
        `matched_shape` adds the teacher's shape under the same name) keeps its options this way where its name
        alone would lose them."""
        head = self.name.partition(":")[0]
        if not self.options:
            return head
        def form(value) -> str:
            return ("true" if value else "false") if isinstance(value, bool) else str(value)
        return f"{head}:" + "+".join(f"{key}={form(value)}" for key, value in self.options)

    @property
    def slug(self) -> str:
        """A file-system-safe form of the name (a search candidate's directory)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip("-")

    def describe(self) -> dict:
        return {"name": self.name, "block_type": self.block_type, "options": self.kwargs}


def parse_block(text: str) -> BlockSpec:
    """One linear block from its written form (see the module docstring)."""
    text = text.strip()
    head, sep, rest = text.partition(":")
    if head in JET_VARIANTS:
        block_type, options = "jet", dict(JET_VARIANTS[head])
    elif head in LINEAR_LAYERS:
        block_type, options = head, {}
    elif head in ATTENTION_TYPES:
        raise ValueError(f"{head!r} is softmax attention, not a linear block candidate")
    else:
        raise ValueError(f"unknown block candidate {head!r} in {text!r}; use a linear block "
                         f"({', '.join(LINEAR_LAYERS)}), a JetBlock variant ({', '.join(JET_VARIANTS)}) or "
                         f"TYPE:KEY=VALUE+KEY=VALUE")
    if sep:
        for item in (p.strip() for p in rest.replace(",", "+").split("+")):
            key, eq, value = item.partition("=")
            if not eq or not key or not value:
                raise ValueError(f"candidate {text!r}: option {item!r} is not KEY=VALUE")
            options[key.strip()] = _parse_value(value.strip())
    name = head if not sep else f"{head}:" + "+".join(p.strip() for p in rest.replace(",", "+").split("+"))
    return BlockSpec(name, block_type, tuple(options.items()))


def split_entries(spec: str) -> list[str]:
    """Split a comma-separated list where a `KEY=VALUE` piece (no `:`) continues the entry before it."""
    entries: list[str] = []
    for piece in (p.strip() for p in spec.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece:
            if not entries or ":" not in entries[-1]:
                raise ValueError(f"option {piece!r} in {spec!r} follows no TYPE:OPTIONS entry")
            entries[-1] += "+" + piece
        else:
            entries.append(piece)
    return entries


def merge_block_configs(*configs: Mapping | None) -> dict:
    """Merge `efficient_attention_config` overrides: later ones win per key within each block type."""
    out: dict[str, dict] = {}
    for config in configs:
        for block, options in (config or {}).items():
            if not isinstance(options, Mapping):
                raise ValueError(f"block config entry {block!r} must be a mapping of options, got {options!r}")
            out[block] = {**out.get(block, {}), **options}
    return out


def resolve_layer_types(spec: str | Sequence[str], num_layers: int | None) -> tuple[list[str], dict]:
    """Per-layer types and the block options they imply, from `attn,swa,jet-dyn-qk*12,...` (see the module
    docstring); a preset name gives its layout.

    Returns `(layer types, efficient_attention_config overrides)`. All layers of one type share its options, so two
    different variants of one type in one model are an error, as is a count other than `num_layers` (None: any
    count, for a spec checked before the model's depth is known).
    """
    if isinstance(spec, str) and spec in PRESETS:
        types = list(PRESETS[spec]["block_types"])
        if num_layers is not None and len(types) != num_layers:
            raise ValueError(f"preset {spec!r} has {len(types)} layers but the model has {num_layers}")
        return types, {}
    entries = split_entries(spec) if isinstance(spec, str) else [str(s).strip() for s in spec]
    types: list[str] = []
    config: dict[str, dict] = {}
    owner: dict[str, str] = {}
    for entry in entries:
        m = _REPEAT.match(entry)
        body, count = (m.group(1), int(m.group(2))) if m else (entry, 1)
        if body in ATTENTION_TYPES:
            types += [body] * count
            continue
        head = body.partition(":")[0]
        if head not in LINEAR_LAYERS and head not in JET_VARIANTS:
            raise ValueError(f"unknown layer type {head!r} in {spec!r}; use {', '.join(ATTENTION_TYPES)}, a linear "
                             f"block ({', '.join(LINEAR_LAYERS)}), a JetBlock variant ({', '.join(JET_VARIANTS)}), "
                             f"TYPE:KEY=VALUE+KEY=VALUE, ENTRY*N, or a preset ({', '.join(PRESETS)})")
        block = parse_block(body)
        if block.block_type in owner and config.get(block.block_type, {}) != block.kwargs:
            raise ValueError(f"layer types {spec!r} mix two variants of {block.block_type!r} "
                             f"({owner[block.block_type]!r} and {block.name!r}); all {block.block_type} layers of a "
                             f"model share one configuration")
        owner[block.block_type] = block.name
        if block.options:
            config[block.block_type] = block.kwargs
        types += [block.block_type] * count
    if num_layers is not None and len(types) != num_layers:
        raise ValueError(f"layer types {spec!r} give {len(types)} layers but the model has {num_layers}")
    return types, config


def parse_layer_types(spec: str | Sequence[str], num_layers: int) -> list[str]:
    """The per-layer block types of `spec` (see `resolve_layer_types`) when it implies no block options; a spec
    with options (`jet-dyn-qk`, `gla:num_heads=4`) is refused rather than its options dropped."""
    types, config = resolve_layer_types(spec, num_layers)
    if config:
        raise ValueError(f"layer types {spec!r} carry block options {config}: use resolve_layer_types, which "
                         f"returns them")
    return types
