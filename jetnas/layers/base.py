"""The contract every token mixer (the attention slot of a layer) follows, and the per-sequence states they keep.

    out, state = layer(hidden_states, state, attention_mask=..., position_ids=..., use_cache=...)

- `hidden_states [B, T, D]` in, `out [B, T, D]` out.
- `state`: None, or the layer's cache object, updated in place and returned. With `use_cache=True` and no state,
  a fresh one is made. Attention layers keep a `KVState` (or anything with transformers' cache-layer methods
  `update(k, v) -> (keys, values)` and `get_seq_length()`); linear-attention layers keep a `RecurrentState`.
- `attention_mask [B, T_total]`: 1 for real tokens, 0 for padding, right-aligned with the current tokens (its
  last T columns are this call's tokens). Padded tokens leave a linear layer's state untouched and are never
  attended to, so left-padded batches give each row the result it would get alone.
- `position_ids [B, T]` (or precomputed `position_embeddings = (cos, sin)`) for layers that use positions; by
  default positions continue from the state's length.
- Prefill vs. decode is inferred from the inputs: one token with a state is a decode step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from jetnas.ops.backend import Backend


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors, float64 kept (so float64 runs stay exact end to end)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class RecurrentState:
    """Memory of one linear-attention layer for a batch of sequences.

    Attributes:
        recurrent: `[B, H, K, V]` float32 matrix memory, or None before the first token.
        conv: short-conv name -> `[B, D, W - 1]` last inputs of that convolution.
        seq_length: tokens seen so far.
    """

    recurrent: torch.Tensor | None = None
    conv: dict[str, torch.Tensor] = field(default_factory=dict)
    seq_length: int = 0

    def get_seq_length(self) -> int:
        return self.seq_length

    def nbytes(self) -> int:
        tensors = [self.recurrent, *self.conv.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def index_select(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (beam search, finished sequences)."""
        if self.recurrent is not None:
            self.recurrent = self.recurrent.index_select(0, index.to(self.recurrent.device))
        self.conv = {k: v.index_select(0, index.to(v.device)) for k, v in self.conv.items()}


class KVState:
    """Keys and values of one attention layer, `[B, Hkv, T, D]` (transformers' layout).

    With `window`, only the last `window - 1` tokens are kept between calls: all the next query can see besides
    itself. `update` returns the kept tokens plus the new ones, which is what the new queries attend over.
    """

    def __init__(self, window: int | None = None):
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.seq_length = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.seq_length += keys.shape[-2]
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], -2), torch.cat([self.values, values], -2)
        keep = keys.shape[-2] if self.window is None else min(self.window - 1, keys.shape[-2])
        self.keys, self.values = keys[..., keys.shape[-2] - keep:, :], values[..., values.shape[-2] - keep:, :]
        return keys, values

    def get_seq_length(self) -> int:
        return self.seq_length

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def index_select(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))


