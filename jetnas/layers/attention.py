"""Softmax attention, full (`attn`) or sliding-window (`swa`): grouped-query heads, RoPE, optional QK-norm.

Parameter names follow Llama/Qwen2/Qwen3 (`q_proj, k_proj, v_proj, o_proj`, Qwen3's `q_norm, k_norm`), so a
pretrained attention layer loads as it is, and the same weights serve as `attn` or, with a window, as `swa`.
"""

from __future__ import annotations

import torch
from torch import nn

from jetnas.layers.base import KVState, TokenMixer, dtype_bytes
from jetnas.modules.norm import RMSNorm
from jetnas.ops.attention import causal_attention, rotary_cos_sin
from jetnas.ops.backend import Backend, resolve_backend
from jetnas.ops.fused import rotary, shared_input_linear


class Attention(TokenMixer):
    """Causal GQA attention with rotary positions.

    Args:
        hidden_size: model width D.
        num_heads: query heads H.
        num_kv_heads: key/value heads (GQA); defaults to H.
        head_dim: defaults to D // H.
        window_size: sliding window (the query and `window_size - 1` tokens before it); None for full attention.
        qkv_bias / o_bias: biases on the input / output projections (Qwen2: True / False; Llama: False / False).
        qk_norm: RMS-normalise q and k per head before RoPE (Qwen3).
        norm_eps: eps of the QK norms.
        rope_theta: RoPE base, used when the caller passes positions rather than precomputed (cos, sin).
        backend: a `Backend` or "auto" | "torch" | "triton", resolved once here: the QK norms and the rotary
            embedding (`jetnas.ops.fused.rotary`) run under it, and so do a window's prefill attention without
            gradients (`jetnas.ops.triton_attention`) and the engine's decode attention over this layer's cache
            (`jetnas.engine.graph`).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        window_size: int | None = None,
        qkv_bias: bool = True,
        o_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        rope_theta: float = 1e6,
        backend: Backend | str = "auto",
    ):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if window_size is not None and window_size < 1:
            raise ValueError(f"window_size must be >= 1 or None, got {window_size}")
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.window_size, self.rope_theta = window_size, rope_theta
        self.backend = resolve_backend(backend)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=norm_eps, backend=self.backend)
            self.k_norm = RMSNorm(head_dim, eps=norm_eps, backend=self.backend)
        else:
            self.q_norm = self.k_norm = None

    @property
    def layer_type(self) -> str:
        return "attn" if self.window_size is None else "swa"

    def forward(self, hidden_states, state=None, *, attention_mask=None, position_ids=None,
                position_embeddings=None, use_cache=False):
        return self.attend(hidden_states, state, self.window_size, attention_mask=attention_mask,
                           position_ids=position_ids, position_embeddings=position_embeddings, use_cache=use_cache)

    def attend(self, hidden_states, state, window_size: int | None, *, attention_mask=None, position_ids=None,
               position_embeddings=None, use_cache=False):
        """`forward` with an explicit window (None: full attention). The PostNAS super-network runs the same
        pretrained weights as `attn` and as `swa` through this."""
        B, T, _ = hidden_states.shape
        if state is None and use_cache:
            state = KVState(window_size)
        if position_embeddings is None:
            if position_ids is None:
                start = 0 if state is None else state.get_seq_length()
                position_ids = torch.arange(start, start + T, device=hidden_states.device).expand(B, T)
            position_embeddings = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta)
        q, k, v = self.project(hidden_states, *position_embeddings)
        if state is not None:
            k_all, v_all = state.update(k.transpose(1, 2), v.transpose(1, 2))
            k, v = k_all.transpose(1, 2), v_all.transpose(1, 2)
        key_mask = None if attention_mask is None else attention_mask[:, -k.shape[1]:]
        o = causal_attention(q, k, v, window=window_size, key_padding_mask=key_mask, backend=self.backend)
        return self.o_proj(o.reshape(B, T, -1)), state

    def project(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries `[B, T, H, D]`, keys and values `[B, T, Hkv, D]` of `hidden_states`, QK-normed and rotated."""
        B, T, _ = hidden_states.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if all(p.bias is None for p in projections):
            # three products of one input: in training their gradients for it are summed inside the backward
            # products (`addmm_`), not by two adds of `[B, T, D]` tensors; the same products and weight gradients
            q, k, v = shared_input_linear(hidden_states, [p.weight for p in projections])
        else:
            q, k, v = (p(hidden_states) for p in projections)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rotary(q, cos, sin, self.backend), rotary(k, cos, sin, self.backend), v

    def cache_bytes(self, context_length, dtype=torch.bfloat16, state_dtype=torch.float32):
        # a sliding-window layer keeps the window's last `window - 1` keys between steps (the new token is the W-th)
        kept = context_length if self.window_size is None else min(context_length, self.window_size - 1)
        return 2 * kept * self.num_kv_heads * self.head_dim * dtype_bytes(dtype)

    def init_from_attention(self, attn: nn.Module) -> list[str]:
        """Load another attention layer's weights (same shapes required): `swa` from `attn` shares the weights."""
        self.load_state_dict(attn.state_dict(), strict=True)
        return [name for name, _ in self.named_parameters()]
