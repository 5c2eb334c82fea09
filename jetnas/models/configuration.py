"""`JetNemotronConfig`: the configuration of a hybrid model (any mix of attention and zoo blocks per layer).

It accepts the released Jet-Nemotron `config.json` unchanged: `layer_types` of `"attn" | "swa" | "jet"` and
`efficient_attention_config = {"jet": {num_heads, head_dim, expand_v, conv_size, dconv_generator_reduction,
norm_eps, mode, ...}, "swa": {window_size}}`. Any zoo block type may appear per layer; its keyword arguments come
from `efficient_attention_config[type]` (the block's own argument names), with defaults derived from the model.

transformers 5 reserves `layer_types` for the cache kinds it knows (`full_attention`, `sliding_attention`,
`linear_attention`) and builds each layer's cache from it. So the block of each layer is kept in `block_types`,
and `layer_types` holds the matching cache kinds: `generate()` then builds the right per-layer caches by itself.
"""

from __future__ import annotations

import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

from jetnas.layers import ATTENTION_TYPES, LAYER_TYPES, LINEAR_LAYERS
from jetnas.validation import InputError, check_block_config, check_bool, check_int, check_number, check_str, show

# transformers' cache kind for each of our block types
CACHE_KINDS = {"attn": "full_attention", "swa": "sliding_attention", **{t: "linear_attention" for t in LINEAR_LAYERS}}
HF_CACHE_KINDS = set(CACHE_KINDS.values())
# JetBlock design options (PostNAS step 3 ablations, `jetnas.layers.jet.JetBlock`'s own argument names); absent in
# released configs, where they keep the JetBlock's defaults. The released "jet" keys (and these) are checked by
# `jetnas.validation.check_block_config`; "mode" and "dconv_implementation" are kernel choices we make ourselves.
_JET_DESIGN_KEYS = ("qk_conv", "v_conv", "use_decay", "use_output_gate")


