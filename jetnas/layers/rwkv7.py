"""RWKV-7 "Goose" time mixing (Peng et al., 2025, arXiv 2503.14456) as a token mixer: the generalised delta rule
with a per-channel decay and an in-context learning rate. The block the paper's Table 1 compares and drops for its
training speed.

For input x (tokens x D), H heads, key dim K, value dim V:

    x'_t = x_{t-1} - x_t                                  token shift (x_{-1} = 0, or the cached last token)
    x_c = x + x' * mu_c   for c in r, w, k, v, a, g       six learned per-channel mixes
    r = r_proj(x_r),  k = k_proj(x_k),  v = v_proj(x_v)
    w = -exp(-1/2) * sigmoid(w0 + w_lora(x_w))            log decay in (-0.61, 0): decay exp(w) in (0.55, 1)
    iclr = sigmoid(a0 + a_lora(x_a))                      in-context learning rate, per key channel
    g = g_lora(x_g)                                       output gate (low rank, sigmoid inside)
    kk = l2norm(k * k_k)  per head                        the removal key
    k = k * (1 + (iclr - 1) * k_a)                        the written key, scaled by the learning rate
    o = rwkv7(r, w, k, v, a=-kk, b=kk*iclr)               S_t = (diag(exp w_t) - (kk*iclr) kk^T) S_{t-1} + k v^T
    o = group_norm_per_head(o) + ((r * k * r_k).sum per head) v     the "bonus": the current token read directly
    out = o_proj(o * g)

The LoRA-style projections are `nn.Sequential(down, [activation], up)` without biases, and their offsets are
separate parameters (`w0`, `a0`) as in RWKV-7's own code; parameter names otherwise follow fla's `RWKV7Attention`
(`x_r ... x_g`, `k_k`, `k_a`, `r_k`, `r_proj`, `k_proj`, `v_proj`, `o_proj`, `w_lora`, `a_lora`, `g_lora`,
`g_norm`). Keeping the offsets outside the `nn.Linear` layers also keeps them out of transformers' generic weight
init, which zeroes every Linear bias: a zero `w0` would give every channel the same short memory.

No cross-layer value residual. RWKV-7 mixes the first layer's values into every later layer
(`v = lerp(v, v_first, sigmoid(v0 + v_lora(x_v)))`). In a jetnas hybrid that breaks the one-layer contract every
block follows: the first layer may be attention or another block, PostNAS swaps blocks per layer in the
super-network, and a decode step (the model's forward, the engine's CUDA-graph step) would have to carry layer 0's
value of the current token through every layer. Every `rwkv7` block is therefore what RWKV-7 makes of its own first
layer: `v_first` is the block's own v, the lerp is the identity, and (as fla does for layer 0) there is no `v_lora`.

Initialisation follows RWKV-7's (the token-shift mixes, `w0` spread over the channels from slow to fast decay, `a0`,
`k_k`, `k_a`, `r_k`) at a middle layer's depth ratio (0.5): a block does not know its depth here. Per-sequence
state: the `[H, K, V]` float32 memory and the previous token's `x` (D numbers in the model's dtype, kept like a
short convolution's inputs under the conv-state name "shift").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jetnas.layers.base import (
    RecurrentState,
    TokenMixer,
    attention_head_weights,
    begin_linear,
    copy_heads,
    dtype_bytes,
    upcast,
    updatable,
)
from jetnas.ops.backend import Backend, resolve_backend
from jetnas.ops.decode import rwkv7_step_
from jetnas.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

# RWKV-7 bounds the log decay by -exp(-1/2): the per-token decay stays above exp(-0.61) = 0.55
_MAX_LOG_DECAY = math.exp(-0.5)
_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")


def default_low_rank_dim(hidden_size: int, factor: float) -> int:
    """RWKV-7's LoRA widths: `factor * sqrt(D)` rounded to a multiple of 32, at least 32 (decay and learning rate:
    factor 2.5 * K / 64; gate: 5)."""
    return max(32, int(round(factor * hidden_size**0.5 / 32) * 32))


def token_shift(x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """`[B, T, D]` -> the previous token's x at every position: the cached `previous [B, D, 1]` (or zeros) first."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if previous is None else previous.transpose(1, 2).to(x.dtype)
    return torch.cat([first, x[:, :-1]], 1)


