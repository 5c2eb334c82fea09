"""Hybrid causal language models native to transformers: `JetNemotronModel` and `JetNemotronForCausalLM`.

Decoder-only, pre-norm: every layer is `x + mixer(norm(x))` then `x + mlp(norm(x))`, with the mixer of each layer
built from `config.block_types` by `jetnas.layers.build_layer`. State-dict names follow Qwen2 (`model.embed_tokens`,
`model.layers.{i}.{input_layernorm, self_attn, post_attention_layernorm, mlp.{gate,up,down}_proj}`, `model.norm`,
`lm_head`), so released Jet-Nemotron checkpoints and converted Llama/Qwen weights load with no renaming.

Kernels: the model resolves one `jetnas.ops.backend.Backend` at construction (`backend="auto"` unless given, e.g.
`JetNemotronForCausalLM(config, backend=Backend("torch"))` or `from_pretrained(path, backend=...)`) and passes it to
every layer, norm and MLP, which pass it to every op they call.

Caching uses transformers' own per-layer caches (`DynamicCache` built from `config.layer_types`), so `generate()`
works with greedy, sampling, beam search and left padding without any override.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from jetnas.layers import ATTENTION_TYPES, build_layer
from jetnas.layers.jet import JetBlock
from jetnas.layers.mamba2 import Mamba2
from jetnas.layers.retnet import MultiScaleRetention
from jetnas.models import hf_compat
from jetnas.models.configuration import JetNemotronConfig
from jetnas.modules.conv import DynamicShortConvolution, ShortConvolution
from jetnas.modules.norm import GatedRMSNorm, RMSNorm
from jetnas.ops.backend import Backend, needs_grad, resolve_backend
from jetnas.ops.fused import silu_mul, silu_mul_packed


class JetNemotronMLP(nn.Module):
    """SwiGLU MLP: `down(act(gate(x)) * up(x))`; with SiLU, `jetnas.ops.fused.silu_mul` under `backend`. With the
    backend's `fused_projections` and a gradient to compute, gate and up are one product (`cat` of their weights,
    made at each forward) and SiLU's product `jetnas.ops.fused.silu_mul_packed`: the same parameters and results.
    Without a gradient (prefill, decode, evaluation) they stay two products: the fusion pays only in backward (x's
    gradient once), and its weight `cat` copies the whole MLP's gate and up every call, which a decode step cannot
    amortise (Jet-Nemotron-2B: ~1.5 GB copied per step, as much traffic again as reading those weights)."""

    def __init__(self, config: JetNemotronConfig, backend: Backend | str = "auto"):
        super().__init__()
        self.backend = resolve_backend(backend)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.swiglu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a backward will follow: x's gradient (frozen MLPs in stage 1) or a weight's
        if self.backend.fused_projections and needs_grad(x, self.gate_proj.weight, self.up_proj.weight):
            # gate and up as one product: backward computes x's gradient once, not twice and then an add
            bias = None if self.gate_proj.bias is None else torch.cat([self.gate_proj.bias, self.up_proj.bias])
            gate_up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]), bias)
            if self.swiglu:
                return self.down_proj(silu_mul_packed(gate_up, self.backend))
            gate, up = gate_up.chunk(2, -1)
            return self.down_proj(self.act_fn(gate) * up)
        if self.swiglu:  # one fused pass each way under a fused "triton" backend on CUDA
            return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x), self.backend))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class JetNemotronDecoderLayer(nn.Module):
    def __init__(self, config: JetNemotronConfig, layer_idx: int, backend: Backend | str = "auto"):
        super().__init__()
        backend = resolve_backend(backend)
        self.layer_idx = layer_idx
        self.block_type = config.block_types[layer_idx]
        self.is_attention = self.block_type in ATTENTION_TYPES
        self.self_attn = build_layer(self.block_type, config.hidden_size, backend=backend,
                                     **config.block_kwargs(self.block_type, layer_idx))
        self.mlp = JetNemotronMLP(config, backend)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, backend=backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, backend=backend)

    def forward(self, hidden_states, *, past_key_values=None, attention_mask=None, position_ids=None,
                position_embeddings=None, pending=None, defer_mlp_add=False):
        """`h + mlp(norm(h))` for `h = hidden_states + mixer(norm(hidden_states))`, `[B, T, D]` to `[B, T, D]`.

        Each residual add runs inside the norm after it (`RMSNorm.add_forward`: one kernel each way when the
        backend has `fused_residual` on, else the plain add then the norm). For the model's fused loop, which also
        fuses the add between layers: `pending` is the previous layer's MLP output, not yet added (this layer's
        input is `hidden_states + pending`, summed inside its input norm); `defer_mlp_add` returns
        `(layer_input, h, mlp_out)` (the summed input, the residual after the mixer, the MLP output) instead of
        `h + mlp_out`. By default neither: a layer maps hidden states to hidden states, as HF's do."""
        state = None
        if past_key_values is not None:
            state = hf_compat.layer_state(past_key_values, self.layer_idx, self.is_attention)
        if pending is None:
            normed = self.input_layernorm(hidden_states)
        else:
            hidden_states, normed = self.input_layernorm.add_forward(hidden_states, pending)
        layer_input = hidden_states
        mixed, _ = self.self_attn(
            normed, state, attention_mask=attention_mask, position_ids=position_ids,
            position_embeddings=position_embeddings if self.is_attention else None,
        )
        hidden_states, normed = self.post_attention_layernorm.add_forward(hidden_states, mixed)
        out = self.mlp(normed)
        if defer_mlp_add:
            return layer_input, hidden_states, out
        return hidden_states + out


