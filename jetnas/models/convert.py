"""Conversion of a pretrained full-attention model (Llama, Qwen2, Qwen3 families) into a jetnas hybrid.

Embeddings, norms, MLPs and the LM head are copied bit for bit (and frozen by default); `attn`/`swa` layers take
the pretrained attention weights; each linear block inherits what its rule allows (`init_from_attention` of the
block: Q/K/V/O where head splits match) and starts fresh otherwise. `as_jetnas` is the all-attention case: a teacher
as a jetnas model with the same logits, what distillation, the super-network and the engine run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from jetnas.layers import ATTENTION_TYPES, Attention
from jetnas.models.configuration import JetNemotronConfig
from jetnas.models.layer_types import DEFAULT_SWA_WINDOW
from jetnas.models.modeling import JetNemotronForCausalLM

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "jet_nemotron")


def hybrid_config(source, block_types: list[str], efficient_attention_config: dict | None = None) -> JetNemotronConfig:
    """A `JetNemotronConfig` with the source model's dimensions and the given per-layer blocks."""
    family = source.model_type
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"cannot convert model_type={family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    if family == "jet_nemotron":
        fields = source.to_dict()
        for key in ("block_types", "layer_types", "efficient_attention_config", "sliding_window", "model_type",
                    "architectures", "transformers_version"):
            fields.pop(key, None)
        extra = dict(source.efficient_attention_config)
    else:
        bias = bool(getattr(source, "attention_bias", False))
        fields = dict(
            vocab_size=source.vocab_size, hidden_size=source.hidden_size, intermediate_size=source.intermediate_size,
            num_hidden_layers=source.num_hidden_layers, num_attention_heads=source.num_attention_heads,
            num_key_value_heads=source.num_key_value_heads or source.num_attention_heads,
            head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
            hidden_act=source.hidden_act, max_position_embeddings=source.max_position_embeddings,
            rms_norm_eps=source.rms_norm_eps, initializer_range=source.initializer_range,
            rope_parameters=dict(source.rope_parameters), tie_word_embeddings=source.tie_word_embeddings,
            # Qwen2: biased q/k/v, unbiased o; Llama and Qwen3: one `attention_bias` for all four
            attention_bias=True if family == "qwen2" else bias,
            attention_out_bias=False if family == "qwen2" else bias,
            qk_norm=family == "qwen3", mlp_bias=bool(getattr(source, "mlp_bias", False)),
            bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id,
        )
        extra = {}
    extra.update(efficient_attention_config or {})
    if "swa" in block_types and "window_size" not in extra.get("swa", {}):
        extra["swa"] = {**extra.get("swa", {}), "window_size": default_swa_window(source)[0]}
    return JetNemotronConfig(**fields, block_types=block_types, efficient_attention_config=extra)


def default_swa_window(source) -> tuple[int, str]:
    """The window of `swa` layers when none is given, and why (`jetnas.models.layer_types.DEFAULT_SWA_WINDOW`'s
    rule): the teacher's own sliding window when its config uses one (a jetnas model's `swa` window; Mistral's
    `sliding_window`; Qwen2/Qwen3's only with `use_sliding_window`); else `DEFAULT_SWA_WINDOW` (512, the
    super-network's default window, so a layout searched with default settings is built as searched), capped at
    half the teacher's `max_position_embeddings` so that a `swa` layer always sees less than a full-attention one."""
    own = (getattr(source, "efficient_attention_config", None) or {}).get("swa", {}).get("window_size")
    if own is None and getattr(source, "use_sliding_window", True):
        own = getattr(source, "sliding_window", None)
    if isinstance(own, int) and not isinstance(own, bool) and own >= 1:
        return own, "the teacher's own sliding window"
    positions = getattr(source, "max_position_embeddings", None)
    if isinstance(positions, int) and 2 <= positions < 2 * DEFAULT_SWA_WINDOW:
        return positions // 2, (f"half the teacher's {positions} positions: the default {DEFAULT_SWA_WINDOW} would "
                                f"be no window at all")
    return DEFAULT_SWA_WINDOW, "the default: the teacher has no sliding window of its own"


