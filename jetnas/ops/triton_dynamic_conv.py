"""Triton kernels (forward and backward) for the dynamic causal convolution of `jetnas.ops.conv`.

`triton_dynamic_conv` has exactly the contract of `naive_dynamic_conv`: for `x [B, T, D]` and per-token kernels
`[B, T, D, W]`,

    y[b, t, d] = act( sum_{i < W} kernels[b, t, d, i] * x[b, t - W + 1 + i, d] )

where inputs before a sequence's first token come from its row of `initial_state [N, D, W - 1]` (oldest first) or
are zero, and with `cu_seqlens` no packed sequence sees another's inputs. It returns `(y, final_state)`: y in x's
dtype, accumulated in float32; final_state (the last `W - 1` inputs of each sequence, in x's dtype) or None.
Gradients flow to x, kernels and initial_state. The activation is fused: backward recomputes the pre-activation
instead of storing it.

Design: every kernel tiles (batch, BLOCK_T tokens, BLOCK_D channels). The dynamic convolution's kernels hold
`[BLOCK_T, BLOCK_D, next_pow2(W)]` tiles, so the W taps of each (token, channel) of kernels/dkernels are read and
written contiguously. Forward: y = act(sum over taps of window * kernel). Backward kernel 1 recomputes the
pre-activation and writes dacc = dy * act'(pre) (float32; dy itself when there is no activation) and
dkernels = dacc * window; kernel 2 gathers dx[s] = sum_i dacc[s + W - 1 - i] * kernels[s + W - 1 - i, i] within
s's sequence. A third small kernel writes the state gradient (only the first W - 1 tokens of each sequence read the
state); the final state is plain torch indexing. Packed sequences pass per-token sequence start / end / index
tensors made from `cu_seqlens`.

`triton_short_conv` runs the static convolution (one `[D, W]` kernel for every token, optional bias), and
`triton_short_conv_split` writes its output as 2 or 3 contiguous parts (`SPLIT`). Its forward goes tap by tap
(`_short_conv_fwd_kernel`): W two-dimensional `[BLOCK_T, BLOCK_D]` tiles of x, each contiguous along the channels,
times the weight's columns, so that x's loads and the parts' stores compile to 16-byte vectors (checked for sm_90 by
tests/ops/sm90_compile.py); its speed on a GPU is not yet measured. The old forward, the dynamic convolution's
kernel with `STATIC` (windows `[BLOCK_T, BLOCK_D, W]` with the taps D apart in memory: 8-byte x loads, two-byte split
stores), stays selectable (`STATIC_FWD_PER_TAP = False`) so that `benchmarks/short_conv_bench.py --fwd-sweep` times
both; on an H100 it took 41 us per layer of the SmolLM2 hybrid's 8K prefill ([1, 8192, 1728], bf16; profile of the
captured prefill), and the old single-call sweep timed a copy of as many bytes at 26 us (launch included).
Its backward is one kernel (`_short_conv_bwd_kernel`) that reads x once and dy once, where autograd leaves it: the
parts' gradients in place (no `torch.cat` of them; a part without one reads as zeros, nothing allocated), and
writes dx. Per tile of 32 tokens it recomputes the pre-activation and dacc in registers for the tile's tokens and
the next W - 1 (their inputs come from cache: the same program read them for the tile before), forms dx for the
tile's first 32 - (W - 1) tokens by shifting dacc within the tile (`tl.gather`), and adds the weight's (and
bias's) gradient into float32 sums that each program keeps over a slab of tiles and writes once (`_slab_tiles`),
summed over slabs in PyTorch. dacc never goes through memory. The state's gradient is a small kernel that
recomputes dacc for each sequence's first W - 1 tokens. It needs Triton >= 3.3 (`tl.gather`, tuples of tensors);
an older one takes PyTorch's autograd of the reference (`FUSED_STATIC_BACKWARD`).

Bytes of the static backward of one GDN layer in the stage-1 step of the SmolLM2-135M hybrid (B = 32, T = 1,024,
q|k|v: D = 1,728, W = 4, SiLU, no bias or state, bf16; one `[B, T, D]` tensor is 113 MB), counted from the code,
not measured:

| | before (cat + two kernels) | now (one kernel) |
|---|---|---|
| the parts' gradients put side by side (`torch.cat`) | 113 read + 113 written | - |
| x, dy read | 113 + 113 | 113 + 113 |
| dacc (bf16) written, read back | 113 + 113 | - (registers) |
| dx written | 113 | 113 |
| weight-gradient partials written, read | 14 + 14 | 3 + 3 |
| total | 821 MB | 345 MB (2.4x fewer) |

Over the 26 GDN layers of a step that is 21.3 GB before, 9.0 GB now; the floor (x and dy read, dx written) is
8.8 GB, about 3 ms at 3 TB/s. The W - 1 tokens each tile shares with the next are read again from cache (x: 35
rows read per 29 owned, dy: 32): 380 MB a layer if none of them hit. An H100 profile of the step before measured
13.7 GPU-ms for the backward and its cat (1.6 TB/s); the new kernel is not timed (no GPU here).

This module imports Triton, so `jetnas.ops.conv` imports it lazily, only when a backend sends a tensor here; it
imports nothing of `jetnas.ops.conv` (the shared checks live in `jetnas.ops.utils`). Under `TRITON_INTERPRET=1` the
kernels also run on CPU tensors (slowly), which is how the tests check them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from jetnas.ops.backend import needs_grad
from jetnas.ops.utils import check_conv_inputs, check_l2norm_head, check_short_conv_inputs

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
def _tile(pid_b, t0, pid_d, tok_start_ptr, tok_seq_ptr, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
          W_POW2: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Indices of the tile of BLOCK_T tokens from token `t0` of batch row `pid_b`. `row0`, the flat `[B * T]` row
    of its first token, is int64 so that flat offsets cannot overflow; offsets from it stay int32. Also: token
    offsets `r` from row0 and tokens `t`, channels `d`, taps `w`, each token's sequence start and state row, and
    the `[BLOCK_T, BLOCK_D]` in-bounds mask."""
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
    kernel (the old static forward, launched only with `STATIC_FWD_PER_TAP = False`; `_short_conv_fwd_kernel` is the
    default); HAS_BIAS: `bias [D]` added before the activation. SPLIT: channels `[0, D1)`, `[D1, D2)` and `[D2, D)`
    go to three `[B, T, width]` tensors laid out one after the other in y (`ROWS = B * T` rows each), so that each
    part is contiguous (see `triton_short_conv_split`)."""
    row0, r, t, d, w, start, seq, mask = _tile(tl.program_id(1), tl.program_id(0) * BLOCK_T, tl.program_id(2),
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
def _dynamic_conv_bwd_dk_kernel(x_ptr, k_ptr, state_ptr, dy_ptr, dacc_ptr, dk_ptr, tok_start_ptr, tok_seq_ptr, T, D,
                                W: tl.constexpr, W_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                                HAS_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, SILU: tl.constexpr):
    """The dynamic convolution's first backward kernel, grid as forward: writes
    `dkernels[b, t, d, i] = dacc[b, t, d] * x[b, t - W + 1 + i, d]` (`[B, T, D, W]`) with `dacc = dy * act'(pre)`,
    and with SILU dacc itself (float32 `[B, T, D]`, read back by the dx and dstate kernels; without SILU dacc is
    dy, nothing is written)."""
    row0, r, t, d, w, start, seq, mask = _tile(tl.program_id(1), tl.program_id(0) * BLOCK_T, tl.program_id(2),
                                               tok_start_ptr, tok_seq_ptr, T, D, BLOCK_T, BLOCK_D, W_POW2,
                                               IS_VARLEN)
    off = r[:, None] * D + d[None, :]
    xw = _load_windows(x_ptr, state_ptr, row0, r, t, d, w, start, seq, mask, D, W, HAS_STATE)
    dacc = tl.load(dy_ptr + row0 * D + off, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        pre = tl.sum(xw * _load_kernels(k_ptr, row0, r, d, w, mask, D, W, False), axis=2)
        sig = tl.sigmoid(pre)
        dacc = dacc * sig * (1.0 + pre * (1.0 - sig))
        tl.store(dacc_ptr + row0 * D + off, dacc.to(dacc_ptr.dtype.element_ty), mask=mask)
    dk_off = off[:, :, None] * W + w[None, None, :]
    dk_mask = mask[:, :, None] & (w < W)[None, None, :]
    tl.store(dk_ptr + row0 * D * W + dk_off, (dacc[:, :, None] * xw).to(dk_ptr.dtype.element_ty), mask=dk_mask)


@triton.jit
def _dynamic_conv_bwd_dx_kernel(k_ptr, dacc_ptr, dx_ptr, tok_end_ptr, T, D, W: tl.constexpr, W_POW2: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr):
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
    k = tl.load(k_ptr + row0 * D * W + off * W + w[None, None, :], mask=m, other=0.0).to(tl.float32)
    dx = tl.sum(dacc * k, axis=2)
    tl.store(dx_ptr + row0 * D + r[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dynamic_conv_bwd_dstate_kernel(k_ptr, dacc_ptr, dstate_ptr, cu_ptr, T, D, W: tl.constexpr,
                                    W_POW2: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr):
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
        kv = tl.load(k_ptr + (row * D + d)[:, None] * W + tap[None, :], mask=m, other=0.0).to(tl.float32)
        acc += g[:, None] * kv
    out = dstate_ptr + (n * D + d)[:, None] * (W - 1) + c[None, :]
    tl.store(out, acc.to(dstate_ptr.dtype.element_ty), mask=d_ok[:, None] & (c < W - 1)[None, :])


@triton.jit
def _load_dy(dy0_ptr, dy1_ptr, dy2_ptr, rows, d, mask, D, D1, D2, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
             HAS_DY0: tl.constexpr, HAS_DY1: tl.constexpr, HAS_DY2: tl.constexpr):
    """The float32 `[BLOCK_T, BLOCK_D]` tile of the output's gradient at flat rows `rows` (int64) and channels d,
    read where autograd left it: channels `[0, D1)` from `dy0 [B * T, D1]`, `[D1, D2)` from `dy1 [B * T, D2 - D1]`,
    `[D2, D)` from `dy2 [B * T, D - D2]` (one unsplit `[B * T, D]` gradient is dy0 with D1 = D2 = D). A part whose
    gradient is None (HAS_DYp False) reads as zeros; a tile that straddles two parts reads each with its own mask."""
    dy = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if HAS_DY0:
        m = mask & (d < D1)[None, :]
        dy += tl.load(dy0_ptr + rows[:, None] * D1 + d[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_DY1:
        m = mask & ((d >= D1) & (d < D2))[None, :]
        dy += tl.load(dy1_ptr + rows[:, None] * (D2 - D1) + (d - D1)[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_DY2:
        m = mask & (d >= D2)[None, :]
        dy += tl.load(dy2_ptr + rows[:, None] * (D - D2) + (d - D2)[None, :], mask=m, other=0.0).to(tl.float32)
    return dy


@triton.jit
def _load_tap(x_ptr, state_ptr, row0, r, t, d, start, seq, mask, D, W: tl.constexpr, i: tl.constexpr,
              HAS_STATE: tl.constexpr):
    """The float32 `[BLOCK_T, BLOCK_D]` input of tap i, `x[t - W + 1 + i, d]`: from the token's sequence, or
    before its start from its state row (column `W - 1 + src - start`), or zero."""
    src = t - (W - 1) + i
    inside = src >= start
    xv = tl.load(x_ptr + row0 * D + (r - (W - 1) + i)[:, None] * D + d[None, :], mask=mask & inside[:, None],
                 other=0.0).to(tl.float32)
    if HAS_STATE:
        xv += _load_state_tap(state_ptr, t, d, start, seq, mask, D, W, i)
    return xv


@triton.jit
def _load_state_tap(state_ptr, t, d, start, seq, mask, D, W: tl.constexpr, i: tl.constexpr):
    """The state's part of tap i's input (`_load_tap`): for tokens whose input `t - W + 1 + i` lies before their
    sequence's start, its state row's column `W - 1 + src - start`; zero for the others."""
    src = t - (W - 1) + i
    # row pointers in int64 (N * D * (W - 1) may pass 2**31), offsets within a row in int32
    rows = state_ptr + seq.to(tl.int64) * (D * (W - 1))
    col = src - start + (W - 1)
    return tl.load(rows[:, None] + d[None, :] * (W - 1) + col[:, None], mask=mask & (src < start)[:, None],
                   other=0.0).to(tl.float32)


@triton.jit
def _store_parts(y_ptr, acc, row0, r, d, mask, D, D1, D2, ROWS, SPLIT: tl.constexpr):
    """Store the float32 `[BLOCK_T, BLOCK_D]` tile `acc` (rows `row0 + r`, channels d) in y's dtype: into `y [B * T,
    D]`, or with SPLIT into the three parts laid out one after the other in y (channels `[0, D1)`, `[D1, D2)`,
    `[D2, D)`, each `[ROWS, width]`; see `triton_short_conv_split`).

    With SPLIT one masked store per part, each with scalar offsets (a part's first channel and width), as `_load_dy`
    reads the parts: the offsets stay contiguous along d, so the stores can vectorize. The old forward's one store
    with per-channel widths (`tl.where` of the parts') compiled for sm_90 to two-byte scalar stores. A part the tile
    does not reach is a store with an all-false mask."""
    out = acc.to(y_ptr.dtype.element_ty)
    rows = row0 + r
    if SPLIT:
        tl.store(y_ptr + rows[:, None] * D1 + d[None, :], out, mask=mask & (d < D1)[None, :])
        tl.store(y_ptr + D1 * ROWS + rows[:, None] * (D2 - D1) + (d - D1)[None, :], out,
                 mask=mask & ((d >= D1) & (d < D2))[None, :])
        tl.store(y_ptr + D2 * ROWS + rows[:, None] * (D - D2) + (d - D2)[None, :], out,
                 mask=mask & (d >= D2)[None, :])
    else:
        tl.store(y_ptr + rows[:, None] * D + d[None, :], out, mask=mask)


@triton.jit
def _short_conv_fwd_kernel(x_ptr, k_ptr, bias_ptr, state_ptr, y_ptr, tok_start_ptr, tok_seq_ptr, D1, D2, ROWS, T, D,
                           W: tl.constexpr, W_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                           HAS_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, SILU: tl.constexpr,
                           HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, NORM_HEAD: tl.constexpr = 0):
    """The static convolution's forward tap by tap (the default; `STATIC_FWD_PER_TAP`). Grid, arguments and output
    as `_dynamic_conv_fwd_kernel` with STATIC (`k_ptr` one `[D, W]` weight; `bias [D]` with HAS_BIAS; SPLIT: three
    contiguous parts, stored by `_store_parts`). NORM_HEAD > 0 (a power of two dividing BLOCK_D, the first two parts'
    widths multiples of it): the channels before D2 (the first two parts, the JetBlock's q and k) come out
    L2-normalised per head of NORM_HEAD channels, `y / sqrt(sum(y^2) + 1e-6)` over the float32 activations before
    their rounding (`triton_short_conv_split`'s `l2norm_head`).

    `pre = bias + sum_i x[t - W + 1 + i] * weight[:, i]`, summed tap by tap in float32 from two-dimensional
    `[BLOCK_T, BLOCK_D]` tiles (`_load_tap`: contiguous along the channels, so the loads can vectorize; the W tiles
    overlap in all but one row, and those re-reads come from cache) times the weight's column `[BLOCK_D]`. The old
    forward instead gathers one `[BLOCK_T, BLOCK_D, W]` tile whose innermost (tap) axis has stride D in memory.
    Each output element is the same W-term sum in the same order whatever the tile, so every tile gives the same
    result; against the old forward's tree sum over taps (and its bias added last) float32 results differ by
    rounding (~1e-7 relative) and bf16 outputs by at most one rounding. Not yet timed on a GPU."""
    row0, r, t, d, _w, start, seq, mask = _tile(tl.program_id(1), tl.program_id(0) * BLOCK_T, tl.program_id(2),
                                                tok_start_ptr, tok_seq_ptr, T, D, BLOCK_T, BLOCK_D, W_POW2,
                                                IS_VARLEN)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(W):
        tap = tl.load(k_ptr + d * W + i, mask=d < D, other=0.0).to(tl.float32)
        acc += _load_tap(x_ptr, state_ptr, row0, r, t, d, start, seq, mask, D, W, i, False) * tap[None, :]
    if HAS_STATE:
        # Inputs before a sequence's start (zero in the loads above) from its state row, in a second pass: only a
        # tile holding one of its sequences' first W - 1 tokens takes it (the state's loads are a gather, W - 1
        # elements apart, issued masked off for every tile otherwise), and with the x tiles consumed by then its
        # addresses need fewer registers (ptxas for sm_90, 16 x 256 tiles on 8 warps: 187 registers a thread with
        # the state read inside the first loop, 128 and no spills this way).
        if tl.min(t - start, axis=0) < W - 1:
            for i in tl.static_range(W - 1):
                tap = tl.load(k_ptr + d * W + i, mask=d < D, other=0.0).to(tl.float32)
                acc += _load_state_tap(state_ptr, t, d, start, seq, mask, D, W, i) * tap[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    if NORM_HEAD > 0:
        # a tile's channels start at a multiple of BLOCK_D, so it holds whole heads; channels past D are zero here
        heads: tl.constexpr = BLOCK_D // NORM_HEAD
        sq = tl.reshape(acc * acc, (BLOCK_T, heads, NORM_HEAD))
        inv = 1.0 / tl.sqrt(tl.sum(sq, axis=2) + 1e-6)
        scale = tl.reshape(tl.broadcast_to(inv[:, :, None], (BLOCK_T, heads, NORM_HEAD)), (BLOCK_T, BLOCK_D))
        acc = tl.where((d < D2)[None, :], acc * scale, acc)
    _store_parts(y_ptr, acc, row0, r, d, mask, D, D1, D2, ROWS, SPLIT)


@triton.jit
def _short_conv_dacc(x_ptr, state_ptr, dy0_ptr, dy1_ptr, dy2_ptr, taps, bias, row0, r, t, d, start, seq, mask, D,
                     D1, D2, W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                     HAS_STATE: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DY0: tl.constexpr,
                     HAS_DY1: tl.constexpr, HAS_DY2: tl.constexpr):
    """One tile of the static convolution's backward: the W inputs `xs` (a tuple of float32 `[BLOCK_T, BLOCK_D]`,
    tap i's `x[t - W + 1 + i]`) and `dacc = dy * act'(pre)`, pre recomputed from them, the weight's columns `taps`
    (a tuple of W `[BLOCK_D]`) and the bias. Everything is zero outside the tile's mask (dy is read as zero
    there). Two-dimensional tiles only, tap by tap: one `[BLOCK_T, BLOCK_D, W]` layout beside the 2-D ones made
    the compiler convert between them through shared memory (255 registers a thread, compiled for sm_90)."""
    xs = ()
    pre = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32) + bias[None, :]
    for i in tl.static_range(W):
        xi = _load_tap(x_ptr, state_ptr, row0, r, t, d, start, seq, mask, D, W, i, HAS_STATE)
        pre += xi * taps[i][None, :]
        xs = xs + (xi,)
    dacc = _load_dy(dy0_ptr, dy1_ptr, dy2_ptr, row0 + r, d, mask, D, D1, D2, BLOCK_T, BLOCK_D, HAS_DY0, HAS_DY1,
                    HAS_DY2)
    if SILU:
        sig = tl.sigmoid(pre)
        dacc = dacc * sig * (1.0 + pre * (1.0 - sig))
    return xs, dacc


@triton.jit
def _weight_taps(k_ptr, bias_ptr, d, D, W: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The weight's W columns `[BLOCK_D]` (float32, a tuple) and the bias (zeros without one)."""
    taps = ()
    for i in tl.static_range(W):
        taps = taps + (tl.load(k_ptr + d * W + i, mask=d < D, other=0.0).to(tl.float32),)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    return taps, bias


