"""Mamba2 (Dao & Gu, 2024) as a token mixer: the SSD recurrence with a scalar data-dependent decay per head.

    z, xBC, dt = in_proj(x);  x, B, C = silu(conv1d(xBC))
    dt = softplus(dt + dt_bias);  h_t = exp(dt_t A) h_{t-1} + B_t (dt_t x_t)^T;  y_t = h_t^T C_t + D x_t
    out = out_proj( rmsnorm(y * silu(z)) )

which is GLA with a per-head decay `g = dt A`, keys B, queries C, values `dt x` and scale 1. Parameter names
follow transformers' `Mamba2Mixer` (`in_proj, conv1d, dt_bias, A_log, D, norm, out_proj`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jetnas.layers.base import (
    TokenMixer,
    attention_head_weights,
    begin_linear,
    dtype_bytes,
    gla_recurrence,
    upcast,
)
from jetnas.layers.jet import initial_dt_bias
from jetnas.modules.conv import ShortConvolution
from jetnas.modules.norm import GatedRMSNorm
from jetnas.ops.backend import Backend, resolve_backend


class Mamba2(TokenMixer):
    """Mamba2 mixer.

    Args:
        hidden_size: D.
        num_heads: H; defaults to `expand * D / head_dim`.
        head_dim: P, channels per head (64).
        state_size: N, the SSM state per head (128).
        n_groups: groups sharing B and C (1); H must be a multiple.
        expand: inner width `expand * D` when num_heads is not given (2).
        conv_size: W (4).
        norm_eps: eps of the gated norm.
        backend: a `Backend` or "auto" | "torch" | "triton", resolved once here and passed to every op.
    """

    layer_type = "mamba2"

    def __init__(self, hidden_size: int, num_heads: int | None = None, head_dim: int = 64, state_size: int = 128,
                 n_groups: int = 1, expand: int = 2, conv_size: int = 4, norm_eps: float = 1e-5,
                 backend: Backend | str = "auto"):
        super().__init__()
        num_heads = num_heads or expand * hidden_size // head_dim
        if num_heads % n_groups:
            raise ValueError(f"num_heads={num_heads} must be a multiple of n_groups={n_groups}")
        self.hidden_size, self.num_heads, self.head_dim, self.state_size, self.n_groups = (
            hidden_size, num_heads, head_dim, state_size, n_groups)
        self.conv_size = conv_size
        self.backend = resolve_backend(backend)
        self.inner = num_heads * head_dim
        conv_dim = self.inner + 2 * n_groups * state_size
        self.in_proj = nn.Linear(hidden_size, self.inner + conv_dim + num_heads, bias=False)
        self.conv1d = ShortConvolution(conv_dim, conv_size, bias=True, activation="silu")
        for name, value in self.initial_values().items():
            setattr(self, name, nn.Parameter(value))
        self.norm = GatedRMSNorm(self.inner, eps=norm_eps, norm_before_gate=False, group_size=self.inner // n_groups,
                                 backend=self.backend)
        self.out_proj = nn.Linear(self.inner, hidden_size, bias=False)

    def initial_values(self) -> dict[str, torch.Tensor]:
        """Fresh values of the parameters with a non-standard init: A = 1..H (Mamba2's), dt as in the JetBlock,
        D = 1."""
        H = self.num_heads
        return {"dt_bias": initial_dt_bias(H), "A_log": torch.arange(1, H + 1, dtype=torch.float32).log(),
                "D": torch.ones(H)}

    def forward(self, hidden_states, state=None, *, attention_mask=None, position_ids=None,
                position_embeddings=None, use_cache=False):
        x = hidden_states
        Bsz, T, _ = x.shape
        H, P, N, G = self.num_heads, self.head_dim, self.state_size, self.n_groups
        x, mask, state, step = begin_linear(x, state, attention_mask, use_cache)
        z, xBC, dt = self.in_proj(x).split([self.inner, self.inner + 2 * G * N, H], -1)
        conv_state = None if state is None else state.conv.get("xBC")
        if step:
            xBC, conv_state = self.conv1d.step(xBC[:, 0], conv_state, backend=self.backend)
            xBC = xBC[:, None]
        else:
            xBC, conv_state = self.conv1d(xBC, conv_state, state is not None, backend=self.backend)
        if state is not None:
            state.conv["xBC"] = conv_state
        xs, Bm, Cm = xBC.split([self.inner, G * N, G * N], -1)
        dt = F.softplus(upcast(dt) + upcast(self.dt_bias))  # [B, T, H]
        g = -upcast(self.A_log).exp() * dt
        if mask is not None:
            # the conv bias makes padded positions nonzero: silence their writes (B = 0) and decay (g = 0)
            Bm, g = Bm * mask[..., None].to(Bm.dtype), g * mask[..., None]
        xs = xs.reshape(Bsz, T, H, P)
        Bm = Bm.reshape(Bsz, T, G, N).repeat_interleave(H // G, 2)
        Cm = Cm.reshape(Bsz, T, G, N).repeat_interleave(H // G, 2)
        v = (upcast(xs) * dt[..., None]).to(xs.dtype)
        y, final = gla_recurrence(Cm, Bm, v, g, state, step, 1.0, self.backend)
        if state is not None:
            state.recurrent = final
            state.seq_length += T
        y = y + xs * self.D.to(xs.dtype)[:, None]
        y = self.norm(y.reshape(Bsz, T, self.inner), z)
        return self.out_proj(y), state

    def cache_bytes(self, context_length, dtype=torch.bfloat16, state_dtype=torch.float32):
        conv_dim = self.inner + 2 * self.n_groups * self.state_size
        return (self.num_heads * self.state_size * self.head_dim * dtype_bytes(state_dtype)
                + conv_dim * (self.conv_size - 1) * dtype_bytes(dtype))

    @torch.no_grad()
    def init_from_attention(self, attn: nn.Module) -> list[str]:
        """Inheritance rule (Mamba-in-the-Llama's): with one group per head (`n_groups == num_heads == attention
        heads`) and `head_dim == state_size == attention head dim`, C <- q_proj, B <- k_proj, x <- v_proj (k, v
        repeated over GQA groups) and out_proj <- o_proj; the conv over xBC starts as the identity. Otherwise
        nothing is inherited."""
        hd, H = attn.head_dim, attn.num_heads
        if not (self.n_groups == self.num_heads == H and self.head_dim == self.state_size == hd):
            return []
        w = attention_head_weights(attn)
        rows = self.in_proj.weight
        start_x, start_B = self.inner, 2 * self.inner
        start_C = start_B + H * hd
        rows[start_x:start_x + H * hd] = w["v"].reshape(H * hd, -1).to(rows.dtype)
        rows[start_B:start_C] = w["k"].reshape(H * hd, -1).to(rows.dtype)
        rows[start_C:start_C + H * hd] = w["q"].reshape(H * hd, -1).to(rows.dtype)
        self.out_proj.weight.copy_(w["o"].reshape(w["o"].shape[0], -1).to(rows.dtype))
        self.conv1d.set_identity()
        return ["in_proj.weight[x, B, C]", "out_proj.weight"]