def padding_mask(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """The `[B, T]` mask of this call's tokens from a right-aligned `[B, T_total]` mask; None if all are real."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < T:
        raise ValueError(f"attention_mask must be [B, T_total >= {T}] with 1 for real tokens, got "
                         f"{list(attention_mask.shape)}")
    mask = attention_mask[:, -T:]
    return None if bool(mask.all()) else mask


def begin_linear(x: torch.Tensor, state: RecurrentState | None, attention_mask: torch.Tensor | None,
                 use_cache: bool) -> tuple[torch.Tensor, torch.Tensor | None, RecurrentState | None, bool]:
    """What every linear block does first with its input `x [B, T, D]`: padded tokens (`attention_mask` 0) become
    zeros, so they feed nothing into a short convolution or a token shift (what else a block does with the mask,
    no write and no decay, is its own); a fresh `RecurrentState` when caching without one; and whether this call
    is a one-token decode step. Returns `(x, mask [B, T] or None, state, step)`."""
    mask = padding_mask(attention_mask, x.shape[1])
    if mask is not None:
        x = x * mask[..., None].to(x.dtype)
    if state is None and use_cache:
        state = RecurrentState()
    return x, mask, state, state is not None and x.shape[1] == 1


class TokenMixer(nn.Module, ABC):
    """Base class of every block that can fill a layer's attention slot (see the module docstring)."""

    #: the registry key, e.g. "attn", "jet"
    layer_type: ClassVar[str]

    @abstractmethod
    def forward(
        self,
        hidden_states: torch.Tensor,
        state=None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        use_cache: bool = False,
    ):
        """See the module docstring. Returns `(out [B, T, D], state or None)`."""

    @abstractmethod
    def cache_bytes(self, context_length: int, dtype: torch.dtype = torch.bfloat16,
                    state_dtype: torch.dtype = torch.float32) -> int:
        """Bytes this layer keeps per sequence after `context_length` tokens (`dtype` for KV and conv inputs,
        `state_dtype` for recurrent states)."""

    def init_from_attention(self, attn: nn.Module) -> list[str]:
        """Copy what fits from a pretrained attention layer (see `inherit_from_attention`); returns the names of
        the parameters that were inherited."""
        return []


def attention_head_weights(attn: nn.Module) -> dict[str, torch.Tensor]:
    """A pretrained attention layer's projections, per query head.

    Returns `q, k, v`: `[H, head_dim, D_in]` (k and v repeated over each KV group, as GQA uses them) and
    `o`: `[D_out, H, head_dim]`. Biases are not returned: the linear blocks have none to receive them.
    """
    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    group = H // Hkv

    def per_head(w, heads):
        return w.detach().reshape(heads, hd, w.shape[-1])

    return {
        "q": per_head(attn.q_proj.weight, H),
        "k": per_head(attn.k_proj.weight, Hkv).repeat_interleave(group, 0),
        "v": per_head(attn.v_proj.weight, Hkv).repeat_interleave(group, 0),
        "o": attn.o_proj.weight.detach().reshape(-1, H, hd),
    }


@torch.no_grad()
def copy_heads(dst: torch.Tensor, src: torch.Tensor, heads: int, head_dim: int, out_dim: bool = True) -> bool:
    """Copy per-head weights `src` into the flat weight `dst` when the head split matches exactly.

    `src` is `[H, hd, D]` (out_dim=True: rows of a projection into heads) or `[D, H, hd]` (an output projection).
    Returns whether anything was copied.
    """
    split = tuple(src.shape[:2]) if out_dim else tuple(src.shape[1:])
    if split != (heads, head_dim):
        return False
    flat = src.reshape(heads * head_dim, -1) if out_dim else src.reshape(src.shape[0], -1)
    if flat.shape != dst.shape:
        return False
    dst.copy_(flat.to(dst.dtype))
    return True


def inherit_qkvo(block: nn.Module, attn: nn.Module, heads: int, head_k_dim: int, head_v_dim: int) -> list[str]:
    """The common inheritance rule of the linear blocks: `q_proj`, `k_proj` (K rows per head), `v_proj` and
    `o_proj` (V per head) are copied from a pretrained attention layer when the block has as many heads as its
    queries and K, resp. V, equals its head dim; k and v are repeated over each GQA group; biases are dropped
    (the linear blocks have none). Returns the names of the copied weights."""
    w = attention_head_weights(attn)
    inherited = [f"{n}_proj.weight" for n, d in (("q", head_k_dim), ("k", head_k_dim), ("v", head_v_dim))
                 if copy_heads(getattr(block, f"{n}_proj").weight, w[n], heads, d)]
    if copy_heads(block.o_proj.weight, w["o"], heads, head_v_dim, out_dim=False):
        inherited.append("o_proj.weight")
    return inherited


def updatable(state: torch.Tensor | None) -> bool:
    """Whether a recurrent state can be updated in place by the decode-step kernels (float32, contiguous)."""
    return state is not None and state.dtype == torch.float32 and state.is_contiguous()


def gla_recurrence(q, k, v, g, state: RecurrentState | None, step: bool, scale: float | None,
                   backend: Backend | str):
    """The gated-linear-attention recurrence of one layer call (GLA, RetNet, Mamba2): the chunked form for a
    prompt, and for a decode step the in-place step (`jetnas.ops.decode.gla_step_`: the state is read and written
    once, at a fixed address) when the cached state allows it, else fla's / the reference's recurrent form.
    Returns `(o, final_state)`; the final state is the cached one itself after an in-place step."""
    from jetnas.ops.decode import gla_step_
    from jetnas.ops.gla import chunk_gla, fused_recurrent_gla

    initial = None if state is None else state.recurrent
    if step and updatable(initial):
        return gla_step_(q[:, 0], k[:, 0], v[:, 0], g[:, 0], initial, scale, backend=backend)[:, None], initial
    rule = fused_recurrent_gla if step else chunk_gla
    return rule(q, k, v, g, scale=scale, initial_state=initial, output_final_state=state is not None,
                backend=backend)