@triton.jit
def _short_conv_bwd_kernel(x_ptr, k_ptr, bias_ptr, state_ptr, dy0_ptr, dy1_ptr, dy2_ptr, dx_ptr, dk_ptr, db_ptr,
                           tok_start_ptr, tok_end_ptr, tok_seq_ptr, D1, D2, T, D, slab_tiles, W: tl.constexpr,
                           W_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                           HAS_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, SILU: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_DY0: tl.constexpr, HAS_DY1: tl.constexpr,
                           HAS_DY2: tl.constexpr, WRITE_DX: tl.constexpr):
    """The static convolution's whole backward but the state's gradient, in one pass over x and dy.

    Grid (cdiv(n_tiles, slab_tiles), B, cdiv(D, BLOCK_D)) with `n_tiles = cdiv(T, OWN)`, `OWN = BLOCK_T - (W - 1)`.
    Tile k computes dacc for the BLOCK_T tokens from `k * OWN` (pre recomputed from x, the state and the weight)
    and owns its first OWN tokens: for those it writes `dx[s] = sum_j dacc[s + j] * weight[W - 1 - j]` (j < W,
    `s + j` in s's sequence; the other W - 1 tokens are there only as the dacc of that sum, so dacc never goes
    through memory) and adds `dacc[s] * x[s - W + 1 + i]` to the weight gradient's and dacc[s] to the bias
    gradient's sums. Each program walks a slab of `slab_tiles` consecutive tiles (the last one stops at T), keeps
    those sums element-wise in `[BLOCK_T, BLOCK_D]` float32 accumulators (no reduction across threads inside the
    loop), and writes them reduced once: the float32 partials `dk [B, n_slabs, D, W]` and `db [B, n_slabs, D]`,
    summed over the first two dims by the caller. dy is read from the parts autograd hands back (`_load_dy`);
    WRITE_DX False (x needs no gradient) leaves dx out."""
    OWN: tl.constexpr = BLOCK_T - (W - 1)
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_d = tl.program_id(2)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    taps, bias = _weight_taps(k_ptr, bias_ptr, d, D, W, BLOCK_D, HAS_BIAS)
    acc = ()
    for i in tl.static_range(W):
        acc = acc + (tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32),)
    acc_b = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    first = pid_s * slab_tiles
    for k in range(tl.minimum(slab_tiles, tl.cdiv(T, OWN) - first)):
        row0, r, t, _d, _w, start, seq, mask = _tile(pid_b, (first + k) * OWN, pid_d, tok_start_ptr, tok_seq_ptr,
                                                     T, D, BLOCK_T, BLOCK_D, W_POW2, IS_VARLEN)
        xs, dacc = _short_conv_dacc(x_ptr, state_ptr, dy0_ptr, dy1_ptr, dy2_ptr, taps, bias, row0, r, t, d, start,
                                    seq, mask, D, D1, D2, W, BLOCK_T, BLOCK_D, HAS_STATE, SILU, HAS_BIAS, HAS_DY0,
                                    HAS_DY1, HAS_DY2)
        owned = mask & (r < OWN)[:, None]
        mine = tl.where(owned, dacc, 0.0)
        summed = ()
        for i in tl.static_range(W):
            summed = summed + (acc[i] + mine * xs[i],)
        acc = summed
        if HAS_BIAS:
            acc_b += mine
        if WRITE_DX:
            if IS_VARLEN:
                end = tl.load(tok_end_ptr + t, mask=t < T, other=0)
            else:
                end = tl.zeros([BLOCK_T], dtype=tl.int32) + T
            dx = dacc * taps[W - 1][None, :]  # j = 0: tap W - 1 of token s reads x[s]
            for j in tl.static_range(1, W):
                # dacc of token s + j (whose tap W - 1 - j reads x[s]): row r + j of this tile. Owned rows have
                # r + j < BLOCK_T; the clamp only keeps the other rows' indices in range.
                rows = tl.minimum(r + j, BLOCK_T - 1)
                later = tl.gather(dacc, tl.broadcast_to(rows[:, None], [BLOCK_T, BLOCK_D]), 0)
                dx += tl.where((t + j < end)[:, None], later, 0.0) * taps[W - 1 - j][None, :]
            tl.store(dx_ptr + (row0 + r)[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=owned)
    slab = pid_b.to(tl.int64) * tl.num_programs(0) + pid_s
    for i in tl.static_range(W):
        tl.store(dk_ptr + (slab * D + d) * W + i, tl.sum(acc[i], axis=0), mask=d < D)
    if HAS_BIAS:
        tl.store(db_ptr + slab * D + d, tl.sum(acc_b, axis=0), mask=d < D)


@triton.jit
def _short_conv_bwd_dstate_kernel(x_ptr, k_ptr, bias_ptr, state_ptr, dy0_ptr, dy1_ptr, dy2_ptr, dstate_ptr, cu_ptr,
                                  D1, D2, T, D, W: tl.constexpr, W_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
                                  IS_VARLEN: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  HAS_DY0: tl.constexpr, HAS_DY1: tl.constexpr, HAS_DY2: tl.constexpr):
    """Grid (N, cdiv(D, BLOCK_D)): the static convolution's initial-state gradient,
    `dstate[n, d, c] = sum_{r <= c} dacc[first + r, d] * weight[d, c - r]` over the first W - 1 tokens of sequence
    n (the only ones that read its state), with their dacc recomputed as `_short_conv_bwd_kernel` does (W - 1
    tokens per sequence: no dacc buffer for them either)."""
    n = tl.program_id(0)
    if IS_VARLEN:
        # one packed row (B == 1): the sequence's tokens are the rows (and tokens) first, first + 1, ...
        row0 = tl.load(cu_ptr + n)
        length = tl.load(cu_ptr + n + 1) - row0
        t0 = row0
    else:
        row0 = n.to(tl.int64) * T
        length = T
        t0 = 0
    r = tl.arange(0, W_POW2)
    t = t0 + r
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = ((r < W - 1) & (r < length))[:, None] & (d < D)[None, :]
    start = tl.zeros([W_POW2], dtype=t.dtype) + t0
    seq = tl.zeros([W_POW2], dtype=tl.int32) + n
    taps, bias = _weight_taps(k_ptr, bias_ptr, d, D, W, BLOCK_D, HAS_BIAS)
    _, dacc = _short_conv_dacc(x_ptr, state_ptr, dy0_ptr, dy1_ptr, dy2_ptr, taps, bias, row0, r, t, d, start, seq,
                               mask, D, D1, D2, W, W_POW2, BLOCK_D, True, SILU, HAS_BIAS, HAS_DY0, HAS_DY1, HAS_DY2)
    c = tl.arange(0, W_POW2)
    acc = tl.zeros([BLOCK_D, W_POW2], dtype=tl.float32)
    for rr in tl.static_range(W - 1):
        g = tl.sum(tl.where((r == rr)[:, None], dacc, 0.0), axis=0)  # token rr's dacc, [BLOCK_D]
        tap = c - rr
        m = (d < D)[:, None] & ((tap >= 0) & (c < W - 1))[None, :]
        acc += g[:, None] * tl.load(k_ptr + d[:, None] * W + tap[None, :], mask=m, other=0.0).to(tl.float32)
    out = dstate_ptr + (n.to(tl.int64) * D + d)[:, None] * (W - 1) + c[None, :]
    tl.store(out, acc.to(dstate_ptr.dtype.element_ty), mask=(d < D)[:, None] & (c < W - 1)[None, :])


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


def _static_fwd_config(T: int, D: int, W: int, on_gpu: bool) -> tuple[tuple[int, int], dict]:
    """`((BLOCK_T, BLOCK_D), {"num_warps": ...})` of the static forward tap by tap (`_short_conv_fwd_kernel`).

    Chosen by reasoning, not timed (no GPU here; `benchmarks/short_conv_bench.py --fwd-sweep` sweeps the tiles):
    the kernel streams x in and y out with a few flops an element, so wide rows of channels make each warp's loads
    and stores long contiguous runs (256 bf16 channels: a warp loads 512 bytes of a row, 16 bytes a thread), and
    16 tokens a tile keep the rows re-read for the W - 1 tokens before the tile (from cache) at 3 / 16 of the
    tile's. 16 x 256 on 8 warps is 16 elements a thread; compiled for sm_90 (ptxas, W = 4, SiLU, split, bf16, the
    launch's 16-divisible sizes) it takes 66 registers a thread, 118 with a state, no spills (on 4 warps, 32
    elements a thread: 128 and 184). The 1 x 8,192 x 1,728 prefill makes 512 x 7 programs, the last channel block
    three quarters full. T and W do not pick the tile (no recompiles)."""
    if not on_gpu:
        # the interpreter (CPU tensors): fewer, taller tiles run faster, as in `_launch_config`
        return (32, min(256, max(16, triton.next_power_of_2(D)))), {"num_warps": 4}
    return (16, 256), {"num_warps": 8}


def l2norm_head_fits(head: int, T: int, D: int, W: int, on_gpu: bool) -> bool:
    """Whether `triton_short_conv_split` can L2-normalise heads of `head` channels in its epilogue for an input of
    T tokens and D channels: a power of two no wider than the channel tile its forward runs with
    (`_static_fwd_config`), so that each head lies in one program. The JetBlock asks this before choosing it."""
    return head >= 1 and head & (head - 1) == 0 and head <= _static_fwd_config(T, D, W, on_gpu)[0][1]


def _bwd_config(D: int, W: int, on_gpu: bool) -> tuple[int, int, int]:
    """`(BLOCK_T, BLOCK_D, num_warps)` of the static backward (`_short_conv_bwd_kernel`): each tile computes dacc
    for BLOCK_T tokens and owns `BLOCK_T - (W - 1)` of them (BLOCK_T >= 2 * MAX_WIDTH keeps at least 9 owned).

    Taller tiles than the forward's 4 tokens: the W - 1 tokens of dacc a tile recomputes for its neighbour's sake
    (their windows from cache, their sigmoid) cost (W - 1) / OWN extra work, 10% at 32 rows and W = 4, 23% at 16.
    The kernel holds W inputs, W weight-gradient sums, dy, pre, dacc and dx per element, about 20 float32
    registers for each element a thread holds: compiled for sm_90 (ptxas, with the launch's 16-divisible sizes and
    pointers), at W = 4 with three parts, no state or bias (the GDN layers' case), 32 x 32 tiles on 8 warps (4
    elements a thread) take 125 registers a thread, so an SM holds 2 programs (512 threads, 2,048 elements, 25%
    occupancy); 16 x 32 on 4 warps is the same 124 registers and residency with 23% recompute; 8 elements a
    thread (32 x 64 on 8 warps, or 32 x 32 on 4) take 202-205 registers. Not timed on a GPU."""
    if not on_gpu:
        # the interpreter: as `_launch_config`, tall tiles run faster; the tests force smaller ones
        return 32, min(64, max(16, triton.next_power_of_2(D))), 4
    return 32, 32, 8


# The static backward's slabs (see `_slab_tiles`): at least this many programs per launch, and at most this many
# tiles per slab.
MIN_SLAB_PROGRAMS = 4096
MAX_SLAB_TILES = 256


def _slab_tiles(B: int, T: int, D: int, block_t: int, block_d: int, on_gpu: bool) -> int:
    """How many tiles of `block_t` owned tokens one program of the static backward walks (its slab).

    The longer the slab, the fewer float32 `[BLOCK_D, W]` partials of the weight's gradient are written and
    summed afterwards (one per slab, not one per tile), but the fewer programs are left to keep the GPU busy. The
    kernel streams memory (x and dy in, dx out) and one program keeps about one tile's loads outstanding at a time,
    so it needs every program slot filled: 2 programs per SM (see `_bwd_config`), 264 on the 132 SMs of an H100
    or H200. So the slab doubles, from one tile, while the grid keeps at least MIN_SLAB_PROGRAMS = 4096 programs
    (15 waves of resident programs or more, so that a part-empty last wave costs little), up to MAX_SLAB_TILES.
    The partials are then at most 8,192 programs x BLOCK_D x W floats (1 MB x W with 32-channel blocks), whatever
    the shape. With the GPU's tiles (29 owned tokens at W = 4) and 32-channel blocks (grid arithmetic, not
    measured on a GPU):

    | B x T | D | slab (tokens) | programs | partials (W = 4) |
    |---|---|---|---|---|
    | 32 x 1,024 | 576 (18 channel blocks) | 116 | 5,184 | 2.7 MB |
    | 32 x 1,024 | 1,728 (54 blocks) | 464 | 5,184 | 2.7 MB |
    | 1 x 65,536 | 576 | 232 | 5,094 | 2.6 MB |
    | 1 x 65,536 | 1,728 | 464 | 7,668 | 3.9 MB |
    | 1 x 262,144 | 2,048 (64 blocks) | 3,712 | 4,544 | 2.3 MB |

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


def _check_batch(B: int) -> None:
    # token blocks on the grid's first axis, the only one allowed more than 65,535 programs: with 4-token tiles a
    # second axis of cdiv(T, 4) failed at T = 262,144 ("invalid argument", 2026-12-06, H200: the 2B's 256K prefill)
    if B > 65535:
        raise ValueError(f"the short convolutions take at most 65,535 sequences per call, got B={B}")


def _launch(kernel, x: torch.Tensor, W: int, seg: _Segments, *args, config=None, **constexprs) -> None:
    """Launch `kernel(*args, T, D, ...)` over (T blocks, B, D blocks) for `x [B, T, D]` and width W, with the tile
    of `config(T, D, W, on_gpu)` (`_launch_config` when None)."""
    B, T, D = x.shape
    if x.numel() == 0:  # nothing to compute, and an empty grid cannot be launched
        return
    (block_t, block_d), opts = (config or _launch_config)(T, D, W, x.is_cuda)
    _check_batch(B)
    grid = (triton.cdiv(T, block_t), B, triton.cdiv(D, block_d))
    kernel[grid](*args, T, D, W=W, W_POW2=triton.next_power_of_2(W), BLOCK_T=block_t, BLOCK_D=block_d,
                 IS_VARLEN=seg.tok_start is not None, **constexprs, **opts)


def _varlen_ptrs(x: torch.Tensor, seg: _Segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tok_start, tok_seq, tok_end), with a placeholder that the kernels never read for dense inputs."""
    if seg.tok_start is None:
        dummy = x.new_empty(0, dtype=torch.int32)
        return dummy, dummy, dummy
    return seg.tok_start, seg.tok_seq, seg.tok_end


# The static convolution's forward: tap by tap from two-dimensional tiles (`_short_conv_fwd_kernel`, the default), or
# False: the old forward, the dynamic convolution's kernel with STATIC (`[BLOCK_T, BLOCK_D, W]` windows). Both give
# the same values up to the order of a W-term float32 sum; kept switchable so that the benchmark times both in one
# process (`benchmarks/short_conv_bench.py --fwd-sweep`). The new one's GPU speed is not yet measured.
STATIC_FWD_PER_TAP = True

# The static backward kernel uses tl.gather and tuples of tensors, which came with Triton 3.3 (shipped with torch
# 2.7); an older Triton takes `_static_backward_torch`.
FUSED_STATIC_BACKWARD = hasattr(tl, "gather")


def _static_backward_torch(ctx, x, weight, bias, state, dys):
    """The static backward through PyTorch's autograd, for a Triton without what `_short_conv_bwd_kernel` needs
    (FUSED_STATIC_BACKWARD): the forward again as plain tensor maths on `[B, T, W, D]` windows gathered the way the
    kernels read them (a token's inputs from its own sequence, before its start from its state row, else zero),
    then autograd. Slower and W times x's memory; the same gradients."""
    seg, (B, T, D), W = ctx.seg, x.shape, weight.shape[-1]
    split = ctx.split or (D,)
    dy = torch.cat([x.new_zeros(B, T, width) if g is None else g for g, width in zip(dys, split)], -1)
    t = torch.arange(T, device=x.device)
    start = t * 0 if seg.tok_start is None else seg.tok_start.long()
    src = t[:, None] - (W - 1) + torch.arange(W, device=x.device)  # [T, W]: token t's tap i reads x[src]
    inside = (src >= start[:, None])[None, :, :, None]
    with torch.enable_grad():
        leaves = [None if v is None else v.detach().requires_grad_() for v in (x, weight, bias, state)]
        windows = torch.where(inside, leaves[0][:, src.clamp(min=0)], 0)  # [B, T, W, D]
        if state is not None:
            seq = torch.arange(B, device=x.device)[:, None] + t * 0 if seg.tok_seq is None else seg.tok_seq.long()
            col = (src - start[:, None] + W - 1).clamp(0, W - 2)  # the state's column of each tap before the start
            windows = windows + torch.where(inside, 0, leaves[3][seq[..., None], :, col])
        pre = (windows * leaves[1].t()).sum(2) + (0 if bias is None else leaves[2])
        y = F.silu(pre) if ctx.activation == "silu" else pre
        grads = iter(torch.autograd.grad(y, [v for v in leaves if v is not None], dy.to(y.dtype)))
    dx, dweight, dbias, dstate = (None if v is None else next(grads) for v in leaves)
    if ctx.needs_input_grad[3] and dstate is None:  # W == 1: the state is [N, D, 0] and never read
        dstate = x.new_zeros(ctx.state_shape)
    return dx, dweight, dbias if ctx.needs_input_grad[2] else None, dstate


def _static_backward(ctx, x, weight, bias, state, dys):
    """`(dx, dweight, dbias, dstate)` of the static convolution from the output's gradient `dys`: one tensor, or
    with `ctx.split` one per part (each None when autograd has none for it), read where they lie."""
    seg = ctx.seg
    B, T, D = x.shape
    W = weight.shape[-1]
    split = ctx.split or (D,)
    # channel boundaries as the forward's SPLIT: parts [0, D1), [D1, D2), [D2, D); fewer parts leave the last empty
    ends = [sum(split[:1]), sum(split[:2]), D]
    # [B, T, width] each as autograd hands them over (contiguous unless something upstream made them otherwise)
    parts = [None if g is None else g.contiguous() for g in dys] + [None] * (3 - len(dys))
    dummy = next(g for g in parts if g is not None)  # a pointer the kernels never read for a None part
    dy_ptrs = [dummy if g is None else g for g in parts]
    flags = {f"HAS_DY{i}": g is not None for i, g in enumerate(parts)}
    silu, has_bias = ctx.activation == "silu", bias is not None
    tok_start, tok_seq, tok_end = _varlen_ptrs(x, seg)
    block_t, block_d, num_warps = _bwd_config(D, W, x.is_cuda)
    own = block_t - (W - 1)  # tokens each tile owns (see _short_conv_bwd_kernel)
    slab_tiles = _slab_tiles(B, T, D, own, block_d, x.is_cuda)
    n_slabs = triton.cdiv(triton.cdiv(T, own), slab_tiles)
    # per-slab partial sums of the weight's (and bias's) gradient: every (batch, slab, channel, tap) is written by
    # exactly one program, then summed here
    dk = torch.empty(B, n_slabs, D, W, device=x.device, dtype=torch.float32)
    db = torch.empty(B, n_slabs, D, device=x.device, dtype=torch.float32) if has_bias else None
    dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
    W_POW2 = triton.next_power_of_2(W)
    if x.numel():
        _check_batch(B)
        grid = (n_slabs, B, triton.cdiv(D, block_d))
        _short_conv_bwd_kernel[grid](
            x, weight, bias if has_bias else x, state if state is not None else x, *dy_ptrs,
            x if dx is None else dx, dk, x if db is None else db, tok_start, tok_end, tok_seq, ends[0], ends[1], T,
            D, slab_tiles, W=W, W_POW2=W_POW2, BLOCK_T=block_t, BLOCK_D=block_d, HAS_STATE=state is not None,
            IS_VARLEN=seg.tok_start is not None, SILU=silu, HAS_BIAS=has_bias, WRITE_DX=dx is not None, **flags,
            num_warps=num_warps)
    dweight = dk.sum((0, 1)).to(weight.dtype)
    dbias = db.sum((0, 1)).to(bias.dtype) if has_bias and ctx.needs_input_grad[2] else None
    dstate = None
    if ctx.needs_input_grad[3]:
        if state is None:  # W == 1: the state is [N, D, 0] and never read
            dstate = x.new_zeros(ctx.state_shape)
        else:
            dstate = torch.empty_like(state)
            block_d = min(128, max(16, triton.next_power_of_2(D)))
            if dstate.numel():
                _short_conv_bwd_dstate_kernel[(state.shape[0], triton.cdiv(D, block_d))](
                    x, weight, bias if has_bias else x, state, *dy_ptrs, dstate, x if seg.cu is None else seg.cu,
                    ends[0], ends[1], T, D, W=W, W_POW2=W_POW2, BLOCK_D=block_d, IS_VARLEN=seg.cu is not None,
                    SILU=silu, HAS_BIAS=has_bias, **flags)
    return dx, dweight, dbias, dstate


class _ConvFunction(torch.autograd.Function):
    """The dynamic convolution (`kernels [B, T, D, W]`), or with `static` the static one (`kernels [D, W]`, optional
    `bias [D]`, optional `split` of its output into 2 or 3 contiguous parts by channels), forward and backward."""

    @staticmethod
    def forward(ctx, x, kernels, bias, state, activation, seg, static, split=None, norm_head=0):
        W = kernels.shape[-1]
        B, T, D = x.shape
        has_state = state is not None and W > 1  # with W == 1 the state is [N, D, 0] and never read
        tok_start, tok_seq, _ = _varlen_ptrs(x, seg)
        # split: the parts' channel widths (2 or 3), each part written contiguous into one buffer
        y = torch.empty_like(x) if split is None else x.new_empty(B * T * D)
        ends = [D, D] if split is None else [split[0], split[0] + split[1]]
        args = (x, kernels, x if bias is None else bias, state if has_state else x, y, tok_start, tok_seq, *ends,
                B * T)
        flags = {"HAS_STATE": has_state, "SILU": activation == "silu", "HAS_BIAS": bias is not None,
                 "SPLIT": split is not None}
        # norm_head: per-tap only, forward only (`triton_short_conv_split` refuses it where a gradient is needed)
        if norm_head or (static and STATIC_FWD_PER_TAP):
            _launch(_short_conv_fwd_kernel, x, W, seg, *args, config=_static_fwd_config, NORM_HEAD=norm_head,
                    **flags)
        else:
            _launch(_dynamic_conv_fwd_kernel, x, W, seg, *args, STATIC=static, **flags)
        ctx.save_for_backward(x, kernels, bias, state if has_state else None)
        ctx.activation, ctx.seg, ctx.static, ctx.split = activation, seg, static, split
        ctx.state_shape = None if state is None else state.shape
        if split is None:
            return y
        # a part that reaches no loss gets None in backward, not a tensor of zeros that autograd would allocate
        # and fill for it (and the kernel read): the kernel reads such a part as zeros
        ctx.set_materialize_grads(False)
        parts, first = [], 0
        for width in split:
            parts.append(y[first * B * T : (first + width) * B * T].view(B, T, width))
            first += width
        return tuple(parts)

    @staticmethod
    def backward(ctx, *dys):
        x, kernels, bias, state = ctx.saved_tensors
        if ctx.static:
            backward = _static_backward if FUSED_STATIC_BACKWARD else _static_backward_torch
            return (*backward(ctx, x, kernels, bias, state, dys), None, None, None, None, None)
        seg = ctx.seg
        T, D = x.shape[1:]
        W = kernels.shape[-1]
        tok_start, tok_seq, tok_end = _varlen_ptrs(x, seg)
        dy = dys[0].contiguous()
        silu = ctx.activation == "silu"
        # dacc = dy * act'(pre) in float32, written by the first kernel and read by the dx and dstate kernels; without
        # an activation dacc is dy itself: no buffer to write and read back
        dacc = torch.empty(x.shape, device=x.device, dtype=torch.float32) if silu else dy
        dk = torch.empty_like(kernels)
        _launch(_dynamic_conv_bwd_dk_kernel, x, W, seg, x, kernels, x if state is None else state, dy, dacc, dk,
                tok_start, tok_seq, HAS_STATE=state is not None, SILU=silu)
        dx = dstate = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            _launch(_dynamic_conv_bwd_dx_kernel, x, W, seg, kernels, dacc, dx, tok_end)
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
                        W_POW2=triton.next_power_of_2(W), BLOCK_D=block_d, IS_VARLEN=seg.cu is not None)
        return dx, dk, None, dstate, None, None, None, None, None


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


