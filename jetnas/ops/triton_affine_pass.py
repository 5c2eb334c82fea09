"""The gated delta rule's inter-chunk state pass with one dependent matrix product per chunk (prefill, no grad).

Contract: fla 0.6's `chunk_gated_delta_rule_fwd_h` for equal-length sequences (`reference_state_pass` below is its
readable PyTorch form): token-major `k, w [B, T, H, K]`, `u [B, T, H, V]`, `g [B, T, H]` the log2-space decay
cumulated within each chunk of 64 (fla's `chunk_local_cumsum(..., scale=RCP_LN2)`), states `[K, V]`. Per chunk c,
from the state S_c at its start:

    v_new_c = U_c - W_c S_c
    S_{c+1} = d_c S_c + Kt_c^T v_new_c        (d_c = 2^g_last, Kt_c = k_c * 2^(g_last - g))

fla's kernel runs exactly that per chunk: two matrix products in a chain (W S, then Kt^T v_new), with the state
rounded to bf16 for the first. At batch 1 it is one program per (head, value block) walking the chunks in
sequence (9 programs on a 132-SM H100 for the SmolLM2 hybrid), so its time is the chain's latency: 3.35 of the
hybrid's 12.77 GPU-ms at 8K (benchmarks/results/2026-12-07_h100_chunked).

The update is affine in S, and its matrix does not depend on S:

    S_{c+1} = d_c S_c - M_c S_c + Kt_c^T U_c,     M_c = Kt_c^T W_c  [K, K]

so M_c is computed for every chunk at once beforehand (`_affine_m_kernel`, parallel over chunks and heads), and
the sequential kernel (`_affine_pass_kernel`) has one product on the state's path per chunk (M_c S_c); the other two
(Kt_c^T U_c, which needs no state, and W_c S_c for v_new, which nothing later in the chain needs) are off it, in the
loop or in parallel kernels before and after it (`VARIANTS`).
The decay d_c S_c stays a float32 elementwise product, as in fla: only the correction goes through the matrix unit.

Rounding: `precise=False` stores M in the inputs' dtype (bf16) and multiplies it into the state rounded to bf16, as
fla rounds the state for W S; `precise=True` keeps M and the state in float32 for that product (TF32 on a GPU).
Outputs as fla's: `h [B, NT, H, K, V]` (each chunk's initial state) in k's dtype, `v_new` in u's dtype, the final
state float32.

Measured slower (H200, 2026-12-07, benchmarks/results/2026-12-07_h200_affine): the pass alone 0.61-0.76x of fla's
at every shape, the SmolLM2 hybrid's 8K prefill 0.86x, Jet-Nemotron-2B's 64K prefill 0.95x. One product per step
is not what bounds the loop (fla's two-product step ~1.06 us, this one ~1.4 us): the per-step loads and stores
are. So `Backend.affine_state_pass` stays "off"; the kernel is kept, tested, as the measured alternative
(`benchmarks/gdn_segment_pass_bench.py --affine bf16,tf32`, `benchmarks/prefill_bench.py --affine-state-pass`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from jetnas.ops.backend import AFFINE_VARIANTS
from jetnas.ops.triton_attention import _dot


def reference_state_pass(k, w, u, g, initial_state=None, output_final_state=False, chunk_size=64):
    """The contract in PyTorch (fla 0.6's `chunk_gated_delta_rule_fwd_h`, equal-length sequences), computed in the
    inputs' dtype: `(h [B, NT, H, K, V], v_new [B, T, H, V], final [B, H, K, V] or None)`."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    NT = -(-T // chunk_size)
    S = k.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(k.dtype)
    h = k.new_empty(B, NT, H, K, V)
    v_new = torch.empty_like(u)
    for c in range(NT):
        s, e = c * chunk_size, min((c + 1) * chunk_size, T)
        h[:, c] = S
        vn = u[:, s:e].transpose(1, 2) - w[:, s:e].transpose(1, 2) @ S  # [B, H, c, V]
        v_new[:, s:e] = vn.transpose(1, 2)
        g_last = g[:, e - 1]  # [B, H]
        kt = (k[:, s:e] * torch.exp2(g_last[:, None] - g[:, s:e])[..., None]).transpose(1, 2)  # [B, H, c, K]
        S = torch.exp2(g_last)[..., None, None] * S + kt.transpose(-1, -2) @ vn
    return h, v_new, (S.float() if output_final_state else None)


@triton.jit
def _chunk_rows(i_t, i_bh, T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """Chunk i_t of (batch x head) i_bh: `(batch, head, the positions' mask, key offsets, their mask, the positions'
    token-major rows)`."""
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    return i_b, i_h, o_t < T, o_k, o_k < K, (i_b * T + o_t).to(tl.int64) * H + i_h


@triton.jit
def _affine_m_kernel(k_ptr, w_ptr, g_ptr, m_ptr, u_ptr, n_ptr, T, H: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISE: tl.constexpr,
                     PRE_N: tl.constexpr, UPCAST: tl.constexpr):
    """M_c = Kt_c^T W_c for one (chunk, batch x head): [K, K], stored as m's dtype; with PRE_N also
    N_c = Kt_c^T U_c ([K, V], float32, value block by value block)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h, m_t, o_k, m_k, rows = _chunk_rows(i_t, i_bh, T, H, K, BT, BK)
    NT = tl.cdiv(T, BT)
    b_k = tl.load(k_ptr + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_w = tl.load(w_ptr + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_g = tl.load(g_ptr + rows, mask=m_t, other=0.0)
    last = tl.minimum((i_t + 1) * BT, T) - 1
    b_gl = tl.load(g_ptr + (i_b * T + last).to(tl.int64) * H + i_h)
    b_kt = b_k.to(tl.float32) * tl.exp2(b_gl - b_g)[:, None]
    if PRECISE:
        b_m = _dot(tl.trans(b_kt), b_w.to(tl.float32), "tf32", UPCAST)
    else:
        b_m = _dot(tl.trans(b_kt.to(b_w.dtype)), b_w, "tf32", UPCAST)
    base = ((i_b * NT + i_t) * H + i_h).to(tl.int64) * K * K
    tl.store(m_ptr + base + o_k[:, None] * K + o_k[None, :], b_m.to(m_ptr.dtype.element_ty),
             mask=m_k[:, None] & m_k[None, :])
    if PRE_N:
        b_ktb = b_kt.to(b_k.dtype)  # rounded as the sequential kernel rounds it for its own Kt^T U
        n_base = ((i_b * NT + i_t) * H + i_h).to(tl.int64) * K * V
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            b_u = tl.load(u_ptr + rows[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
            b_n = _dot(tl.trans(b_ktb), b_u, "tf32", UPCAST)
            tl.store(n_ptr + n_base + o_k[:, None] * V + o_v[None, :], b_n, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _affine_pass_kernel(k_ptr, w_ptr, u_ptr, g_ptr, m_ptr, n_ptr, h_ptr, v_new_ptr, h0_ptr, ht_ptr, T,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PRECISE: tl.constexpr,
                        SAVE_V: tl.constexpr, PRE_N: tl.constexpr, UPCAST: tl.constexpr):
    """One (value block, batch x head) through every chunk in sequence: stores each chunk's initial state (and,
    with SAVE_V, its new values); the state's update has the one product M_c S_c on its path. PRE_N: N_c = Kt_c^T
    U_c is read (from `_affine_m_kernel`) instead of computed here."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    state = o_k[:, None] * V + o_v[None, :]  # [BK, BV] offsets in a [K, V] state
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0_ptr + i_bh.to(tl.int64) * K * V + state, mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(NT):
        _, _, m_t, _, _, rows = _chunk_rows(i_t, i_bh, T, H, K, BT, BK)
        tl.store(h_ptr + ((i_b * NT + i_t) * H + i_h).to(tl.int64) * K * V + state,
                 b_h.to(h_ptr.dtype.element_ty), mask=m_kv)
        b_hb = b_h.to(k_ptr.dtype.element_ty)
        last = tl.minimum((i_t + 1) * BT, T) - 1
        b_gl = tl.load(g_ptr + (i_b * T + last).to(tl.int64) * H + i_h)
        b_m = tl.load(m_ptr + ((i_b * NT + i_t) * H + i_h).to(tl.int64) * K * K + o_k[:, None] * K + o_k[None, :],
                      mask=m_k[:, None] & m_k[None, :], other=0.0)
        # the state's path: one product
        if PRECISE:
            b_ms = _dot(b_m.to(tl.float32), b_h, "tf32", UPCAST)
        else:
            b_ms = _dot(b_m, b_hb, "tf32", UPCAST)
        # off it: the new values (stored for the output kernel) and the state-free write Kt^T U
        if SAVE_V or not PRE_N:
            b_u = tl.load(u_ptr + rows[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if SAVE_V:
            b_w = tl.load(w_ptr + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_v = b_u.to(tl.float32) - _dot(b_w, b_hb, "tf32", UPCAST)
            tl.store(v_new_ptr + rows[:, None] * V + o_v[None, :], b_v.to(v_new_ptr.dtype.element_ty),
                     mask=m_t[:, None] & m_v[None, :])
        if PRE_N:
            b_n = tl.load(n_ptr + ((i_b * NT + i_t) * H + i_h).to(tl.int64) * K * V + state, mask=m_kv, other=0.0)
        else:
            b_k = tl.load(k_ptr + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_g = tl.load(g_ptr + rows, mask=m_t, other=0.0)
            b_kt = (b_k.to(tl.float32) * tl.exp2(b_gl - b_g)[:, None]).to(b_u.dtype)
            b_n = _dot(tl.trans(b_kt), b_u, "tf32", UPCAST)
        b_h = b_h * tl.exp2(b_gl) - b_ms + b_n
    if STORE_HT:
        tl.store(ht_ptr + i_bh.to(tl.int64) * K * V + state, b_h, mask=m_kv)


@triton.jit
def _affine_v_new_kernel(w_ptr, u_ptr, h_ptr, v_new_ptr, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr):
    """v_new_c = U_c - W_c S_c for one (chunk, batch x head, value block) from the stored states (rounded as the
    sequential kernel rounds S for this product), when the pass left it out of its loop."""
    i_t, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h, m_t, o_k, m_k, rows = _chunk_rows(i_t, i_bh, T, H, K, BT, BK)
    NT = tl.cdiv(T, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_w = tl.load(w_ptr + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_u = tl.load(u_ptr + rows[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_s = tl.load(h_ptr + ((i_b * NT + i_t) * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0)
    b_v = b_u.to(tl.float32) - _dot(b_w, b_s.to(b_w.dtype), "tf32", UPCAST)
    tl.store(v_new_ptr + rows[:, None] * V + o_v[None, :], b_v.to(v_new_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


#: where the sequential kernel's side work goes (`affine_state_pass`'s `variant`): "loop" computes the new values
#: and Kt^T U inside it, "v-after" the new values in a parallel kernel afterwards, "pre-n" also Kt^T U beforehand
#: (with M), leaving the loop one product, a load of M and N, and the state's store
VARIANTS = AFFINE_VARIANTS


def default_stages(block_k: int, precise: bool) -> int:
    """The sequential kernel's software-pipelining depth: 2, or 1 for float32 M at K > 64, whose [128, 128] tile
    twice would pass Hopper's 227 KiB of shared memory (compiled for sm_90: 265 KiB with 3 stages)."""
    return 1 if precise and block_k > 64 else 2


def affine_state_pass(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, g: torch.Tensor,
                      initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                      chunk_size: int = 64, precise: bool = False, block_v: int | None = None,
                      num_warps: int = 4, num_stages: int | None = None, variant: str = "loop"):
    """fla's `chunk_gated_delta_rule_fwd_h` (equal-length sequences) by the affine form (module docstring).

    Args:
        k, w: `[B, T, H, K]` (K <= 128); u: `[B, T, H, V]`; g: `[B, T, H]` float32, log2 decays cumulated per chunk;
            initial_state: `[B, H, K, V]` or None.
        precise: M and the state in float32 for their product (module docstring).
        block_v, num_warps, num_stages: the sequential kernel's launch (block_v default: min(64, V) rounded up to a
            power of two >= 16; num_stages default: `default_stages`).
        variant: where the side work goes (`VARIANTS`): the same numbers up to float32 order, other launches.

    Returns:
        `(h [B, NT, H, K, V]` in k's dtype, `v_new [B, T, H, V]` in u's dtype, `final [B, H, K, V]` float32 or None).
    """
    B, T, H, K = k.shape
    V = u.shape[-1]
    if K > 128:
        raise ValueError(f"affine_state_pass: head key dim {K} > 128 (M would be {K} x {K} per chunk)")
    if w.shape != k.shape or u.shape[:3] != k.shape[:3] or g.shape != k.shape[:3]:
        raise ValueError(f"affine_state_pass: shapes k {tuple(k.shape)}, w {tuple(w.shape)}, u {tuple(u.shape)}, "
                         f"g {tuple(g.shape)} do not match")
    if variant not in VARIANTS:
        raise ValueError(f"affine_state_pass: variant must be one of {VARIANTS}, got {variant!r}")
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"affine_state_pass: chunk_size must be 16, 32 or 64, got {chunk_size}")
    k, w, u, g = (x.contiguous() for x in (k, w, u, g))
    NT = triton.cdiv(T, chunk_size)
    BK = max(16, triton.next_power_of_2(K))
    BV = block_v or max(16, min(64, triton.next_power_of_2(V)))
    m = torch.empty(B, NT, H, K, K, device=k.device, dtype=torch.float32 if precise else k.dtype)
    h = torch.empty(B, NT, H, K, V, device=k.device, dtype=k.dtype)
    v_new = torch.empty_like(u)
    final = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32) if output_final_state else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    # Triton's CPU interpreter multiplies bf16 tiles as raw bits: there the operands go up to float32 (`_dot`)
    upcast = k.device.type == "cpu" and k.dtype != torch.float32
    pre_n, save_v = variant == "pre-n", variant == "loop"
    n = torch.empty(B, NT, H, K, V, device=k.device, dtype=torch.float32) if pre_n else None
    _affine_m_kernel[(NT, B * H)](k, w, g, m, u, n, T, H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV,
                                  PRECISE=precise, PRE_N=pre_n, UPCAST=upcast)
    _affine_pass_kernel[(triton.cdiv(V, BV), B * H)](
        k, w, u, g, m, n, h, v_new, h0, final, T, H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV,
        USE_H0=h0 is not None, STORE_HT=final is not None, PRECISE=precise, SAVE_V=save_v, PRE_N=pre_n,
        UPCAST=upcast, num_warps=num_warps, num_stages=num_stages or default_stages(BK, precise))
    if not save_v:
        _affine_v_new_kernel[(NT, B * H, triton.cdiv(V, BV))](w, u, h, v_new, T, H=H, K=K, V=V, BT=chunk_size,
                                                             BK=BK, BV=BV, UPCAST=upcast)
    return h, v_new, final
