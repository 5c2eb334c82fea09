"""Causal sliding-window attention forward as one Triton kernel (FlashAttention-2 style), for prefill and evaluation
under no_grad. Contract and reference: `jetnas.ops.attention.causal_attention` (its mask path, `attention_mask`).

Why: a long prompt through a window went to `_windowed_by_blocks`, which cuts the queries into blocks of 2W, builds
a boolean mask per block and calls SDPA with it: a materialised mask read by a kernel that cannot skip the tiles it
hides, several launches per layer and a `torch.cat`. On an H100 the SmolLM2-135M hybrid's two window-512 layers
took ~0.41 ms each at 8K tokens, twice a full causal layer (issue 16; derived from the 8K prefill profile: SDPA's
1.24 ms for the hybrid's four attention layers less two full causal layers at the teacher's 0.21 ms each).

Here one program owns a block of BLOCK_M queries of one (batch, head) and walks only the key blocks its queries'
windows reach: from `max(0, first query - W + 1)` rounded down to BLOCK_N, up to the last query. Softmax is online
(running max and sum in float32, FlashAttention-2's rescaling). The key blocks that every query of the block sees
whole run without a mask; only the boundary blocks (the window's lower edge, the causal diagonal, the keys' ragged
end) compute one. Grouped-query heads read their key/value head in place; q, k and v are read through their strides
(the attention layer passes views of a fused q|k|v product), nothing is copied.

Forward only: training keeps SDPA, whose backward exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from jetnas.ops.attention import check_attention_inputs


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """`a @ b` accumulated in float32; UPCAST multiplies half-precision operands as float32 (exact products, so the
    same numbers up to the order of the sum): Triton's CPU interpreter multiplies bfloat16 tiles as their raw bits."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _swa_fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n0, rows_abs, Tk, W, skt, svt, qk_scale,
                  MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key block `[n0, n0 + BLOCK_N)` folded into the running `(acc, m_i, l_i)` of the queries at absolute
    positions `rows_abs`; MASKED applies causality, the window and the keys' end (boundary blocks only)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        in_keys = cols < Tk
        k = tl.load(k_ptrs + cols[None, :].to(tl.int64) * skt, mask=in_keys[None, :], other=0.0)
        v = tl.load(v_ptrs + cols[:, None].to(tl.int64) * svt, mask=in_keys[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + cols[None, :].to(tl.int64) * skt)
        v = tl.load(v_ptrs + cols[:, None].to(tl.int64) * svt)
    s = _dot(q, k, PRECISION, UPCAST) * qk_scale
    if MASKED:
        seen = (cols[None, :] <= rows_abs[:, None]) & (cols[None, :] > rows_abs[:, None] - W) & in_keys[None, :]
        s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no key yet (a lower-edge block wholly outside its window) keeps m = -inf: subtract 0
    # instead, so that its exp2 gives 0, not exp2(-inf + inf) = nan
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, m_new, l_i


@triton.jit
def _swa_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, scale, Tq, Tk, H, W,
                    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Program (m, b * H + h): queries `m * BLOCK_M ..` of head h of row b, `q [B, Tq, H, D]` (absolute positions
    offset by Tk - Tq), against `k, v [B, Tk, H // G, D]`; writes `o [B, Tq, H, D]`. Unit stride along D."""
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hkv = (h // G).to(tl.int64)
    offset = Tk - Tq
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_abs = rows + offset
    in_rows = rows < Tq
    d = tl.arange(0, BLOCK_D)

    q = tl.load(q_ptr + b * sqb + h.to(tl.int64) * sqh + rows[:, None].to(tl.int64) * sqt + d[None, :],
                mask=in_rows[:, None], other=0.0)
    # k read as `[D, BLOCK_N]` (already transposed for q @ k), v as `[BLOCK_N, D]`
    k_ptrs = k_ptr + b * skb + hkv * skh + d[:, None]
    v_ptrs = v_ptr + b * svb + hkv * svh + d[None, :]
    # softmax in base 2 (`exp2`), the scale folded into the scores: `exp(x s) = exp2(x s / ln 2)`
    qk_scale = scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    first = mb * BLOCK_M + offset  # absolute position of the block's first query
    last = tl.minimum(first + BLOCK_M, Tk)  # one past the last key any of its queries sees
    lo = tl.maximum(first - W + 1, 0) // BLOCK_N * BLOCK_N
    # blocks in [whole_lo, whole_hi) are seen whole by every query of the block (the block's last row included,
    # even past Tq: masking more than needed is harmless): above the last row's window edge, at or below the
    # first row's diagonal
    whole_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(first + BLOCK_M - W, 0), BLOCK_N) * BLOCK_N, lo), last)
    whole_hi = tl.maximum(tl.minimum((first + 1) // BLOCK_N * BLOCK_N, last), whole_lo)
    for n0 in range(lo, whole_lo, BLOCK_N):
        acc, m_i, l_i = _swa_fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n0, rows_abs, Tk, W, skt, svt, qk_scale,
                                      True, BLOCK_N, PRECISION, UPCAST)
    for n0 in range(whole_lo, whole_hi, BLOCK_N):
        acc, m_i, l_i = _swa_fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n0, rows_abs, Tk, W, skt, svt, qk_scale,
                                      False, BLOCK_N, PRECISION, UPCAST)
    for n0 in range(whole_hi, last, BLOCK_N):
        acc, m_i, l_i = _swa_fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n0, rows_abs, Tk, W, skt, svt, qk_scale,
                                      True, BLOCK_N, PRECISION, UPCAST)

    # every real query sees at least itself; rows past Tq may see nothing (l = 0) and are not stored
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = o_ptr + b * sob + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * sot + d[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=in_rows[:, None])


#: the head dims the kernel is built for (BLOCK_D = D, no padding columns)
HEAD_DIMS = (64, 128)


def default_tiles(head_dim: int) -> dict:
    """The launch for a head dim on Hopper: FlashAttention-2 forward tiles as in Triton's fused-attention tutorial
    (128 queries x 64 keys; 8 warps for D = 128). Not tuned for this kernel yet: `benchmarks/swa_bench.py --sweep`
    times the alternatives."""
    return {"block_m": 128, "block_n": 64, "num_warps": 4 if head_dim <= 64 else 8, "num_stages": 3}


def triton_swa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                       scale: float | None = None, block_m: int | None = None, block_n: int | None = None,
                       num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Causal attention through a sliding window, forward only.

    Args:
        q: `[B, Tq, H, D]`, the last Tq positions of the keys' sequence (any strides, unit stride along D).
        k, v: `[B, Tk, Hkv, D]`, H a multiple of Hkv (any strides, unit stride along D); D in `HEAD_DIMS`.
        window: the query at absolute position p sees keys `max(0, p - window + 1) .. p`; None: all keys up to p
            (full causal attention, the same kernel with window = Tk).
        scale: defaults to `D ** -0.5`.
        block_m, block_n, num_warps, num_stages: the launch (defaults: `default_tiles(D)`); for the tile sweep.

    Returns:
        `[B, Tq, H, D]` contiguous, in q's dtype. Float32 inputs are multiplied in full float32 precision (not
        TF32), so that the kernel can be checked tightly against the reference.
    """
    check_attention_inputs(q, k, v, window)
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if D not in HEAD_DIMS or v.shape[-1] != D:
        raise ValueError(f"the Triton attention kernel takes head dims {HEAD_DIMS} (v's the same as q's), got "
                         f"{D} and {v.shape[-1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    tiles = default_tiles(D)
    block_m, block_n = block_m or tiles["block_m"], block_n or tiles["block_n"]
    o = torch.empty(B, Tq, H, D, dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    grid = (triton.cdiv(Tq, block_m), B * H)
    _swa_fwd_kernel[grid](
        q, k, v, o, D**-0.5 if scale is None else scale, Tq, Tk, H, Tk if window is None else min(window, Tk),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        G=H // Hkv, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=D,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # CPU tensors reach the kernel only under Triton's interpreter, whose tl.dot is wrong for bfloat16
        UPCAST=q.device.type == "cpu" and q.dtype != torch.float32,
        num_warps=num_warps or tiles["num_warps"], num_stages=num_stages or tiles["num_stages"])
    return o