def _apply(x, kernels, bias, initial_state, output_final_state, activation, cu_seqlens, static, split=None,
           norm_head=0):
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
                            activation, seg, static, split, norm_head)
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
    `bias [D]`) on `[B, T, D]` as it lies. Forward tap by tap (`_short_conv_fwd_kernel`; GPU speed not yet
    measured, see `STATIC_FWD_PER_TAP`): one read of x from memory and one write of y, accumulated in float32 with
    the bias and SiLU fused. Gradients to x,
    weight, bias and the initial state from one backward kernel (one read of x and dy, one write of dx; the
    weight's and bias's summed per slab of tokens, then over slabs; see the module's docstring).

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
    l2norm_head: int = 0,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """`triton_short_conv` whose output comes back split by channels into parts of `sizes` (2 or 3 widths summing
    to D), each written contiguous `[B, T, size]` by the kernel (`jetnas.ops.conv.short_conv_split`'s contract).
    `l2norm_head` > 0: the first two parts L2-normalised per head of that many channels inside the kernel (forward
    only: refused when a gradient would be needed; see `short_conv_split`).

    Why: the JetBlock family runs one conv over its q|k|v product; `y.split(...)` of one `[B, T, D]` output gives
    strided parts, which fla's kernels copy to contiguous ones first (its `input_guard`): three copies of the
    prompt's q, k and v per layer, 1.5 GB of the SmolLM2-135M hybrid's 8K prefill (benchmarks/prefill_copies.py).
    Gradients as `triton_short_conv`'s; backward reads the parts' gradients where they lie (no copy putting them
    side by side, as `split`'s backward would make; a part that reaches no loss costs nothing)."""
    sizes = tuple(int(s) for s in sizes)
    W = check_short_conv_inputs(x, weight, bias, initial_state, cu_seqlens, activation)[2]
    if not 2 <= len(sizes) <= 3 or min(sizes) < 1 or sum(sizes) != x.shape[-1]:
        raise ValueError(f"sizes must be 2 or 3 positive widths summing to D={x.shape[-1]}, got {list(sizes)}")
    if W > MAX_WIDTH:
        raise ValueError(f"triton_short_conv supports kernel widths W <= {MAX_WIDTH}, got W={W}")
    if l2norm_head:
        check_l2norm_head(l2norm_head, sizes, needs_grad(x, weight, bias, initial_state))
        if not l2norm_head_fits(l2norm_head, x.shape[1], x.shape[-1], W, x.is_cuda):
            block_d = _static_fwd_config(x.shape[1], x.shape[-1], W, x.is_cuda)[0][1]
            raise ValueError(f"l2norm_head={l2norm_head} is wider than the kernel's channel tile ({block_d})")
    return _apply(x, weight, bias, initial_state, output_final_state, activation, cu_seqlens, static=True,
                  split=sizes, norm_head=int(l2norm_head))

