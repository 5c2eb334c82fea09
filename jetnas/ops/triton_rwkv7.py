"""Triton kernel of RWKV-7's decode step (contract and reference in `jetnas.ops.decode.rwkv7_step_`).

One program per (row, head, value block) reads its `[K, BV]` tile of the float32 state once, applies the step
`S = diag(exp(w)) S + b (a^T S) + k v^T`, reads `o = S^T (scale r)` and writes the tile back in place: the state is
read and written once per step at a fixed address (what a captured CUDA graph needs). A program holds every key
channel of its value columns, so `a^T S` needs no exchange between programs and the in-place write is safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rwkv7_step_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s_ptr, o_ptr, scale,
                       K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1)
    kk = tl.arange(0, BK)
    vv = vb * BV + tl.arange(0, BV)
    kmask = kk < K
    vmask = vv < V
    r = tl.load(r_ptr + bh * K + kk, mask=kmask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + bh * K + kk, mask=kmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + bh * K + kk, mask=kmask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + bh * K + kk, mask=kmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + bh * K + kk, mask=kmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + bh * V + vv, mask=vmask, other=0.0).to(tl.float32)
    smask = kmask[:, None] & vmask[None, :]
    p_s = s_ptr + bh * K * V + kk[:, None] * V + vv[None, :]
    h = tl.load(p_s, mask=smask, other=0.0)
    # a^T S of the previous state, then decay, the rank-one transition and the write
    sa = tl.sum(a[:, None] * h, 0)
    h = tl.exp(w)[:, None] * h + b[:, None] * sa[None, :] + k[:, None] * v[None, :]
    o = tl.sum(h * (r * scale)[:, None], 0)
    tl.store(p_s, h, mask=smask)
    tl.store(o_ptr + bh * V + vv, o.to(o_ptr.dtype.element_ty), mask=vmask)


def triton_rwkv7_step_(r, w, k, v, a, b, state, scale=1.0):
    """`r, w, k, a, b [B, H, K]`, `v [B, H, V]`, `state [B, H, K, V]` float32 contiguous (updated in place) ->
    `o [B, H, V]` in v's dtype."""
    B, H, K = r.shape
    V = v.shape[-1]
    if state.shape != (B, H, K, V):
        raise ValueError(f"state must be {[B, H, K, V]}, got {list(state.shape)}")
    r, w, k, v, a, b = (t.contiguous() for t in (r, w, k, v, a, b))
    o = torch.empty_like(v)
    BV = min(64, triton.next_power_of_2(V))
    _rwkv7_step_kernel[(B * H, triton.cdiv(V, BV))](
        r, w, k, v, a, b, state, o, scale, K=K, V=V, BK=triton.next_power_of_2(K), BV=BV, num_warps=4)
    return o
