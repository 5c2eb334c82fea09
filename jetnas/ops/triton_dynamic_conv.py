"""Triton kernels (forward and backward) for the dynamic causal convolution of `jetnas.ops.conv`.

`triton_dynamic_conv` has exactly the contract of `naive_dynamic_conv`: for `x [B, T, D]` and per-token kernels
`[B, T, D, W]`,

    y[b, t, d] = act( sum_{i < W} kernels[b, t, d, i] * x[b, t - W + 1 + i, d] )

where inputs before a sequence's first token come from its row of `initial_state [N, D, W - 1]` (oldest first) or
are zero, and with `cu_seqlens` no packed sequence sees another's inputs. It returns `(y, final_state)`: y in x's
dtype, accumulated in float32; final_state (the last `W - 1` inputs of each sequence, in x's dtype) or None.
Gradients flow to x, kernels and initial_state. The activation is fused: backward recomputes the pre-activation
instead of storing it.

Design: every kernel tiles (batch, BLOCK_T tokens, BLOCK_D channels) and holds `[BLOCK_T, BLOCK_D, next_pow2(W)]`
tiles, so the W taps of each (token, channel) of kernels/dkernels are read and written contiguously. Forward:
y = act(sum over taps of window * kernel). Backward kernel 1 recomputes the pre-activation and writes
dacc = dy * act'(pre) (float32; dy itself when there is no activation) and dkernels = dacc * window; kernel 2
gathers dx[s] = sum_i dacc[s + W - 1 - i] * kernels[s + W - 1 - i, i] within s's sequence. A third small kernel
writes the state gradient (only the first W - 1 tokens of each sequence read the state); the final state is
plain torch indexing. Packed sequences pass
per-token sequence start / end / index tensors made from `cu_seqlens`.

`triton_short_conv` runs the static convolution (one `[D, W]` kernel for every token, optional bias) on the same
kernels (`STATIC`): there the first backward kernel sums the weight's (and bias's) gradient over a slab of tokens
per program (see `_slab_tiles`) and writes one float32 partial per slab, summed over slabs in PyTorch; its dacc
buffer is in dy's dtype.

This module imports Triton, so `jetnas.ops.conv` imports it lazily, only when a backend sends a tensor here; it
imports nothing of `jetnas.ops.conv` (the shared checks live in `jetnas.ops.utils`). Under `TRITON_INTERPRET=1` the
kernels also run on CPU tensors (slowly), which is how the tests check them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from jetnas.ops.utils import check_conv_inputs, check_short_conv_inputs

MAX_WIDTH = 8


class _Segments(NamedTuple):
    """Packed sequences (all None for dense inputs, where the kernels use start 0, end T and the batch index).

    cu: `[N + 1]` int64 boundaries; tok_start, tok_end, tok_seq: `[T]` int32, each token's sequence start, end
    and index.
    """

    cu: torch.Tensor | None = None
    tok_start: torch.Tensor | None = None
    tok_end: torch.Tensor | None = None
    tok_seq: torch.Tensor | None = None


def _segments(T: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> _Segments:
    if cu_seqlens is None:
        return _Segments()
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    # Token t belongs to the sequence whose [start, end) holds it; empty sequences hold no token.
    seq = torch.searchsorted(cu[1:], torch.arange(T, device=device), right=True)
    return _Segments(cu, cu[seq].to(torch.int32), cu[seq + 1].to(torch.int32), seq.to(torch.int32))


def _final_state(x: torch.Tensor, state: torch.Tensor | None, seg: _Segments, W: int) -> torch.Tensor:
    """The last `W - 1` inputs of each sequence `[N, D, W - 1]`, reaching into `state` for short sequences.

    Plain indexing, so autograd carries its gradient to x and the state.
    """
    B, T, D = x.shape
    if seg.cu is None:
        # dense rows: the last W - 1 columns of [state or zeros, x], one copy (the gather below costs a dozen small
        # launches per convolution, which a small model's prefill pays three times per layer)
        xt = x.transpose(1, 2)
        if T < W - 1:
            xt = torch.cat([x.new_zeros(B, D, W - 1) if state is None else state, xt], -1)
        return xt[..., xt.shape[-1] - (W - 1):].contiguous()
    first, length = seg.cu[:-1], seg.cu[1:] - seg.cu[:-1]
    N = first.numel()
    c = torch.arange(W - 1, device=x.device)
    pos = length[:, None] - (W - 1) + c  # [N, W - 1], position in the sequence (< 0: from the state)
    flat = x.reshape(B * T, D)
    if B * T:
        from_x = flat[(first[:, None] + pos).clamp(0, B * T - 1)]  # [N, W - 1, D]
    else:
        from_x = x.new_zeros(N, W - 1, D)
    if state is None:
        from_state = torch.zeros_like(from_x)
    else:
        col = (pos + W - 1).clamp(max=W - 2)
        from_state = state.transpose(1, 2).gather(1, col[:, :, None].expand(N, W - 1, D))
    return torch.where((pos >= 0)[:, :, None], from_x, from_state).transpose(1, 2).contiguous()


@triton.jit
def _tile(pid_b, pid_t, pid_d, tok_start_ptr, tok_seq_ptr, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
          W_POW2: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Indices of one tile. `row0`, the flat `[B * T]` row of its first token, is int64 so that flat offsets
    cannot overflow; offsets from it stay int32. Also: token offsets `r` from row0 and tokens `t`, channels `d`,
    taps `w`, each token's sequence start and state row, and the `[BLOCK_T, BLOCK_D]` in-bounds mask."""
    t0 = pid_t * BLOCK_T
    row0 = pid_b.to(tl.int64) * T + t0
    r = tl.arange(0, BLOCK_T)
    t = t0 + r
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    w = tl.arange(0, W_POW2)
    t_ok = t < T
    if IS_VARLEN:
        start = tl.load(tok_start_ptr + t, mask=t_ok, other=0)
        seq = tl.load(tok_seq_ptr + t, mask=t_ok, other=0)
    else:
        start = tl.zeros([BLOCK_T], dtype=tl.int32)
        seq = tl.zeros([BLOCK_T], dtype=tl.int32) + pid_b
    mask = t_ok[:, None] & (d < D)[None, :]
    return row0, r, t, d, w, start, seq, mask


