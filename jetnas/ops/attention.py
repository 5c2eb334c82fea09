"""Causal softmax attention with grouped-query heads, rotary positions, an optional sliding window and padding.

`scaled_dot_product_attention` dispatches to FlashAttention / cuDNN / memory-efficient kernels on GPU and to a fused
CPU kernel otherwise; the masking rules are spelled out once, here. One exception: a sliding window over a prompt,
when no gradient is needed and the backend runs our Triton kernels, goes to `jetnas.ops.triton_attention` (one
launch that visits only the key blocks the window reaches; this module's mask path is its reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from jetnas.ops.backend import Backend, as_backend, needs_grad


def rotary_cos_sin(
    position_ids: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for the given positions: `position_ids [B, T]` -> `(cos, sin)`, each `[B, T, head_dim]`.

    The rotate-half layout of Llama/Qwen (frequencies duplicated over the two halves), computed in float32.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [B, T, H, D]` by `cos, sin [B, T, D]` (rotate-half convention)."""
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention_mask(
    q_len: int,
    k_len: int,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
    force: bool = False,
    sinks: int = 0,
) -> torch.Tensor | None:
    """Boolean visibility `[B or 1, 1, q_len, k_len]` (True = attend), or None when plain causal suffices.

    The queries are the last `q_len` of the `k_len` keys. Query i (absolute index `i + k_len - q_len`) sees key j
    when `j <= i + k_len - q_len`, and, with a window, when `j > i + k_len - q_len - window` (it sees itself and
    the `window - 1` keys before it). Padded keys (`key_padding_mask == 0`) are never seen; a query that would see
    nothing (a padded position) sees everything instead, so its (discarded) output stays finite. Unless `force`,
    None is returned when only the causal rule applies.

    With a window and `sinks` S > 0, query i also sees the first S keys (StreamingLLM's attention sinks), still
    causally: key j < S without padding, the first S unpadded keys of its row with `key_padding_mask`.
    """
    if window is None and key_padding_mask is None and not force:
        return None
    qi = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    kj = torch.arange(k_len, device=device)[None, :]
    visible = kj <= qi
    if window is not None and not sinks:
        visible = visible & (kj > qi - window)
    elif window is not None:
        # without padding the sinks are keys 0..sinks-1; with it, the first `sinks` real keys of each row
        # (`cumsum` counts the real keys up to j), so the visibility gets a batch dimension
        sink = kj < sinks if key_padding_mask is None else \
            (key_padding_mask.long().cumsum(-1) <= sinks)[:, None, None, :]
        visible = visible & ((kj > qi - window) | sink)
    if visible.dim() == 2:
        visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :].bool()
        visible = visible | ~visible.any(-1, keepdim=True)
    return visible


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
    """Raise `ValueError` unless q `[B, Tq, H, D]`, k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, Dv]` fit `causal_attention`
    (H a multiple of Hkv, Tq <= Tk) and the window is None or >= 1."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, T, H, D], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[-1] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k [B, Tk, Hkv, {D}] and v [B, Tk, Hkv, Dv] do not fit q {list(q.shape)}: "
                         f"got {list(k.shape)}, {list(v.shape)}")
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    if Tq > Tk:
        raise ValueError(f"more queries ({Tq}) than keys ({Tk}): the keys must include the queries' own positions")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sinks: int = 0,
    backend: Backend | str = "torch",
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention with grouped-query heads.

    Args:
        q: `[B, Tq, H, D]`, the last Tq positions of the keys' sequence.
        k: `[B, Tk, Hkv, D]` with H a multiple of Hkv (GQA); v: `[B, Tk, Hkv, Dv]`.
        scale: defaults to `D ** -0.5`.
        window: each query sees itself and the `window - 1` previous keys; None for full attention.
        key_padding_mask: `[B, Tk]`, 1 for real tokens, 0 for padding.
        sinks: with a window, each query also sees the first `sinks` keys (attention sinks, StreamingLLM): query t
            of a sequence starting at key 0 sees keys `max(0, t - window + 1) .. t` and `0 .. min(sinks, t + 1) - 1`
            (with padding, the first `sinks` real keys of its row). Default 0: a plain window. Ignored without a
            window (full attention sees those keys anyway). Computed through a materialised `[Tq, Tk]` mask (the
            windowed-teacher probe of the placement search, prompts of a few thousand tokens), not the blockwise
            path of plain windows.
        backend: a `Backend` or its name (default "torch": SDPA everywhere). Where it runs our Triton kernels on
            q, a plain window (no padding mask, no sinks) over more than one query, with no gradient needed, runs
            `jetnas.ops.triton_attention.triton_swa_forward` (head dims 64 and 128, half or float32 inputs);
            everything else, full attention included (cuDNN / FlashAttention are faster there), stays on SDPA.

    Returns:
        `[B, Tq, H, Dv]` in q's dtype.
    """
    check_attention_inputs(q, k, v, window)
    B, Tq, H, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an integer >= 0, got {sinks!r}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, Tk):
        raise ValueError(f"key_padding_mask must be [B, Tk] = [{B}, {Tk}], got {list(key_padding_mask.shape)}")
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    if (window is not None and key_padding_mask is None and not sinks and not Tq == Tk <= window
            and _swa_kernel_takes(q, k, v, backend)):
        # a prompt no longer than the window is plain causal attention: SDPA's flash path below is faster there
        # (one H100, benchmarks/results/2026-12-07_h100_window_conv: 8.4 vs 10.9 us at 300 tokens; in causal mode
        # at 8K-64K the kernel takes 1.20-1.38x SDPA's time)
        from jetnas.ops.triton_attention import triton_swa_forward

        return triton_swa_forward(q, k, v, window, scale)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if sinks and window is not None and window < Tk:
        # the first keys are visible beyond the window: one mask over all keys (no fast path; sinks == 0 never
        # comes here, so plain windows keep theirs)
        mask = attention_mask(Tq, Tk, window, key_padding_mask, q.device, sinks=sinks)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)
        return o.transpose(1, 2)
    if window is not None and key_padding_mask is None and Tq > 2 * window:
        # a long prompt through a sliding window: query blocks against their own key band, not every key
        return _windowed_by_blocks(qt, kt, vt, window, scale).transpose(1, 2)
    mask = attention_mask(Tq, Tk, window, key_padding_mask, q.device)
    if mask is None and 1 < Tq < Tk:
        # a chunk of queries after cached keys: causal aligned to the last key, with no mask materialised
        kt, vt = _repeat_kv(kt, H), _repeat_kv(vt, H)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(Tq, Tk), scale=scale)
        return o.transpose(1, 2)
    # SDPA's own causal flag keeps the FlashAttention path; a single query sees every key and needs no mask
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=mask is None and Tq == Tk > 1,
                                       scale=scale, enable_gqa=H != Hkv)
    return o.transpose(1, 2)