@dataclass
class ConversionReport:
    """What came from the source model: per layer, the block type and the inherited parameter names."""

    inherited: dict[int, list[str]] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = []
        for i, names in self.inherited.items():
            lines.append(f"layer {i:>3}: {', '.join(names) if names else '(fresh)'}")
        return "\n".join(lines)


def _source_attention(layer: nn.Module, config: JetNemotronConfig) -> Attention:
    """The source layer's attention as our `Attention` (same parameter names), for the inheritance rules."""
    attn = Attention(config.hidden_size, **config.block_kwargs("attn"))
    attn.load_state_dict(layer.self_attn.state_dict(), strict=True)
    return attn.to(next(layer.parameters()).dtype)


@torch.no_grad()
def convert_model(
    source: nn.Module,
    block_types: list[str],
    efficient_attention_config: dict | None = None,
    freeze: bool = True,
    inherit_linear: bool = True,
) -> tuple[JetNemotronForCausalLM, ConversionReport]:
    """Convert a loaded Llama/Qwen2/Qwen3 (or jetnas) causal LM into a hybrid with the given per-layer blocks.

    Args:
        source: the pretrained model (`...ForCausalLM`).
        block_types: one entry per layer (see `jetnas.models.layer_types`).
        efficient_attention_config: per block type kwargs, e.g. `{"swa": {"window_size": 1024}}` (`swa` layers
            without a window get `default_swa_window`'s).
        freeze: set `requires_grad=False` on everything inherited that PostNAS keeps fixed: embeddings, norms,
            MLPs, LM head.
        inherit_linear: let linear blocks inherit Q/K/V/O from the attention they replace.

    Returns:
        `(hybrid, report)`; the hybrid is on the source's device and dtype, in eval mode.
    """
    config = hybrid_config(source.config, block_types, efficient_attention_config)
    param = next(source.parameters())
    with torch.device(param.device):
        hybrid = JetNemotronForCausalLM(config).to(param.dtype)
    report = ConversionReport()
    src, dst = source.model, hybrid.model
    dst.embed_tokens.load_state_dict(src.embed_tokens.state_dict())
    dst.norm.load_state_dict(src.norm.state_dict())
    if not config.tie_word_embeddings:
        hybrid.lm_head.load_state_dict(source.lm_head.state_dict())
    for i, (s, d) in enumerate(zip(src.layers, dst.layers)):
        d.input_layernorm.load_state_dict(s.input_layernorm.state_dict())
        d.post_attention_layernorm.load_state_dict(s.post_attention_layernorm.state_dict())
        d.mlp.load_state_dict(s.mlp.state_dict())
        if d.block_type in ATTENTION_TYPES:
            d.self_attn.load_state_dict(s.self_attn.state_dict())
            report.inherited[i] = [f"self_attn.{n}" for n in d.self_attn.state_dict()]
        elif inherit_linear:
            report.inherited[i] = [f"self_attn.{n}" for n in d.self_attn.init_from_attention(_source_attention(s, config))]
        else:
            report.inherited[i] = []
    if freeze:
        for name, p in hybrid.named_parameters():
            if ".self_attn." not in name:
                p.requires_grad_(False)
                report.frozen.append(name)
    return hybrid.eval(), report


def as_jetnas(model: nn.Module, freeze: bool = True) -> JetNemotronForCausalLM:
    """`model` as a jetnas model: a jetnas model as it is; a Llama / Qwen2 / Qwen3 model converted with every layer
    kept as attention (`convert_model`: the same logits, on the source's device and dtype, in eval mode, its
    inherited weights frozen when `freeze`). The teacher of distillation, the super-network's base and what the
    engine runs for a plain HF model; hidden states then line up with a hybrid's layer by layer."""
    if isinstance(model, JetNemotronForCausalLM):
        return model
    converted, _ = convert_model(model, ["attn"] * model.config.num_hidden_layers, freeze=freeze)
    return converted
