"""Multi-scale retention (RetNet, Sun et al., 2023): linear attention with a fixed decay per head and rotary
positions on q and k. Parameter names follow fla's `MultiScaleRetention`.
"""

from __future__ import annotations

import torch
from torch import nn

from jetnas.layers.base import (
    TokenMixer,
    begin_linear,
    dtype_bytes,
    gla_recurrence,
    inherit_qkvo,
    upcast,
)
from jetnas.modules.norm import GatedRMSNorm
from jetnas.ops.attention import apply_rotary, rotary_cos_sin
from jetnas.ops.backend import Backend, resolve_backend


class MultiScaleRetention(TokenMixer):
    """RetNet retention: `S_t = gamma_h S_{t-1} + k_t v_t^T` with `gamma_h = 1 - 2^(-5-h)`, RoPE on q and k,
    a swish-gated RMS norm and `o_proj`.

    Args:
        hidden_size: D.
        num_heads: H.
        head_k_dim: K; defaults to D / H.
        head_v_dim: V; defaults to 2D / H (fla's expand_v = 2).
        norm_eps: eps of the output norm.
        rope_theta: RoPE base for q and k.
        backend: a `Backend` or "auto" | "torch" | "triton", resolved once here and passed to every op.
    """

    layer_type = "retnet"

    def __init__(self, hidden_size: int, num_heads: int = 8, head_k_dim: int | None = None,
                 head_v_dim: int | None = None, norm_eps: float = 1e-5, rope_theta: float = 10000.0,
                 backend: Backend | str = "auto"):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k_dim = head_k_dim or hidden_size // num_heads
        self.head_v_dim = head_v_dim or 2 * hidden_size // num_heads
        self.rope_theta = rope_theta
        self.backend = resolve_backend(backend)
        key_dim, value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.g_norm_swish_gate = GatedRMSNorm(self.head_v_dim, eps=norm_eps, backend=self.backend)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        # a fixed multi-scale decay, not a parameter (RetNet's), kept out of checkpoints
        self.register_buffer("log_decay", torch.empty(num_heads), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute the fixed decays (also after a meta-device construction, where buffers hold garbage)."""
        heads = torch.arange(self.num_heads, dtype=torch.float32, device=self.log_decay.device)
        with torch.no_grad():
            self.log_decay.copy_(torch.log(1 - 2.0 ** (-5.0 - heads)))

    def forward(self, hidden_states, state=None, *, attention_mask=None, position_ids=None,
                position_embeddings=None, use_cache=False):
        x = hidden_states
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        x, mask, state, step = begin_linear(x, state, attention_mask, use_cache)
        if position_ids is None:
            start = 0 if state is None else state.seq_length
            position_ids = torch.arange(start, start + T, device=x.device).expand(B, T)
        # our own tables: the model's (cos, sin) belong to the attention layers' head dim and base
        cos, sin = rotary_cos_sin(position_ids, K, self.rope_theta)
        q = apply_rotary(self.q_proj(x).view(B, T, H, K), cos, sin)
        k = apply_rotary(self.k_proj(x).view(B, T, H, K), cos, sin)
        v = self.v_proj(x).view(B, T, H, V)
        g = upcast(self.log_decay).expand(B, T, H)
        if mask is not None:
            g = g * mask[..., None]
        o, final = gla_recurrence(q, k, v, g, state, step, None, self.backend)
        if state is not None:
            state.recurrent = final
            state.seq_length += T
        o = self.g_norm_swish_gate(o, self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V)), state

    def cache_bytes(self, context_length, dtype=torch.bfloat16, state_dtype=torch.float32):
        return self.num_heads * self.head_k_dim * self.head_v_dim * dtype_bytes(state_dtype)

    def init_from_attention(self, attn: nn.Module) -> list[str]:
        """Inheritance rule: `jetnas.layers.base.inherit_qkvo`; the RoPE base stays this block's own."""
        return inherit_qkvo(self, attn, self.num_heads, self.head_k_dim, self.head_v_dim)