@strict
class JetNemotronConfig(PretrainedConfig):
    """Configuration of `JetNemotronForCausalLM`.

    Defaults are Jet-Nemotron-2B's (Qwen2.5-1.5B dimensions). Besides the Qwen2 fields:

    Args:
        block_types: the block of each layer, from `jetnas.layers.LAYER_TYPES`. (The released format's
            `layer_types` list of block names is accepted too and moved here.)
        efficient_attention_config: per block type, its keyword arguments: `{"swa": {"window_size": W}, "jet":
            {released JetBlock keys}, "gdn": {...}}`. `swa` layers may have windows of their own:
            `{"swa": {"window_size": W, "layer_windows": {"8": 256}}}` (a jetnas extension: the released code reads
            `window_size` only); `sliding_window` is then the largest window, which transformers' caches keep.
        attention_bias: bias on the q/k/v projections of attention layers (Qwen2: True, Llama/Qwen3: False).
        attention_out_bias: bias on o_proj of attention layers (Llama's `attention_bias` also sets this).
        qk_norm: per-head RMS norm on q and k (Qwen3).
        mlp_bias: biases in the SwiGLU MLP.
    """

    model_type = "jet_nemotron"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta = 1_000_000.0

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = True
    attention_out_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    attention_dropout: float | int = 0.0
    block_types: list[str] | None = None
    layer_types: list[str] | None = None
    efficient_attention_config: dict | None = None
    sliding_window: int | None = None
    number_of_conv_states: int = 3
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        self._check_fields()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.efficient_attention_config = dict(self.efficient_attention_config or {})
        # the released format: block names in `layer_types`
        if self.layer_types is not None and not set(self.layer_types) <= HF_CACHE_KINDS:
            if self.block_types is not None and list(self.block_types) != list(self.layer_types):
                raise ValueError(f"layer_types={self.layer_types} and block_types={self.block_types} disagree")
            self.block_types = list(self.layer_types)
        if self.block_types is None:
            self.block_types = ["attn"] * self.num_hidden_layers
        self._check()
        self.layer_types = [CACHE_KINDS[t] for t in self.block_types]
        if "swa" in self.block_types:  # the largest window: what a transformers cache's sliding layers keep
            swa = self.efficient_attention_config["swa"]
            self.sliding_window = max([int(swa["window_size"]), *swa.get("layer_windows", {}).values()])
        # a released config points at remote-code files we neither need nor ship
        kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)

    def _check_fields(self) -> None:
        """Types and ranges of the fields, before anything divides by one or builds a layer from it: an
        `InputError` (a ValueError) naming the field and its value."""
        where = "JetNemotronConfig"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "number_of_conv_states"):
            check_int(getattr(self, name), name, where)
        for name in ("num_key_value_heads", "head_dim", "sliding_window"):
            check_int(getattr(self, name), name, where, allow_none=True)
        check_number(self.rms_norm_eps, "rms_norm_eps", where, minimum=0.0)
        check_number(self.initializer_range, "initializer_range", where, minimum=0.0, inclusive=True)
        check_number(self.attention_dropout, "attention_dropout", where, minimum=0.0, inclusive=True, maximum=1.0)
        for name in ("use_cache", "tie_word_embeddings", "attention_bias", "attention_out_bias", "qk_norm",
                     "mlp_bias"):
            check_bool(getattr(self, name), name, where)
        check_str(self.hidden_act, "hidden_act", where)
        for name in ("block_types", "layer_types"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(t, str)
                                                                                     for t in value)):
                raise InputError(f"{where}: {name}={show(value)}: must be a list of layer type names")
        if self.rope_parameters is not None and not isinstance(self.rope_parameters, dict):
            raise InputError(f"{where}: rope_parameters={show(self.rope_parameters)}: must be an object")
        self.efficient_attention_config = check_block_config(self.efficient_attention_config,
                                                             f"{where}: efficient_attention_config")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            for token in value if isinstance(value, list) else [value]:
                if token is not None and check_int(token, name, where, minimum=0) >= self.vocab_size:
                    raise InputError(f"{where}: {name}={show(value)}: beyond the vocabulary (vocab_size="
                                     f"{self.vocab_size})")

    def _check(self) -> None:
        if len(self.block_types) != self.num_hidden_layers:
            raise InputError(f"JetNemotronConfig: block_types has {len(self.block_types)} entries but "
                             f"num_hidden_layers={self.num_hidden_layers}")
        for i, t in enumerate(self.block_types):
            if t not in LAYER_TYPES:
                raise InputError(f"JetNemotronConfig: block_types[{i}]={t!r} is not a known block; known: "
                                 f"{', '.join(LAYER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(f"JetNemotronConfig: num_attention_heads={self.num_attention_heads} must be a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if "swa" in self.block_types:
            window = self.efficient_attention_config.get("swa", {}).get("window_size")
            if not isinstance(window, int) or window < 1:
                raise InputError(f"JetNemotronConfig: efficient_attention_config['swa']['window_size'] must be an "
                                 f"int >= 1 when a layer is 'swa', got {window!r}")
        for key in self.efficient_attention_config.get("swa", {}).get("layer_windows", {}):
            i = int(key)
            if i >= self.num_hidden_layers or self.block_types[i] != "swa":
                found = self.block_types[i] if i < self.num_hidden_layers else \
                    f"beyond the {self.num_hidden_layers} layers"
                raise InputError(f"JetNemotronConfig: efficient_attention_config['swa']['layer_windows'] names layer "
                                 f"{i}, which is not 'swa' ({found})")

    def block_kwargs(self, block_type: str, layer: int | None = None) -> dict[str, Any]:
        """Keyword arguments for `jetnas.layers.build_layer(block_type, hidden_size, **kwargs)`; `layer`: the layer's
        index, for an `swa` layer's own window (`layer_windows`)."""
        rope_theta = (self.rope_parameters or {}).get("rope_theta", self.default_theta)
        if block_type in ATTENTION_TYPES:
            kwargs = dict(num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads,
                          head_dim=self.head_dim, qkv_bias=self.attention_bias, o_bias=self.attention_out_bias,
                          qk_norm=self.qk_norm, norm_eps=self.rms_norm_eps, rope_theta=rope_theta)
            if block_type == "swa":
                swa = self.efficient_attention_config["swa"]
                own = swa.get("layer_windows", {}).get(str(layer)) if layer is not None else None
                kwargs["window_size"] = own or swa["window_size"]
            return kwargs
        given = dict(self.efficient_attention_config.get(block_type, {}))
        if block_type == "jet":
            return self._jet_kwargs(given)
        if block_type == "mamba2":
            return {"head_dim": self.head_dim, "state_size": self.head_dim, **given}
        # gdn, deltanet, gla, retnet: heads and head dims of the attention they replace, unless given
        defaults = dict(num_heads=self.num_attention_heads, head_k_dim=self.head_dim, head_v_dim=self.head_dim)
        return {**defaults, **given}

    def _jet_kwargs(self, jet: dict) -> dict[str, Any]:
        num_heads = jet.get("num_heads", self.num_attention_heads)
        head_k = jet.get("head_dim", self.head_dim)
        expand_v = float(jet.get("expand_v", 2.0))
        head_v = round(head_k * expand_v)
        if not math.isclose(head_k * expand_v, head_v, rel_tol=1e-5):
            raise ValueError(f"efficient_attention_config['jet']: head_dim={head_k} * expand_v={expand_v} is not an "
                             f"integer value dim")
        design = {key: jet[key] for key in _JET_DESIGN_KEYS if key in jet}
        return dict(num_heads=num_heads, head_k_dim=head_k, head_v_dim=head_v, conv_size=jet.get("conv_size", 4),
                    generator_reduction=jet.get("dconv_generator_reduction", 8),
                    norm_eps=float(jet.get("norm_eps", 1e-5)), initializer_range=self.initializer_range, **design)


__all__ = ["JetNemotronConfig"]
