"""Gated linear attention (GLA, RetNet, Mamba2's SSD): a decaying outer-product memory, in PyTorch.

Per head, with state `S` of shape `[K, V]`:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

`g` is the log-space decay: `[B, T, H, K]` (one per key channel, GLA) or `[B, T, H]` (one per head: RetNet's
constant decay, Mamba2's data-dependent one). Forms as in `delta_rule.py`: a token-by-token reference, a chunked
parallel form (exact for any decay: no division by cumulative decays), and a one-token step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetnas.ops import _fla
from jetnas.ops.backend import Backend, as_backend
from jetnas.ops.utils import check_cu_seqlens, check_state, compute_dtype


def _check_inputs(q, k, v, g, initial_state, cu_seqlens):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {list(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {list(q.shape)}, got {list(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {list(v.shape)}")
    if tuple(g.shape) not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"g must be [B, T, H] or [B, T, H, K] = [{B}, {T}, {H}, {K}], got {list(g.shape)}")
    N = check_cu_seqlens(cu_seqlens, B, T)
    V = v.shape[-1]
    check_state(initial_state, (N, H, K, V), "initial_state")
    return B, T, H, K, V, N


def gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. `q, k [B, H, K]`, `v [B, H, V]`, `g [B, H]` or `[B, H, K]`, `state [B, H, K, V]` or None.

    Returns `(o [B, H, V] in v's dtype, new_state [B, H, K, V] float32/float64)`.
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [B, H, K] and v [B, H, V], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    B, H, K = q.shape
    V = v.shape[-1]
    check_state(state, (B, H, K, V), "state")
    dtype = compute_dtype(q, k, v, state)
    scale = K**-0.5 if scale is None else scale
    S = torch.zeros(B, H, K, V, dtype=dtype, device=q.device) if state is None else state.to(dtype)
    decay = g.to(dtype).exp()
    decay = decay[..., None, None] if decay.dim() == 2 else decay[..., None]
    S = S * decay + k.to(dtype)[..., :, None] * v.to(dtype)[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.to(dtype) * scale, S)
    return o.to(v.dtype), S


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token GLA, the ground truth.

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]`.
        g: log decay `[B, T, H, K]` (per key channel) or `[B, T, H]` (per head).
        scale: defaults to `K ** -0.5`.
        initial_state: `[N, H, K, V]`; output_final_state: return the final `[N, H, K, V]` state.
        cu_seqlens: `[N + 1]` packed-sequence boundaries (B == 1).

    Returns:
        `(o [B, T, H, V] in v's dtype, final_state or None)`.
    """
    B, T, H, K, V, N = _check_inputs(q, k, v, g, initial_state, cu_seqlens)
    segments = [(0, T)] if cu_seqlens is None else list(zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]))
    o = torch.empty_like(v)
    finals = []
    dtype = compute_dtype(q, k, v, initial_state)
    for n, (s, e) in enumerate(segments):
        S = None if initial_state is None else initial_state[n : n + 1] if cu_seqlens is not None else initial_state
        for t in range(s, e):
            o[:, t], S = gla_step(q[:, t], k[:, t], v[:, t], g[:, t], S, scale)
        if S is None:
            S = torch.zeros(B if cu_seqlens is None else 1, H, K, V, dtype=dtype, device=q.device)
        finals.append(S.to(dtype))
    return o, (torch.cat(finals, 0) if output_final_state else None)