class RWKV7(TokenMixer):
    """RWKV-7 time mixing (see the module docstring).

    Args:
        hidden_size: D.
        num_heads: H; defaults to D / 64 (RWKV-7's head size 64).
        head_k_dim: K; defaults to D / H.
        head_v_dim: V; defaults to K.
        decay_low_rank_dim: rank of `w_lora`; defaults to RWKV-7's rule (`default_low_rank_dim`).
        a_low_rank_dim: rank of `a_lora` (the in-context learning rate); same default.
        gate_low_rank_dim: rank of `g_lora`; defaults to RWKV-7's rule for the gate.
        norm_eps: the per-head group norm's eps is `head_v_dim * norm_eps` (RWKV-7: 64e-5 at head size 64).
        backend: a `Backend` or "auto" | "torch" | "triton", resolved once here and passed to every op.
    """

    layer_type = "rwkv7"

    def __init__(self, hidden_size: int, num_heads: int | None = None, head_k_dim: int | None = None,
                 head_v_dim: int | None = None, decay_low_rank_dim: int | None = None,
                 a_low_rank_dim: int | None = None, gate_low_rank_dim: int | None = None, norm_eps: float = 1e-5,
                 backend: Backend | str = "auto"):
        super().__init__()
        num_heads = num_heads or max(1, hidden_size // 64)
        head_k_dim = head_k_dim or hidden_size // num_heads
        head_v_dim = head_v_dim or head_k_dim
        if min(num_heads, head_k_dim, head_v_dim) < 1:
            raise ValueError(f"num_heads, head_k_dim and head_v_dim must be >= 1, got {num_heads}, {head_k_dim}, "
                             f"{head_v_dim}")
        self.hidden_size, self.num_heads, self.head_k_dim, self.head_v_dim = (
            hidden_size, num_heads, head_k_dim, head_v_dim)
        self.backend = resolve_backend(backend)
        key_dim, value_dim = num_heads * head_k_dim, num_heads * head_v_dim
        lora_factor = 2.5 * head_k_dim / 64
        self.decay_low_rank_dim = decay_low_rank_dim or default_low_rank_dim(hidden_size, lora_factor)
        self.a_low_rank_dim = a_low_rank_dim or default_low_rank_dim(hidden_size, lora_factor)
        self.gate_low_rank_dim = gate_low_rank_dim or default_low_rank_dim(hidden_size, 5.0)

        for name in _MIXES:
            setattr(self, name, nn.Parameter(torch.empty(hidden_size)))
        self.k_k = nn.Parameter(torch.empty(key_dim))
        self.k_a = nn.Parameter(torch.empty(key_dim))
        self.r_k = nn.Parameter(torch.empty(num_heads, head_k_dim))
        self.w0 = nn.Parameter(torch.empty(key_dim))
        self.a0 = nn.Parameter(torch.empty(key_dim))

        self.r_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.w_lora = nn.Sequential(nn.Linear(hidden_size, self.decay_low_rank_dim, bias=False), nn.Tanh(),
                                    nn.Linear(self.decay_low_rank_dim, key_dim, bias=False))
        self.a_lora = nn.Sequential(nn.Linear(hidden_size, self.a_low_rank_dim, bias=False),
                                    nn.Linear(self.a_low_rank_dim, key_dim, bias=False))
        self.g_lora = nn.Sequential(nn.Linear(hidden_size, self.gate_low_rank_dim, bias=False), nn.Sigmoid(),
                                    nn.Linear(self.gate_low_rank_dim, value_dim, bias=False))
        self.g_norm = nn.GroupNorm(num_heads, value_dim, eps=head_v_dim * norm_eps, affine=True)
        with torch.no_grad():
            for name, value in self.initial_values().items():
                getattr(self, name).copy_(value)

    def initial_values(self) -> dict[str, torch.Tensor]:
        """RWKV-7's initial values of the parameters that are not plain Linear weights, at depth ratio 0.5."""
        D, H, K = self.hidden_size, self.num_heads, self.head_k_dim
        depth = 0.5  # RWKV-7's layer_id / (n_layer - 1) and 1 - layer_id / n_layer, both taken at a middle layer
        ddd = torch.arange(D, dtype=torch.float32) / D
        n = torch.arange(H * K, dtype=torch.float32)
        linear = n / max(H * K - 1, 1) - 0.5
        half = (K - 1) / 2
        zigzag = ((n % K) - half) / half if K > 1 else torch.zeros_like(n)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / max(H * K - 1, 1)) ** (1 + depth**0.3)
        powers = {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}
        values = {name: 1.0 - ddd ** (p * depth) for name, p in powers.items()}
        values.update(
            # RWKV-7's offset z of its log decay -exp(-softplus(-z) - 0.5), which is -exp(-1/2) * sigmoid(z) here
            w0=www + 0.5 + zigzag * 2.5, a0=-0.19 + zigzag * 0.3 + linear * 0.4,
            k_k=0.71 - linear * 0.1, k_a=torch.full((H * K,), 1.02), r_k=torch.full((H, K), -0.04))
        return values

    def _recurrence(self, r, w, k, v, a, b, state: RecurrentState | None, step: bool):
        """A prompt's chunked recurrence, or a decode step (in place when the cached state allows it)."""
        initial = None if state is None else state.recurrent
        if step and updatable(initial):
            o = rwkv7_step_(r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], initial, backend=self.backend)
            return o[:, None], initial
        rule = fused_recurrent_rwkv7 if step else chunk_rwkv7
        return rule(r, w, k, v, a, b, initial_state=initial, output_final_state=state is not None,
                    backend=self.backend)

    def forward(self, hidden_states, state=None, *, attention_mask=None, position_ids=None,
                position_embeddings=None, use_cache=False):
        x = hidden_states
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        # padded tokens become zeros: they shift nothing into the next token and write nothing (k = v = kk = 0)
        x, mask, state, step = begin_linear(x, state, attention_mask, use_cache)

        shifted = token_shift(x, None if state is None else state.conv.get("shift"))
        delta = shifted - x
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, delta, getattr(self, name).to(x.dtype)) for name in _MIXES)
        if state is not None:
            # after the mixes have read the previous token: in the engine this is a copy into the same buffer
            state.conv["shift"] = x[:, -1:].transpose(1, 2)

        r = self.r_proj(xr).view(B, T, H, K)
        k = self.k_proj(xk).view(B, T, H, K)
        v = self.v_proj(xv).view(B, T, H, V)
        w = -_MAX_LOG_DECAY * torch.sigmoid(upcast(self.w_lora(xw)) + upcast(self.w0))
        w = w.view(B, T, H, K)
        if mask is not None:
            w = w * mask[..., None, None]  # and padded tokens do not decay the memory
        iclr = torch.sigmoid(self.a_lora(xa) + self.a0.to(x.dtype)).view(B, T, H, K)
        # F.normalize (norm clamped at 1e-12) as RWKV-7 does; a padded token's k = 0 gives kk = 0
        kk = F.normalize(k * self.k_k.to(k.dtype).view(H, K), dim=-1)
        k = k * (1 + (iclr - 1) * self.k_a.to(k.dtype).view(H, K))

        o, final = self._recurrence(r, w, k, v, -kk, kk * iclr, state, step)
        if state is not None:
            state.recurrent = final
            state.seq_length += T

        o = F.group_norm(upcast(o).reshape(B * T, H * V), H, upcast(self.g_norm.weight), upcast(self.g_norm.bias),
                         self.g_norm.eps).view(B, T, H, V)
        bonus = (upcast(r) * upcast(k) * upcast(self.r_k)).sum(-1, keepdim=True) * upcast(v)
        o = (o + bonus).reshape(B, T, H * V) * upcast(self.g_lora(xg))
        return self.o_proj(o.to(x.dtype)), state

    def cache_bytes(self, context_length, dtype=torch.bfloat16, state_dtype=torch.float32):
        # the [H, K, V] memory and the previous token's x (the token shift)
        return (self.num_heads * self.head_k_dim * self.head_v_dim * dtype_bytes(state_dtype)
                + self.hidden_size * dtype_bytes(dtype))

    @torch.no_grad()
    def init_from_attention(self, attn: nn.Module) -> list[str]:
        """Inheritance rule: `r_proj <- q_proj` and `k_proj <- k_proj` when the block has as many heads as the
        attention's queries and `head_k_dim` equals its head dim; `v_proj <- v_proj` and `o_proj <- o_proj` when
        `head_v_dim` does (k and v repeated over each GQA group; biases dropped). An inherited path's token-shift mix
        (`x_r`, `x_k`, `x_v`) is set to 0, so its projection first reads the current token, as in the attention.
        Returns the names of the copied weights."""
        w = attention_head_weights(attn)
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        inherited = []
        for proj, src, dim, mix in (("r_proj", "q", K, "x_r"), ("k_proj", "k", K, "x_k"), ("v_proj", "v", V, "x_v")):
            if copy_heads(getattr(self, proj).weight, w[src], H, dim):
                inherited.append(f"{proj}.weight")
                getattr(self, mix).zero_()
        if copy_heads(self.o_proj.weight, w["o"], H, V, out_dim=False):
            inherited.append("o_proj.weight")
        return inherited
