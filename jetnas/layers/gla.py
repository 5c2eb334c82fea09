"""Gated Linear Attention (Yang et al., 2023): a linear-attention memory with a data-dependent decay per key
channel. The linear path of the PostNAS super-network in the paper's final runs.

Parameter names follow fla's `GatedLinearAttention` (`gk_proj` low-rank gate, `g_norm_swish_gate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
from jetnas.ops.backend import Backend, resolve_backend
from jetnas.ops.fused import shared_input_linear


class GatedLinearAttention(TokenMixer):
    """GLA: `S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T`, `o_t = S_t^T q_t / sqrt(K)`, gated RMS norm, `o_proj`.

    Args:
        hidden_size: D.
        num_heads: H.
        head_k_dim: K; defaults to D / (2H) (fla's expand_k = 0.5).
        head_v_dim: V; defaults to D / H.
        gate_low_rank_dim: rank of the decay projection `gk_proj` (16).
        gate_logit_normalizer: `gk = logsigmoid(gk_proj(x)) / this` (16), a slow decay at start.
        norm_eps: eps of the output norm.
        backend: a `Backend` or "auto" | "torch" | "triton", resolved once here and passed to every op.
    """

    layer_type = "gla"

    def __init__(self, hidden_size: int, num_heads: int = 4, head_k_dim: int | None = None,
                 head_v_dim: int | None = None, gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0,
                 norm_eps: float = 1e-5, backend: Backend | str = "auto"):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k_dim = head_k_dim or hidden_size // (2 * num_heads)
        self.head_v_dim = head_v_dim or hidden_size // num_heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.backend = resolve_backend(backend)
        key_dim, value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, key_dim, bias=True))
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.g_norm_swish_gate = GatedRMSNorm(self.head_v_dim, eps=norm_eps, backend=self.backend)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def forward(self, hidden_states, state=None, *, attention_mask=None, position_ids=None,
                position_embeddings=None, use_cache=False):
        x = hidden_states
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        x, mask, state, step = begin_linear(x, state, attention_mask, use_cache)
        if self.backend.fused_projections and not step:
            # the five products that read x (q, k, v, the gate and the decay's low-rank half) as one
            # `shared_input_linear`: each output contiguous (fla would copy column slices), x's gradient summed
            # inside the backward products instead of four [B, T, D] adds (the super-network's linear paths)
            q, k, v, g, gk_low = shared_input_linear(x, [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                                                         self.g_proj.weight, self.gk_proj[0].weight])
            gk = self.gk_proj[1](gk_low)
        else:
            q, k, v, g = self.q_proj(x), self.k_proj(x), self.v_proj(x), self.g_proj(x)
            gk = self.gk_proj(x)
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)
        gk = F.logsigmoid(upcast(gk)).view(B, T, H, K) / self.gate_logit_normalizer
        if mask is not None:
            # padded tokens neither write (k = 0) nor decay the memory (g = 0)
            gk = gk * mask[..., None, None]
        o, final = gla_recurrence(q, k, v, gk, state, step, None, self.backend)
        if state is not None:
            state.recurrent = final
            state.seq_length += T
        o = self.g_norm_swish_gate(o, g.view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V)), state

    def cache_bytes(self, context_length, dtype=torch.bfloat16, state_dtype=torch.float32):
        return self.num_heads * self.head_k_dim * self.head_v_dim * dtype_bytes(state_dtype)

    def init_from_attention(self, attn: nn.Module) -> list[str]:
        """Inheritance rule: `jetnas.layers.base.inherit_qkvo` (q/k/v/o where the head split matches)."""
        return inherit_qkvo(self, attn, self.num_heads, self.head_k_dim, self.head_v_dim)