def _chunk_fixed_length(q, k, v, g, scale, S0, chunk_size):
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] or [B, T, H, K]; S0 [B, H, K, V] (compute dtype)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    per_channel = g.dim() == 4
    C = chunk_size
    NC = -(-T // C)
    pad = NC * C - T
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, 0, 0, 0, 0, pad)) if per_channel else F.pad(g, (0, 0, 0, pad))

    def chunks(x):  # [B, T, H, ...] -> [B, H, NC, C, ...]
        return x.reshape(B, NC, C, H, *x.shape[3:]).movedim(3, 1)

    q, k, v, g = map(chunks, (q, k, v, g))
    G = g.cumsum(3)  # decay from the chunk start through position i
    idx = torch.arange(C, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    if per_channel:
        # exact pairwise decays [.., C, C, K]; masked before exp so nothing above the diagonal can overflow
        # in place on the fresh difference: the [.., C, C, K] tensor is the largest here, and a new one per op cost
        # 12% of a [2, 192] layer forward on one CPU thread (autograd allows both: the difference's backward needs
        # neither input nor output, and exp's saves its own output)
        pair = (G[..., :, None, :] - G[..., None, :, :]).masked_fill_(~causal[..., None], float("-inf")).exp_()
        attn = torch.einsum("...ik,...jk,...ijk->...ij", q, k, pair)
        q_decayed = q * G.exp()
        k_to_end = k * (G[..., -1:, :] - G).exp()
        chunk_decay = G[..., -1, :].exp()[..., None]  # [B, H, NC, K, 1]
    else:
        pair = (G[..., :, None] - G[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()
        attn = (q @ k.transpose(-1, -2)) * pair
        q_decayed = q * G.exp()[..., None]
        k_to_end = k * (G[..., -1:] - G).exp()[..., None]
        chunk_decay = G[..., -1].exp()[..., None, None]  # [B, H, NC, 1, 1]
    S = S0
    out = []
    for c in range(NC):
        out.append(scale * (q_decayed[:, :, c] @ S + attn[:, :, c] @ v[:, :, c]))
        S = chunk_decay[:, :, c] * S + k_to_end[:, :, c].transpose(-1, -2) @ v[:, :, c]
    o = torch.stack(out, 2).movedim(1, 3).reshape(B, NC * C, H, V)[:, :T]
    return o, S


def naive_chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA, same contract as `naive_recurrent_gla`; differentiable.

    Decays inside a chunk are formed pairwise (`exp(G_i - G_j)`, never `exp(G_i) / exp(G_j)`), so the result is
    exact for arbitrarily strong decay. `chunk_size` defaults to 16 for per-channel decay (the pairwise tensor is
    `C * C * K` per chunk) and 64 for per-head decay.
    """
    B, T, H, K, V, N = _check_inputs(q, k, v, g, initial_state, cu_seqlens)
    chunk_size = chunk_size or (16 if g.dim() == 4 else 64)
    dtype = compute_dtype(q, k, v, initial_state)
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf, gf = q.to(dtype), k.to(dtype), v.to(dtype), g.to(dtype)
    segments = [(0, T)] if cu_seqlens is None else list(zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]))
    outs, finals = [], []
    for n, (s, e) in enumerate(segments):
        rows = B if cu_seqlens is None else 1
        if initial_state is None:
            S0 = torch.zeros(rows, H, K, V, dtype=dtype, device=q.device)
        else:
            S0 = (initial_state if cu_seqlens is None else initial_state[n : n + 1]).to(dtype)
        if e == s:
            finals.append(S0)
            continue
        o_n, S = _chunk_fixed_length(qf[:, s:e], kf[:, s:e], vf[:, s:e], gf[:, s:e], scale, S0, chunk_size)
        outs.append(o_n)
        finals.append(S)
    o = torch.cat(outs, 1) if outs else vf[:, :0]
    return o.to(v.dtype), (torch.cat(finals, 0) if output_final_state else None)


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: Backend | str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA: fla's `chunk_gla` / `chunk_simple_gla` on CUDA with `backend="triton"`, else the reference."""
    _check_inputs(q, k, v, g, initial_state, cu_seqlens)
    if as_backend(backend).runs_fla(q):
        return _fla.chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return naive_chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: Backend | str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token GLA (decode): fla's fused recurrent kernels on CUDA with `backend="triton"`, else the reference."""
    _check_inputs(q, k, v, g, initial_state, cu_seqlens)
    if as_backend(backend).runs_fla(q):
        return _fla.fused_recurrent_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return naive_recurrent_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
