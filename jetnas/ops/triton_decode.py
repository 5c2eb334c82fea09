"""Triton kernels of the decode step (contracts in `jetnas.ops.decode`, references there too).

`triton_decode_attention` is flash-decoding: program (row b, kv head, split s) takes the s-th of `num_splits`
equal slices of row b's columns `[lo, hi)`, loads each key/value tile once for all the query heads that share
that kv head (grouped-query attention costs no extra reads), and keeps an online softmax; it writes its
unnormalised output with the running max and sum, and a few torch ops merge the splits. Slices past a row's end
are empty and merge with weight zero. Columns map to slots `c % R`, so the same kernel reads a sliding window's
ring buffer (with `RING=False` for a full cache, whose columns are its slots, the modulo is skipped).

`triton_gated_delta_rule_step_` runs one token of the gated delta rule with the L2 norms, decay, beta and the
output fused, one program per (row, head, value block): it reads its `[K, BV]` state tile once and writes it back
in place. `triton_gla_step_` does the same for gated linear attention (GLA, RetNet and Mamba2's recurrence), with a
per-key-channel or per-head decay. `triton_conv_step_` is a short convolution's step (static or per-token kernels,
bias, SiLU), one program per (row, channel block), shifting the cached inputs in place: one launch where the
PyTorch step takes about ten (concatenate, casts, multiply, sum, bias, activation, copy back).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, lo_ptr, hi_ptr, o_ptr, m_ptr, l_ptr, scale, R, S,
                             sqb, sqh, skb, skh, skr, svb, svh, svr,
                             HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                             DV: tl.constexpr, BLOCK_N: tl.constexpr, RING: tl.constexpr, TILES: tl.constexpr,
                             PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    hkv = pid % HKV
    lo = tl.load(lo_ptr + b).to(tl.int32)
    hi = tl.load(hi_ptr + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(hi - lo, S), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    n = tl.arange(0, BLOCK_N)
    heads = hkv * G + g
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + d[None, :], mask=(g < G)[:, None], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + hkv * skh
    v_base = v_ptr + b.to(tl.int64) * svb + hkv * svh

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV], tl.float32)
    # a fixed trip count (the most tiles a slice can have), not range(start, end): Triton's CPU interpreter
    # cannot loop to a loaded or passed-in bound (numpy 2), only to a constant; tiles past `end` load nothing
    for t in range(TILES):
        cols = start + t * BLOCK_N + n
        valid = cols < end
        slots = cols % R if RING else cols
        k = tl.load(k_base + slots[:, None].to(tl.int64) * skr + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile before any column
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_base + slots[:, None].to(tl.int64) * svr + dv[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # partial results [B, H, S, ...]
    row = (b * HKV * G + heads) * S + split
    hmask = g < G
    tl.store(o_ptr + row[:, None] * DV + dv[None, :], acc, mask=hmask[:, None])
    tl.store(m_ptr + row, m_i, mask=hmask)
    tl.store(l_ptr + row, l_i, mask=hmask)


def default_splits(batch_size: int, num_kv_heads: int, max_columns: int, block_n: int = 64) -> int:
    """Enough programs to fill the GPU about four times over (132 SMs on an H100), without slices shorter than
    four tiles."""
    programs = batch_size * num_kv_heads
    want = triton.cdiv(4 * 132, programs)
    return max(1, min(want, triton.cdiv(max_columns, 4 * block_n), 256))


def triton_decode_attention(q, k_cache, v_cache, lo, hi, scale=None, num_splits=None, ring=True, block_n: int = 64):
    B, H, D = q.shape
    Hkv, R = k_cache.shape[1], k_cache.shape[2]
    DV = v_cache.shape[-1]
    G = H // Hkv
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the key/value caches must be contiguous in the head dimension")
    if D & (D - 1) or DV & (DV - 1) or D < 16 or DV < 16:
        raise ValueError(f"head dims must be powers of two >= 16 for the Triton kernel, got {D} and {DV}")
    S = num_splits or default_splits(B, Hkv, R, block_n)
    q = q.contiguous()
    o = torch.empty(B, H, S, DV, dtype=torch.float32, device=q.device)
    m = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    l_ = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    tiles = triton.cdiv(triton.cdiv(R, S), block_n)  # a slice spans at most this many tiles (n <= R)
    _decode_attention_kernel[(B * Hkv, S)](
        q, k_cache, v_cache, lo, hi, o, m, l_, D**-0.5 if scale is None else scale, R, S,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HKV=Hkv, G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, DV=DV, BLOCK_N=block_n, RING=ring, TILES=tiles,
        # float32 inputs: exact products (tl.dot would round them to TF32, ~1e-3 relative: fp32 parity checks
        # against the model's forward could not tell a bug from that)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=3)
    # merge the splits: weights exp(m_s - max m) (zero for empty splits, whose m is -inf)
    m_max = m.amax(-1, keepdim=True)
    w = torch.exp(m - m_max)
    out = (o * w[..., None]).sum(2) / (l_ * w).sum(-1, keepdim=True)
    return out.to(q.dtype)


@triton.jit
def _recurrent_step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s_ptr, o_ptr, alog_ptr, dtb_ptr, scale, H,
                           K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           DELTA: tl.constexpr, USE_G: tl.constexpr, G_PER_KEY: tl.constexpr, USE_BETA: tl.constexpr,
                           L2NORM: tl.constexpr, RAW_GATES: tl.constexpr):
    # one token of a matrix memory `h [K, BV]` in place: decay, then write `k v^T` (GLA) or the delta rule's
    # correction `k (beta (v - h^T k))^T`, then read `o = h^T q`. RAW_GATES: g_ptr and beta_ptr hold the gates'
    # projections a and b, and g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b) are made here
    bh = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1)
    kk = tl.arange(0, BK)
    vv = vb * BV + tl.arange(0, BV)
    kmask = kk < K
    vmask = vv < V
    q = tl.load(q_ptr + bh * K + kk, mask=kmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + bh * K + kk, mask=kmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + bh * V + vv, mask=vmask, other=0.0).to(tl.float32)
    if L2NORM:
        q = q / tl.sqrt(tl.sum(q * q) + 1e-6)
        k = k / tl.sqrt(tl.sum(k * k) + 1e-6)
    smask = kmask[:, None] & vmask[None, :]
    p_s = s_ptr + bh * K * V + kk[:, None] * V + vv[None, :]
    h = tl.load(p_s, mask=smask, other=0.0)
    if USE_G:
        if RAW_GATES:
            head = bh % H
            a = tl.load(g_ptr + bh).to(tl.float32) + tl.load(dtb_ptr + head).to(tl.float32)
            softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(tl.minimum(a, 20.0))))  # torch's threshold
            h = h * tl.exp(-tl.exp(tl.load(alog_ptr + head).to(tl.float32)) * softplus)
        elif G_PER_KEY:
            h = h * tl.exp(tl.load(g_ptr + bh * K + kk, mask=kmask, other=0.0).to(tl.float32))[:, None]
        else:
            h = h * tl.exp(tl.load(g_ptr + bh).to(tl.float32))
    if DELTA:
        v = v - tl.sum(h * k[:, None], 0)
    if USE_BETA:
        if RAW_GATES:
            v = v * tl.sigmoid(tl.load(beta_ptr + bh).to(tl.float32))
        else:
            v = v * tl.load(beta_ptr + bh).to(tl.float32)
    h = h + k[:, None] * v[None, :]
    o = tl.sum(h * (q * scale)[:, None], 0)
    tl.store(p_s, h, mask=smask)
    tl.store(o_ptr + bh * V + vv, o.to(o_ptr.dtype.element_ty), mask=vmask)


def _recurrent_step_(q, k, v, g, beta, state, scale, delta: bool, l2norm: bool, raw_gates: bool = False,
                     A_log=None, dt_bias=None):
    B, H, K = q.shape
    V = v.shape[-1]
    if state.shape != (B, H, K, V):
        raise ValueError(f"state must be {[B, H, K, V]}, got {list(state.shape)}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(v)
    BV = min(64, triton.next_power_of_2(V))
    dummy = state  # never read when its flag is off
    _recurrent_step_kernel[(B * H, triton.cdiv(V, BV))](
        q, k, v, dummy if g is None else g.contiguous(), dummy if beta is None else beta.contiguous(), state, o,
        dummy if A_log is None else A_log.contiguous(), dummy if dt_bias is None else dt_bias.contiguous(),
        K**-0.5 if scale is None else scale, H, K=K, V=V, BK=triton.next_power_of_2(K), BV=BV, DELTA=delta,
        USE_G=g is not None, G_PER_KEY=g is not None and g.dim() == 3, USE_BETA=beta is not None, L2NORM=l2norm,
        RAW_GATES=raw_gates, num_warps=4)
    return o


def triton_gated_delta_rule_step_(q, k, v, g, beta, state, scale=None, use_qk_l2norm=True):
    return _recurrent_step_(q, k, v, g, beta, state, scale, delta=True, l2norm=use_qk_l2norm)


def triton_gated_delta_rule_step_raw_(q, k, v, a, b, A_log, dt_bias, state, scale=None, use_qk_l2norm=True):
    # without A_log (DeltaNet: no decay) only beta is made in the kernel
    return _recurrent_step_(q, k, v, None if A_log is None else a, b, state, scale, True, use_qk_l2norm,
                            raw_gates=True, A_log=A_log, dt_bias=dt_bias)


def triton_gla_step_(q, k, v, g, state, scale=None):
    return _recurrent_step_(q, k, v, g, None, state, scale, delta=False, l2norm=False)


@triton.jit
def _conv_step_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, y_ptr, D, swb, ssb, ssd, ssw,
                      W: tl.constexpr, WP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    # one token of a depthwise causal conv for BLOCK_D channels of row b: y = act(sum_w window[w] * kernel[w] + bias)
    # over the window (the W - 1 cached inputs, then x); the cache then drops its oldest input and keeps x
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c = tl.arange(0, WP)
    dmask = d < D
    cached = dmask[:, None] & (c < W - 1)[None, :]
    x = tl.load(x_ptr + b * D + d, mask=dmask, other=0.0)
    p_s = s_ptr + b * ssb + d[:, None] * ssd + c[None, :] * ssw
    s = tl.load(p_s, mask=cached, other=0.0)
    newer = tl.load(p_s + ssw, mask=dmask[:, None] & (c < W - 2)[None, :], other=0.0)  # slot c + 1 of the cache
    p_w = w_ptr + b * swb + d[:, None] * W + c[None, :]
    acc = tl.sum(s.to(tl.float32) * tl.load(p_w, mask=cached, other=0.0).to(tl.float32), 1)
    acc += x.to(tl.float32) * tl.load(w_ptr + b * swb + d * W + (W - 1), mask=dmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * D + d, acc.to(y_ptr.dtype.element_ty), mask=dmask)
    tl.debug_barrier()  # every lane has read the old window before any lane overwrites it
    new = tl.where((c == W - 2)[None, :], x[:, None].to(s.dtype), newer)
    tl.store(p_s, new, mask=cached)


def triton_conv_step_(x, kernels, bias, state, activation="silu"):
    B, D = x.shape
    W = kernels.shape[-1]
    x, kernels = x.contiguous(), kernels.contiguous()
    y = torch.empty_like(x)
    BLOCK_D = min(256, triton.next_power_of_2(D))
    _conv_step_kernel[(B, triton.cdiv(D, BLOCK_D))](
        x, kernels, state if bias is None else bias.contiguous(), state, y, D,
        0 if kernels.dim() == 2 else kernels.stride(0), *state.stride(), W=W, WP=triton.next_power_of_2(W - 1),
        HAS_BIAS=bias is not None, SILU=activation == "silu", BLOCK_D=BLOCK_D, num_warps=4)
    return y
