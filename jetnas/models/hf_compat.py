"""Everything in jetnas that depends on transformers' internals, in one place (tested with transformers 5.17-5.24).

- the name of the cache argument and output field (`past_key_values` before 5.24, `cache` from 5.24 on);
- the per-layer caches `generate()` builds from `config.layer_types`, and the views that let our layers use them;
- RoPE tables from a config (any `rope_type` transformers knows);
- weight-initialisation helpers that respect transformers' "already loaded" flags.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# transformers 5.24 renamed the cache argument of forward() and the cache field of model outputs from
# `past_key_values` to `cache` (`generate()` passes `cache=`); our models accept both names and fill whichever
# field the installed version's outputs have
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(outputs) -> Cache | None:
    """The cache a model output carries, under either transformers' name for it."""
    return getattr(outputs, CACHE_FIELD)

# our short convolutions' names -> the conv-state slot of transformers' LinearAttentionLayer
_CONV_SLOTS = {"q": 0, "k": 1, "v": 2, "xBC": 0, "shift": 0}


def new_cache(config) -> DynamicCache:
    """The cache `generate()` would make: transformers' own per-layer layers, chosen from `config.layer_types`."""
    return DynamicCache(config=config)


class _ConvSlots:
    """Dict-like access to a LinearAttentionLayer's conv states by our conv names."""

    def __init__(self, layer):
        self._layer = layer

    def get(self, name: str, default=None):
        slot = _CONV_SLOTS[name]
        return self._layer.conv_states[slot] if self._layer.is_conv_states_initialized[slot] else default

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        # `value` is the new state (the last W-1 inputs). transformers keeps the last `kernel size` columns of
        # cat(old, given), with the kernel size fixed by the first call: passing the full new state always stores it.
        self._layer.update_conv_state(value, _CONV_SLOTS[name])


class LinearCacheView:
    """Our `RecurrentState` interface over transformers' `LinearAttentionLayer` (recurrent state in slot 0)."""

    def __init__(self, layer):
        self._layer = layer
        self.conv = _ConvSlots(layer)
        self.seq_length = 0

    @property
    def recurrent(self) -> torch.Tensor | None:
        return self._layer.recurrent_states[0] if self._layer.is_recurrent_states_initialized[0] else None

    @recurrent.setter
    def recurrent(self, value: torch.Tensor) -> None:
        self._layer.update_recurrent_state(value, 0)

    def get_seq_length(self) -> int:
        return self.seq_length


def layer_state(cache: Cache, layer_idx: int, is_attention: bool):
    """The state object our layer `layer_idx` reads and updates: transformers' attention cache layers already speak
    our KV protocol (`update`, `get_seq_length`); linear layers get a view."""
    layer = cache.layers[layer_idx]
    return layer if is_attention else LinearCacheView(layer)


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by every tensor of a transformers cache (KV, conv and recurrent states)."""
    total = 0
    for layer in cache.layers:
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        tensors += list(getattr(layer, "conv_states", {}).values()) + list(getattr(layer, "recurrent_states", {}).values())
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def rope_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for `config.rope_parameters` (default, llama3, yarn, ...)."""
    params = config.rope_parameters or {"rope_type": "default", "rope_theta": config.default_theta}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params["rope_theta"]
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_parameters['rope_type']={rope_type!r} is not known to this transformers version")
    return ROPE_INIT_FUNCTIONS[rope_type](config, None)


def init_param_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy `value` into `param` unless transformers marked it as loaded from a checkpoint."""
    if not getattr(param, "_is_hf_initialized", False):
        with torch.no_grad():
            param.copy_(value)


def _short_keys(keys: list[str], limit: int = 6) -> str:
    """`model.layers.6.mlp.up_proj.weight, ...`: the first `limit` keys, then how many more."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_pretrained(source, dtype: torch.dtype = torch.float32, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(source)`, strictly: a local directory's config.json is checked first
    (`jetnas.validation.read_model_config`: invalid JSON, negative sizes, `num_key_value_heads: 0`, strings where
    numbers belong), and a checkpoint that lacks weights the config declares is an error naming them (transformers
    would initialise them at random with a warning: a config declaring 8 layers over the weights of 6 loads, two
    layers random). Bad input raises `jetnas.validation.InputError` naming the file."""
    from pathlib import Path

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from jetnas.validation import InputError, read_model_config

    path = Path(str(source)).expanduser()
    local = path.is_dir() and "gguf_file" not in kwargs
    where = str(path / "config.json") if local else str(source)
    if local:
        read_model_config(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True, **kwargs)
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    except SafetensorError as err:
        raise InputError(f"{source}: its weights cannot be read ({err})") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise InputError(f"{where}: the config declares {len(missing)} weights that {source} does not hold "
                         f"({_short_keys(missing)}): it does not match the weights (num_hidden_layers?)")
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        raise InputError(f"{where}: weights of {source} have other shapes than the config declares "
                         f"({_short_keys([str(m[0] if isinstance(m, tuple) else m) for m in mismatched])})")
    return model