def _swa_kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Backend | str) -> bool:
    """Whether the Triton window kernel takes these inputs (the window, padding and sinks checked by the caller).

    Not for a single query: a decode step through the layer sees at most `window` cached keys, one SDPA call over
    them with a `[1, Tk]` mask, and a kernel program of BLOCK_M query rows would compute one. Not when a gradient is
    needed: the kernel has no backward (training keeps SDPA's).
    """
    backend = as_backend(backend)
    if q.shape[1] < 2 or not backend.window_kernel or not backend.runs_triton(q):
        return False
    if needs_grad(q, k, v):
        return False
    from jetnas.ops.triton_attention import HEAD_DIMS

    return (q.shape[-1] in HEAD_DIMS and v.shape[-1] == q.shape[-1] and q.dtype == k.dtype == v.dtype
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.device == q.device == v.device)


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[B, Hkv, T, D]` -> `[B, heads, T, D]` (the lower-right causal bias does not take grouped heads)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], 1)


def _windowed_by_blocks(qt, kt, vt, window: int, scale: float | None) -> torch.Tensor:
    """Sliding-window attention over `[B, H, Tq, D]` queries (the last Tq of the Tk keys) in query blocks of
    2 * window, each against the keys its window reaches: O(Tq * window) instead of O(Tq * Tk)."""
    Tq, Tk = qt.shape[2], kt.shape[2]
    block = 2 * window
    gqa = qt.shape[1] != kt.shape[1]
    out = []
    for i0 in range(0, Tq, block):
        i1 = min(i0 + block, Tq)
        a0, a1 = i0 + Tk - Tq, i1 + Tk - Tq  # absolute positions of the block's queries
        k0 = max(0, a0 - window + 1)
        mask = attention_mask(i1 - i0, a1 - k0, window, None, qt.device)
        o = F.scaled_dot_product_attention(qt[:, :, i0:i1], kt[:, :, k0:a1], vt[:, :, k0:a1], attn_mask=mask,
                                           scale=scale, enable_gqa=gqa)
        out.append(o.transpose(1, 2))
    # joined as [B, Tq, H, D] (the layout SDPA's CUDA kernels write each block in), so that the caller's
    # `o.transpose(1, 2).reshape(B, T, H * D)` is a view, not a second copy of the output
    return torch.cat(out, 1).transpose(1, 2)