class JetNemotronRotaryEmbedding(nn.Module):
    """RoPE tables `(cos, sin)` for the attention layers, for any `rope_type` transformers supports."""

    def __init__(self, config: JetNemotronConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = hf_compat.rope_inv_freq(config, config.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the frequencies (after a meta-device construction the buffer holds garbage)."""
        inv_freq, self.attention_scaling = hf_compat.rope_inv_freq(self.config, self.config.head_dim)
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat([freqs, freqs], -1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


class JetNemotronPreTrainedModel(PreTrainedModel):
    config_class = JetNemotronConfig
    config: JetNemotronConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["JetNemotronDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers skips modules without direct parameters in "custom code" models, assuming their init might
        # not respect loaded weights; ours does (guarded torch.nn.init, init_param_), and the dynamic convolution
        # owns its rules while its parameters sit in sub-layers, so nothing may be skipped
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers visits children before parents, so a block's own rules below override the generic Linear
        # init of its sub-layers; tensors loaded from a checkpoint are never touched (transformers guards
        # torch.nn.init while this runs, and init_param_ checks the same flag).
        super()._init_weights(module)
        if isinstance(module, (RMSNorm, GatedRMSNorm, ShortConvolution, DynamicShortConvolution)):
            module.reset_parameters()
        if isinstance(module, (JetBlock, Mamba2)):
            for name, value in module.initial_values().items():
                hf_compat.init_param_(getattr(module, name), value)
        # non-persistent buffers are never loaded: recompute them whenever weights are (re)initialised
        if isinstance(module, (JetNemotronRotaryEmbedding, MultiScaleRetention)):
            module.reset_buffers()


class JetNemotronModel(JetNemotronPreTrainedModel):
    def __init__(self, config: JetNemotronConfig, backend: Backend | str = "auto"):
        super().__init__(config)
        # resolved once: every layer, norm and MLP runs its ops under this one value
        self.backend = resolve_backend(backend)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(JetNemotronDecoderLayer(config, i, self.backend)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, backend=self.backend)
        self.rotary_emb = JetNemotronRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = cache if past_key_values is None else past_key_values  # transformers >= 5.24: `cache`
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
            raise ValueError("attention_mask must be a 2-D [batch, past + current tokens] 0/1 padding mask, got "
                             f"{type(attention_mask).__name__} {getattr(attention_mask, 'shape', '')}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = hf_compat.new_cache(self.config)
        B, T = inputs_embeds.shape[:2]
        if position_ids is None:
            if attention_mask is not None:
                # left padding: real tokens count from 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                past = _past_length(past_key_values)
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device).expand(B, T)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = [] if output_hidden_states else None
        checkpointing = self.gradient_checkpointing and self.training
        # fused residual adds between layers too: each layer leaves its MLP output `pending`, and the next layer's
        # input norm (or the final norm) adds it in its kernel; not under checkpointing, whose unit is one layer
        defer = self.backend.fused_residual and not checkpointing
        pending = None
        for layer in self.layers:
            call = dict(past_key_values=past_key_values, attention_mask=attention_mask, position_ids=position_ids,
                        position_embeddings=position_embeddings)
            if defer:
                layer_input, hidden_states, pending = layer(hidden_states, pending=pending, defer_mlp_add=True,
                                                            **call)
                if output_hidden_states:
                    all_hidden.append(layer_input)
                continue
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if checkpointing:
                hidden_states = self._gradient_checkpointing_func(_call_layer, layer, hidden_states, call)
            else:
                hidden_states = layer(hidden_states, **call)
        if pending is None:
            hidden_states = self.norm(hidden_states)
        else:
            hidden_states = self.norm.add_forward(hidden_states, pending)[1]
        if output_hidden_states:
            all_hidden.append(hidden_states)
        if past_key_values is not None:
            _advance(past_key_values, T)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            **{hf_compat.CACHE_FIELD: past_key_values if use_cache else None},
        )


def _call_layer(layer, hidden_states, call):
    return layer(hidden_states, **call)


def _past_length(cache: Cache | None) -> int:
    """Tokens already in the cache. Tracked on the cache object itself, since a model may have no attention
    layer to count keys in."""
    return 0 if cache is None else getattr(cache, "jetnas_seen_tokens", 0)


def _advance(cache: Cache, n: int) -> None:
    cache.jetnas_seen_tokens = _past_length(cache) + n


class JetNemotronForCausalLM(JetNemotronPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: JetNemotronConfig, backend: Backend | str = "auto"):
        super().__init__(config)
        self.model = JetNemotronModel(config, backend)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward. `labels` (same shape as input_ids, -100 ignored) give the mean next-token loss;
        `logits_to_keep=n` computes logits for the last n positions only (0: all)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float()
            loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      **{hf_compat.CACHE_FIELD: hf_compat.output_cache(out)})

    @staticmethod
    def create_masks_for_generate(attention_mask=None, **kwargs):
        """Our layers take the 2-D padding mask as it is (transformers would otherwise build 4-D masks here)."""
        return attention_mask

    def cache_bytes(self, context_length: int, dtype: torch.dtype = torch.bfloat16,
                    state_dtype: torch.dtype = torch.float32) -> int:
        """Cache bytes per sequence after `context_length` tokens, summed over layers."""
        return sum(layer.self_attn.cache_bytes(context_length, dtype, state_dtype) for layer in self.model.layers)


__all__ = ["JetNemotronForCausalLM", "JetNemotronModel", "JetNemotronPreTrainedModel"]