@triton.jit
def _load_windows(x_ptr, state_ptr, row0, r, t, d, w, start, seq, mask, D, W: tl.constexpr,
                  HAS_STATE: tl.constexpr):
    """The float32 `[BLOCK_T, BLOCK_D, W_POW2]` tile `x[t - W + 1 + w, d]`. Inputs before the token's sequence
    start come from its state row (column `W - 1 + src - start`) or are zero; taps `w >= W` are zero."""
    shift = w[None, :] - (W - 1)  # [1, W_POW2]
    src = t[:, None] + shift  # [BLOCK_T, W_POW2]
    inside = src >= start[:, None]
    m = mask[:, :, None] & (w < W)[None, None, :]
    x_off = (r[:, None] + shift)[:, None, :] * D + d[None, :, None]
    xv = tl.load(x_ptr + row0 * D + x_off, mask=m & inside[:, None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        # Row pointers in int64 (N * D * (W - 1) may pass 2**31), offsets within a row in int32.
        rows = state_ptr + seq.to(tl.int64) * (D * (W - 1))  # [BLOCK_T]
        col = src - start[:, None] + (W - 1)
        s_ptr = rows[:, None, None] + d[None, :, None] * (W - 1) + col[:, None, :]
        xv += tl.load(s_ptr, mask=m & (src < start[:, None])[:, None, :], other=0.0).to(tl.float32)
    return xv


@triton.jit
def _load_kernels(k_ptr, row0, r, d, w, mask, D, W: tl.constexpr, STATIC: tl.constexpr):
    """The float32 `[BLOCK_T, BLOCK_D, W_POW2]` tile of kernels: W contiguous taps per (token, channel), so the
    load is coalesced and vectorized; taps `w >= W` are zero. STATIC: one `[D, W]` kernel for every token (the
    static convolution), read from the cache for every token of the tile."""
    m = mask[:, :, None] & (w < W)[None, None, :]
    if STATIC:
        return tl.load(k_ptr + (r[:, None, None] * 0 + d[None, :, None]) * W + w[None, None, :], mask=m,
                       other=0.0).to(tl.float32)
    off = (r[:, None, None] * D + d[None, :, None]) * W + w[None, None, :]
    return tl.load(k_ptr + row0 * D * W + off, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _dynamic_conv_fwd_kernel(x_ptr, k_ptr, bias_ptr, state_ptr, y_ptr, tok_start_ptr, tok_seq_ptr, D1, D2, ROWS,
                             T, D, W: tl.constexpr, W_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_D: tl.constexpr, HAS_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
                             SILU: tl.constexpr, STATIC: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Grid (cdiv(T, BLOCK_T), B, cdiv(D, BLOCK_D)); writes `y [B, T, D]`. STATIC: `k_ptr` is one `[D, W]`
    kernel; HAS_BIAS: `bias [D]` added before the activation. SPLIT: channels `[0, D1)`, `[D1, D2)` and `[D2, D)`
    go to three `[B, T, width]` tensors laid out one after the other in y (`ROWS = B * T` rows each), so that each
    part is contiguous (see `triton_short_conv_split`)."""
    row0, r, t, d, w, start, seq, mask = _tile(tl.program_id(1), tl.program_id(0), tl.program_id(2),
                                               tok_start_ptr, tok_seq_ptr, T, D, BLOCK_T, BLOCK_D, W_POW2,
                                               IS_VARLEN)
    xw = _load_windows(x_ptr, state_ptr, row0, r, t, d, w, start, seq, mask, D, W, HAS_STATE)
    acc = tl.sum(xw * _load_kernels(k_ptr, row0, r, d, w, mask, D, W, STATIC), axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    if SPLIT:
        # channel d of part s (first channel c_s, width w_s) is element (row, d - c_s) of that part, which starts
        # at element c_s * ROWS of y (the parts before it hold ROWS * c_s elements)
        third = d >= D2
        second = d >= D1
        first_channel = tl.where(third, D2, tl.where(second, D1, 0))
        width = tl.where(third, D - D2, tl.where(second, D2 - D1, D1))
        off = (first_channel.to(tl.int64)[None, :] * ROWS + (row0 + r[:, None]) * width[None, :]
               + (d - first_channel)[None, :])
        tl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        off = r[:, None] * D + d[None, :]
        tl.store(y_ptr + row0 * D + off, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(x_ptr, k_ptr, bias_ptr, state_ptr, dy_ptr, dacc_ptr, tok_start_ptr, tok_seq_ptr, pid_b, pid_t, pid_d,
              T, D, W: tl.constexpr, W_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, SILU: tl.constexpr, STATIC: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """One tile of the backward's first step: the float32 windows `xw [BLOCK_T, BLOCK_D, W_POW2]` and
    `dacc = dy * act'(pre)` `[BLOCK_T, BLOCK_D]` (zero outside the tile's mask), with SILU also stored to dacc_ptr
    (in that buffer's dtype). Also returns the tile's row0, offsets and mask."""
    row0, r, t, d, w, start, seq, mask = _tile(pid_b, pid_t, pid_d, tok_start_ptr, tok_seq_ptr, T, D, BLOCK_T,
                                               BLOCK_D, W_POW2, IS_VARLEN)
    off = r[:, None] * D + d[None, :]
    xw = _load_windows(x_ptr, state_ptr, row0, r, t, d, w, start, seq, mask, D, W, HAS_STATE)
    dacc = tl.load(dy_ptr + row0 * D + off, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        pre = tl.sum(xw * _load_kernels(k_ptr, row0, r, d, w, mask, D, W, STATIC), axis=2)
        if HAS_BIAS:
            pre += tl.load(bias_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        sig = tl.sigmoid(pre)
        dacc = dacc * sig * (1.0 + pre * (1.0 - sig))
        tl.store(dacc_ptr + row0 * D + off, dacc.to(dacc_ptr.dtype.element_ty), mask=mask)
    return xw, dacc, row0, off, d, w, mask


@triton.jit
def _dynamic_conv_bwd_dk_kernel(x_ptr, k_ptr, bias_ptr, state_ptr, dy_ptr, dacc_ptr, dk_ptr, db_ptr, tok_start_ptr,
                                tok_seq_ptr, T, D, slab_tiles, W: tl.constexpr, W_POW2: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_STATE: tl.constexpr,
                                IS_VARLEN: tl.constexpr, SILU: tl.constexpr, STATIC: tl.constexpr,
                                HAS_BIAS: tl.constexpr):
    """Writes `dkernels[b, t, d, i] = dacc[b, t, d] * x[b, t - W + 1 + i, d]` (`[B, T, D, W]`) with
    `dacc = dy * act'(pre)`, and with SILU also dacc itself (`[B, T, D]`, float32 or, static, dy's dtype; without
    SILU dacc is dy). Grid as forward, one tile per program.

    STATIC: grid (cdiv(cdiv(T, BLOCK_T), slab_tiles), B, cdiv(D, BLOCK_D)). Each program walks a slab of
    `slab_tiles` consecutive BLOCK_T-token tiles (the last slab stops at T), keeping the weight gradient's
    `[BLOCK_D, W_POW2]` sum (and with HAS_BIAS the bias gradient's `[BLOCK_D]`, the sum of dacc) in registers,
    and writes them once: float32 partials `dk [B, n_slabs, D, W]` and `db [B, n_slabs, D]`, whose sums over the
    first two dims are the weight's and the bias's gradients."""
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_d = tl.program_id(2)
    if STATIC:
        acc = tl.zeros([BLOCK_D, W_POW2], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
        first = pid_s * slab_tiles
        for i in range(tl.minimum(slab_tiles, tl.cdiv(T, BLOCK_T) - first)):
            xw, dacc, row0, off, d, w, mask = _bwd_tile(x_ptr, k_ptr, bias_ptr, state_ptr, dy_ptr, dacc_ptr,
                                                        tok_start_ptr, tok_seq_ptr, pid_b, first + i, pid_d, T, D,
                                                        W, W_POW2, BLOCK_T, BLOCK_D, HAS_STATE, IS_VARLEN, SILU,
                                                        STATIC, HAS_BIAS)
            acc += tl.sum(dacc[:, :, None] * xw, axis=0)  # tokens past T have dacc = 0
            if HAS_BIAS:
                acc_b += tl.sum(dacc, axis=0)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        w = tl.arange(0, W_POW2)
        slab = pid_b.to(tl.int64) * tl.num_programs(0) + pid_s
        tl.store(dk_ptr + (slab * D + d[:, None]) * W + w[None, :], acc, mask=(d < D)[:, None] & (w < W)[None, :])
        if HAS_BIAS:
            tl.store(db_ptr + slab * D + d, acc_b, mask=d < D)
    else:  # (no early return: Triton's code generator does not promise one inside a compile-time branch)
        xw, dacc, row0, off, d, w, mask = _bwd_tile(x_ptr, k_ptr, bias_ptr, state_ptr, dy_ptr, dacc_ptr,
                                                    tok_start_ptr, tok_seq_ptr, pid_b, pid_s, pid_d, T, D, W,
                                                    W_POW2, BLOCK_T, BLOCK_D, HAS_STATE, IS_VARLEN, SILU, STATIC,
                                                    HAS_BIAS)
        dk_off = off[:, :, None] * W + w[None, None, :]
        dk_mask = mask[:, :, None] & (w < W)[None, None, :]
        tl.store(dk_ptr + row0 * D * W + dk_off, (dacc[:, :, None] * xw).to(dk_ptr.dtype.element_ty),
                 mask=dk_mask)


@triton.jit
def _dynamic_conv_bwd_dx_kernel(k_ptr, dacc_ptr, dx_ptr, tok_end_ptr, T, D, W: tl.constexpr, W_POW2: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
                                STATIC: tl.constexpr):
    """Grid as forward. `dx[b, s, d] = sum_i dacc[b, s + W - 1 - i, d] * kernels[b, s + W - 1 - i, d, i]` over
    the tokens `s + W - 1 - i` of s's own sequence."""
    t0 = tl.program_id(0) * BLOCK_T
    row0 = tl.program_id(1).to(tl.int64) * T + t0
    r = tl.arange(0, BLOCK_T)
    s = t0 + r
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    w = tl.arange(0, W_POW2)
    s_ok = s < T
    if IS_VARLEN:
        end = tl.load(tok_end_ptr + s, mask=s_ok, other=0)
    else:
        end = tl.zeros([BLOCK_T], dtype=tl.int32) + T
    mask = s_ok[:, None] & (d < D)[None, :]
    shift = (W - 1) - w[None, :]  # [1, W_POW2]: tap w of token s + shift reads x[s]
    ok = (s[:, None] + shift < end[:, None]) & (w < W)[None, :]
    m = mask[:, :, None] & ok[:, None, :]
    off = (r[:, None] + shift)[:, None, :] * D + d[None, :, None]
    dacc = tl.load(dacc_ptr + row0 * D + off, mask=m, other=0.0).to(tl.float32)
    if STATIC:
        k_off = (r[:, None, None] * 0 + d[None, :, None]) * W + w[None, None, :]
        k = tl.load(k_ptr + k_off, mask=m, other=0.0).to(tl.float32)
    else:
        k = tl.load(k_ptr + row0 * D * W + off * W + w[None, None, :], mask=m, other=0.0).to(tl.float32)
    dx = tl.sum(dacc * k, axis=2)
    tl.store(dx_ptr + row0 * D + r[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dynamic_conv_bwd_dstate_kernel(k_ptr, dacc_ptr, dstate_ptr, cu_ptr, T, D, W: tl.constexpr,
                                    W_POW2: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
                                    STATIC: tl.constexpr):
    """Grid (N, cdiv(D, BLOCK_D)). `dstate[n, d, c] = sum_r dacc[first + r, d] * kernels[first + r, d, c - r]`
    over the sequence's tokens r <= c: only its first W - 1 tokens read the state."""
    n = tl.program_id(0).to(tl.int64)
    if IS_VARLEN:
        first = tl.load(cu_ptr + n)
        length = tl.load(cu_ptr + n + 1) - first
    else:
        first = n * T
        length = T
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c = tl.arange(0, W_POW2)
    d_ok = d < D
    acc = tl.zeros([BLOCK_D, W_POW2], dtype=tl.float32)
    for r in tl.static_range(W - 1):
        row = first + r
        # a boolean tensor, not a Python bool (Triton >= 3.9 rejects non-boolean masks)
        ok = d_ok & ((d * 0 + r) < length)
        g = tl.load(dacc_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32)
        tap = c - r
        m = ok[:, None] & ((tap >= 0) & (c < W - 1))[None, :]
        k_row = d if STATIC else row * D + d
        kv = tl.load(k_ptr + k_row[:, None] * W + tap[None, :], mask=m, other=0.0).to(tl.float32)
        acc += g[:, None] * kv
    out = dstate_ptr + (n * D + d)[:, None] * (W - 1) + c[None, :]
    tl.store(out, acc.to(dstate_ptr.dtype.element_ty), mask=d_ok[:, None] & (c < W - 1)[None, :])


def _launch_config(T: int, D: int, W: int, on_gpu: bool) -> tuple[tuple[int, int], dict]:
    # Each program holds BLOCK_T x BLOCK_D x next_pow2(W) taps. Measured on an H200 (B=4, T=4096, D=2048, W=2..8,
    # bf16 and fp32): short 4-token tiles 128 channels wide ran every kernel at 2.6-4 TB/s, within ~15% of the
    # best of the configurations tried; 16+ token tiles were up to 2x slower. T and W do not pick the tile, so
    # varying sequence lengths do not recompile.
    block_t = 4
    if not on_gpu:
        # CPU tensors reach these kernels only under Triton's interpreter, which runs programs one at a time in
        # Python: fewer, taller tiles (same code) are much faster.
        block_t = 32
    return (block_t, min(128, max(16, triton.next_power_of_2(D)))), {"num_warps": 4}


# The static weight gradient's slabs (see `_slab_tiles`): at least this many programs per launch, and at most this
# many BLOCK_T-token tiles per slab.
MIN_SLAB_PROGRAMS = 4096
MAX_SLAB_TILES = 256


def _slab_tiles(B: int, T: int, D: int, block_t: int, block_d: int, on_gpu: bool) -> int:
    """How many BLOCK_T-token tiles one program of the static backward sums over (its slab).

    The longer the slab, the fewer float32 `[BLOCK_D, W]` partials are written and summed afterwards (one per
    slab, not one per 4-token tile: at B=32, T=1024 that was `[32, 256, D, W]`, W times the size of x in float32),
    but the fewer programs are left to keep the GPU busy. The kernel only streams memory (x and dy in, dacc out)
    and one program keeps about one tile's loads (~2 KB) outstanding at a time, so it needs every program slot
    filled: compiled for sm_90 (ptxas, via tests/ops/sm90_compile.py's signature) it takes 72 registers a thread,
    so an SM holds 7 of its 4-warp programs, 924 on the 132 SMs of an H200 (or H100). So the slab doubles, from
    one tile, while the grid keeps at least MIN_SLAB_PROGRAMS = 4096 programs (4.4 waves of resident programs or
    more, so that a part-empty last wave costs little), up to MAX_SLAB_TILES (1,024 tokens). The
    partials are then at most 8,192 programs x BLOCK_D x W floats (4 MB x W), whatever the shape. With
    128-channel blocks (grid arithmetic, not measured on a GPU):

    | B x T | D | slab (tokens) | programs | partials vs 4-token tiles |
    |---|---|---|---|---|
    | 32 x 1,024 | 576 (5 channel blocks) | 32 | 5,120 | 8x fewer (9.4 MB at W = 4) |
    | 32 x 1,024 | 1,728 (14 blocks) | 64 | 7,168 | 16x fewer (14 MB) |
    | 1 x 65,536 | 576 | 64 | 5,120 | 16x fewer (9.4 MB) |
    | 1 x 65,536 | 1,728 | 128 | 7,168 | 32x fewer (14 MB) |
    | 1 x 262,144 | 2,048 (16 blocks) | 1,024 | 4,096 | 256x fewer (8.4 MB) |

    A fixed rule (not the device's SM count) also keeps the summation order, and so the result, the same on every
    GPU. The slab length is a runtime argument: new lengths cost no compilation beyond Triton's specialisations
    (an int equal to 1, or a multiple of 16). Under the interpreter (CPU tensors) programs run one at a time, so
    any slab works: two tiles, which makes the tests walk the slab loop."""
    if not on_gpu:
        return 2
    tiles, n_tiles = 1, triton.cdiv(T, block_t)
    others = B * triton.cdiv(D, block_d)
    while tiles < MAX_SLAB_TILES and others * triton.cdiv(n_tiles, 2 * tiles) >= MIN_SLAB_PROGRAMS:
        tiles *= 2
    return tiles


def _launch(kernel, x: torch.Tensor, W: int, seg: _Segments, *args, slab_tiles: int | None = None,
            **constexprs) -> None:
    """Launch `kernel(*args, T, D, ...)` over (T blocks, B, D blocks) for `x [B, T, D]` and width W; with
    `slab_tiles` (the backward's first kernel), over slabs of that many T blocks, passed after D."""
    B, T, D = x.shape
    if x.numel() == 0:  # nothing to compute, and an empty grid cannot be launched
        return
    (block_t, block_d), opts = _launch_config(T, D, W, x.is_cuda)
    # token blocks on the grid's first axis, the only one allowed more than 65,535 programs: with 4-token tiles a
    # second axis of cdiv(T, 4) failed at T = 262,144 ("invalid argument", 2026-12-06, H200: the 2B's 256K prefill)
    if B > 65535:
        raise ValueError(f"the short convolutions take at most 65,535 sequences per call, got B={B}")
    n_t = triton.cdiv(T, block_t)
    runtime = (T, D)
    if slab_tiles is not None:
        n_t, runtime = triton.cdiv(n_t, slab_tiles), (T, D, slab_tiles)
    grid = (n_t, B, triton.cdiv(D, block_d))
    kernel[grid](*args, *runtime, W=W, W_POW2=triton.next_power_of_2(W), BLOCK_T=block_t, BLOCK_D=block_d,
                 IS_VARLEN=seg.tok_start is not None, **constexprs, **opts)


def _varlen_ptrs(x: torch.Tensor, seg: _Segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tok_start, tok_seq, tok_end), with a placeholder that the kernels never read for dense inputs."""
    if seg.tok_start is None:
        dummy = x.new_empty(0, dtype=torch.int32)
        return dummy, dummy, dummy
    return seg.tok_start, seg.tok_seq, seg.tok_end


class _ConvFunction(torch.autograd.Function):
    """The dynamic convolution (`kernels [B, T, D, W]`), or with `static` the static one (`kernels [D, W]`, optional
    `bias [D]`), forward and backward on the same kernels."""

    @staticmethod
    def forward(ctx, x, kernels, bias, state, activation, seg, static, split=None):
        W = kernels.shape[-1]
        B, T, D = x.shape
        has_state = state is not None and W > 1  # with W == 1 the state is [N, D, 0] and never read
        tok_start, tok_seq, _ = _varlen_ptrs(x, seg)
        # split: the parts' channel widths (2 or 3), each part written contiguous into one buffer
        y = torch.empty_like(x) if split is None else x.new_empty(B * T * D)
        ends = [D, D] if split is None else [split[0], split[0] + split[1]]
        _launch(_dynamic_conv_fwd_kernel, x, W, seg, x, kernels, x if bias is None else bias,
                state if has_state else x, y, tok_start, tok_seq, *ends, B * T, HAS_STATE=has_state,
                SILU=activation == "silu", STATIC=static, HAS_BIAS=bias is not None, SPLIT=split is not None)
        ctx.save_for_backward(x, kernels, bias, state if has_state else None)
        ctx.activation, ctx.seg, ctx.static, ctx.split = activation, seg, static, split
        ctx.state_shape = None if state is None else state.shape
        if split is None:
            return y
        parts, first = [], 0
        for width in split:
            parts.append(y[first * B * T : (first + width) * B * T].view(B, T, width))
            first += width
        return tuple(parts)

    @staticmethod
    def backward(ctx, *dys):
        x, kernels, bias, state = ctx.saved_tensors
        seg, static = ctx.seg, ctx.static
        B, T, D = x.shape
        W = kernels.shape[-1]
        tok_start, tok_seq, tok_end = _varlen_ptrs(x, seg)
        if ctx.split is None:
            dy = dys[0].contiguous()
        else:
            # the parts' gradients side by side, as `y.split(...)`'s backward would assemble them
            dy = torch.cat([x.new_zeros(B, T, width) if g is None else g for g, width in zip(dys, ctx.split)], -1)
        silu = ctx.activation == "silu"
        # Without an activation dacc is dy itself: no buffer to write and read back. The static convolution keeps
        # it in dy's dtype, which is where PyTorch's autograd rounds the activation's gradient too (F.silu's backward
        # returns dy's dtype): in bf16 half the bytes of a float32 buffer, written here and read by the dx kernel.
        # The weight and bias gradients are summed from the unrounded float32 values inside the kernel.
        dacc = dy
        if silu:
            dacc = torch.empty(x.shape, device=x.device, dtype=dy.dtype if static else torch.float32)
        slab_tiles = db = None
        if static:  # per-slab partial sums of the weight's (and bias's) gradient, summed below
            (block_t, block_d), _ = _launch_config(T, D, W, x.is_cuda)
            slab_tiles = _slab_tiles(B, T, D, block_t, block_d, x.is_cuda)
            n_slabs = triton.cdiv(triton.cdiv(T, block_t), slab_tiles)
            # every (batch, slab, channel, tap) is written by exactly one program
            dk = torch.empty(B, n_slabs, D, W, device=x.device, dtype=torch.float32)
            if bias is not None:
                db = torch.empty(B, n_slabs, D, device=x.device, dtype=torch.float32)
        else:
            dk = torch.empty_like(kernels)
        _launch(_dynamic_conv_bwd_dk_kernel, x, W, seg, x, kernels, x if bias is None else bias,
                x if state is None else state, dy, dacc, dk, x if db is None else db, tok_start, tok_seq,
                slab_tiles=1 if slab_tiles is None else slab_tiles, HAS_STATE=state is not None, SILU=silu,
                STATIC=static, HAS_BIAS=bias is not None)
        if static:
            dk = dk.sum((0, 1)).to(kernels.dtype)
        dbias = None
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = db.sum((0, 1)).to(bias.dtype)
        dx = dstate = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            _launch(_dynamic_conv_bwd_dx_kernel, x, W, seg, kernels, dacc, dx, tok_end, STATIC=static)
        if ctx.needs_input_grad[3]:
            if state is None:  # W == 1: the state is empty
                dstate = x.new_zeros(ctx.state_shape)
            else:
                dstate = torch.empty_like(state)
                N = state.shape[0]
                block_d = min(128, max(16, triton.next_power_of_2(D)))
                if dstate.numel():
                    _dynamic_conv_bwd_dstate_kernel[(N, triton.cdiv(D, block_d))](
                        kernels, dacc, dstate, x if seg.cu is None else seg.cu, T, D, W=W,
                        W_POW2=triton.next_power_of_2(W), BLOCK_D=block_d, IS_VARLEN=seg.cu is not None,
                        STATIC=static)
        return dx, dk, dbias, dstate, None, None, None, None


def triton_dynamic_conv(
    x: torch.Tensor,
    kernels: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dynamic causal convolution in Triton; arguments, validation and returns as `naive_dynamic_conv`.

    Args:
        x: `[B, T, D]` input.
        kernels: `[B, T, D, W]` with `1 <= W <= 8`; `kernels[b, t, d, i]` multiplies `x[b, t - W + 1 + i, d]`.
        initial_state: `[N, D, W - 1]` previous inputs (oldest first), or None for zeros.
        output_final_state: also return the last `W - 1` inputs `[N, D, W - 1]` (x's dtype).
        activation: None or "silu", fused into the kernel.
        cu_seqlens: `[N + 1]` packed-sequence boundaries (B == 1).

    Returns:
        `(y [B, T, D] in x's dtype, final_state [N, D, W - 1] or None)`.
    """
    if kernels.dim() != 4:
        raise ValueError(f"kernels must be [B, T, D, W], got shape {list(kernels.shape)}")
    W = kernels.shape[-1]
    B, T, D, _ = check_conv_inputs(x, W, initial_state, cu_seqlens, activation)
    if tuple(kernels.shape[:3]) != (B, T, D):
        raise ValueError(f"kernels must be [B, T, D, W] = [{B}, {T}, {D}, W], got {list(kernels.shape)}")
    if W > MAX_WIDTH:
        raise ValueError(f"triton_dynamic_conv supports kernel widths W <= {MAX_WIDTH}, got W={W}")
    return _apply(x, kernels, None, initial_state, output_final_state, activation, cu_seqlens, static=False)


def _apply(x, kernels, bias, initial_state, output_final_state, activation, cu_seqlens, static, split=None):
    """Both convolutions once their shapes are checked: devices, packed-sequence indices, the autograd Function,
    the final state. With `split` (the static one only), y is a tuple of parts (see `triton_short_conv_split`)."""
    for name, t in (("weight" if static else "kernels", kernels), ("bias", bias), ("initial_state", initial_state)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    seg = _segments(x.shape[1], cu_seqlens, x.device)
    # The reference casts the state to x's dtype before using it; casting outside the Function lets autograd
    # carry the gradient back to the state's own dtype.
    state = None if initial_state is None else initial_state.to(x.dtype).contiguous()
    y = _ConvFunction.apply(x.contiguous(), kernels.contiguous(), None if bias is None else bias.contiguous(), state,
                            activation, seg, static, split)
    final = _final_state(x, state, seg, kernels.shape[-1]) if output_final_state else None
    return y, final


def triton_short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The static causal depthwise convolution (`jetnas.ops.conv.short_conv`'s contract: `weight [D, W]`, optional
    `bias [D]`) on `[B, T, D]` as it lies, on the dynamic convolution's kernels with one kernel for every token:
    one read of x and one write of y forward, accumulated in float32 with the bias and SiLU fused; gradients to x,
    weight, bias and the initial state (the weight's and bias's summed per slab of tokens, then over slabs).

    Why: `F.conv1d` wants `[B, D, T]`, so each conv costs two transposed copies, and PyTorch's generic depthwise
    kernel for bf16: on an H200, 15 of 97 GPU-ms of a SmolLM2-135M GDN hybrid's 32K prefill went to that kernel
    and 20 to strided copies, most likely those transposes (benchmarks/results/2026-12-02_h200_parity_and_dist)."""
    W = check_short_conv_inputs(x, weight, bias, initial_state, cu_seqlens, activation)[2]
    if W > MAX_WIDTH:
        raise ValueError(f"triton_short_conv supports kernel widths W <= {MAX_WIDTH}, got W={W}")
    return _apply(x, weight, bias, initial_state, output_final_state, activation, cu_seqlens, static=True)


def triton_short_conv_split(
    x: torch.Tensor,
    weight: torch.Tensor,
    sizes: tuple[int, ...],
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """`triton_short_conv` whose output comes back split by channels into parts of `sizes` (2 or 3 widths summing
    to D), each written contiguous `[B, T, size]` by the kernel (`jetnas.ops.conv.short_conv_split`'s contract).

    Why: the JetBlock family runs one conv over its q|k|v product; `y.split(...)` of one `[B, T, D]` output gives
    strided parts, which fla's kernels copy to contiguous ones first (its `input_guard`): three copies of the
    prompt's q, k and v per layer, 1.5 GB of the SmolLM2-135M hybrid's 8K prefill (benchmarks/prefill_copies.py).
    Gradients as `triton_short_conv`'s; backward puts the parts' gradients side by side (the copy `split`'s
    backward makes too)."""
    sizes = tuple(int(s) for s in sizes)
    W = check_short_conv_inputs(x, weight, bias, initial_state, cu_seqlens, activation)[2]
    if not 2 <= len(sizes) <= 3 or min(sizes) < 1 or sum(sizes) != x.shape[-1]:
        raise ValueError(f"sizes must be 2 or 3 positive widths summing to D={x.shape[-1]}, got {list(sizes)}")
    if W > MAX_WIDTH:
        raise ValueError(f"triton_short_conv supports kernel widths W <= {MAX_WIDTH}, got W={W}")
    return _apply(x, weight, bias, initial_state, output_final_state, activation, cu_seqlens, static=True,
                  split=sizes)
