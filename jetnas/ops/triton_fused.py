"""Triton kernels that fuse the elementwise tails of a layer, forward and backward (contracts and references in
`jetnas.ops.fused`).

Each is one pass over its rows: the unfused PyTorch code makes 5-8 passes, half of them in float32 (a 64K-token
prefill of the Jet-Nemotron-2B architecture spent a third of its GPU time in such kernels, measured on an H200,
benchmarks/results/2026-12-02_h200_checks), and autograd's backward of that code one more kernel per op, keeping
float32 copies of the inputs for it. Rounding follows the references step by step: float32 math, and a rounding to a
low-precision dtype wherever the reference (or PyTorch's autograd of it) rounds; the float32 sums run in another
order and 1 / sqrt stands for rsqrt, so an output can land one rounding step of its dtype away
(tests/ops/test_fused.py: the forward kernels in bf16 within one step, < 2% of elements differing, on an H200; the
backward kernels are checked under the interpreter and compiled for sm_90, not yet run on a GPU).

`triton_rms_norm`, `triton_add_rms_norm` (a residual add and the RMS norm after it: the sum and the normed value
from one read of both addends; backward, the sum's total gradient, that of the sum itself plus the norm's, in one
more), `triton_gated_rms_norm`, `triton_silu_mul` and `triton_silu_mul_packed` (SwiGLU of gate and up packed side
by side in one `[..., 2I]` tensor, as one matrix product makes them) have the references' contracts, gradients included:
when an input needs a gradient they run as an autograd Function whose backward is one more kernel. A weight's
gradient is summed per program in float32 (each program walks a strided set of rows), then over programs; a
weight that needs no gradient (frozen, as the MLPs and norms of PostNAS stage 1) skips that sum.

Design of the backward kernels: program p of P takes rows p, p + P, ... (P about 32 warps' worth per SM, so the
per-program weight partials stay small), recomputes the row's statistics from x (cheaper than storing them: x is
read anyway) and writes dx (and dgate) once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from jetnas.ops.backend import needs_grad

# widest row one program holds (a row lives in registers); wider rows take the references
MAX_WIDTH = 65536


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, eps, stride_x, stride_y, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    # HF order: normalise in float32, round to the input dtype, then multiply by the weight (in the promoted dtype)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dw_term(dy, xhat, x_dtype: tl.constexpr, dy_dtype: tl.constexpr, PROD_ROUND: tl.constexpr):
    """One row's float32 contribution to the norm weight's gradient, rounded as autograd of the reference rounds it:
    `normed` in x's dtype, then each product dy * normed in float32 (PROD_ROUND 0), dy's dtype (1) or x's (2)."""
    prod = dy * xhat.to(x_dtype).to(tl.float32)
    if PROD_ROUND == 1:
        prod = prod.to(dy_dtype).to(tl.float32)
    elif PROD_ROUND == 2:
        prod = prod.to(x_dtype).to(tl.float32)
    return prod


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_ptr, M, N, eps, stride_x, stride_dy, stride_dx,
                         BLOCK_N: tl.constexpr, HAS_DW: tl.constexpr, PROD_ROUND: tl.constexpr):
    """Program p takes rows p, p + P, ...; writes dx and, with HAS_DW, its float32 partial sum of dw (row p of
    `dw [P, N]`). PROD_ROUND: where the reference rounds each product dy * normed (the dtype x and the weight promote
    to): 0 not at all (float32), 1 to dy's dtype, 2 to x's dtype (an output cast to another dtype by out_dtype)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    # an int64 start makes the row index int64 (no overflow of row * stride)
    for row in range(pid.to(tl.int64), M, tl.num_programs(0)):
        x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        xhat = x * rstd
        # autograd of the reference rounds the gradient of its rounded `normed` to x's dtype
        g = (dy * w).to(x_ptr.dtype.element_ty).to(tl.float32)
        dx = rstd * (g - xhat * (tl.sum(g * xhat, 0) / N))
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        if HAS_DW:
            # and computes each product dy * normed in the promoted dtype before summing them in float32
            dw += _dw_term(dy, xhat, x_ptr.dtype.element_ty, dy_ptr.dtype.element_ty, PROD_ROUND)
    if HAS_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw, mask=inside)


@triton.jit
def _add_rms_norm_kernel(x_ptr, y_ptr, w_ptr, s_ptr, n_ptr, N, eps, stride_x, stride_y,
                         BLOCK_N: tl.constexpr):
    """`s = x + y` (rounded to s's dtype, as PyTorch's add) and the RMS norm of that rounded s, as
    `_rms_norm_kernel` computes it, from one read of x and y."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * stride_y + cols, mask=inside, other=0.0).to(tl.float32)
    s = (x + y).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + row * N + cols, s, mask=inside)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, 0) / N + eps)
    normed = (s * rstd).to(s_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(n_ptr + row * N + cols, (w * normed).to(n_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _add_rms_norm_bwd_kernel(s_ptr, w_ptr, dn_ptr, ds_ptr, dx_ptr, dy_ptr, dw_ptr, M, N, eps,
                             BLOCK_N: tl.constexpr, HAS_DS: tl.constexpr, TWO_OUT: tl.constexpr,
                             HAS_DW: tl.constexpr, PROD_ROUND: tl.constexpr):
    """The gradient of `(s, normed) = add_rms_norm(x, y)`: the sum's total gradient `ds + rms_norm_bwd(dn)`, written
    as dx in x's dtype and, with TWO_OUT (y of another dtype), as dy in y's; and, with HAS_DW, the program's float32
    partial dw (row p of `dw [P, N]`). Rows p, p + P, ... as `_rms_norm_bwd_kernel`, whose math (and PROD_ROUND)
    this repeats on s; s, dn and ds are contiguous `[M, N]`."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(pid.to(tl.int64), M, tl.num_programs(0)):  # int64 start: int64 offsets
        off = row * N + cols
        s = tl.load(s_ptr + off, mask=inside, other=0.0).to(tl.float32)
        dn = tl.load(dn_ptr + off, mask=inside, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, 0) / N + eps)
        shat = s * rstd
        g = (dn * w).to(s_ptr.dtype.element_ty).to(tl.float32)
        # the norm's input gradient, rounded to s's dtype as autograd's would be before it meets ds
        d = (rstd * (g - shat * (tl.sum(g * shat, 0) / N))).to(s_ptr.dtype.element_ty).to(tl.float32)
        if HAS_DS:
            d = (d + tl.load(ds_ptr + off, mask=inside, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
            d = d.to(tl.float32)
        tl.store(dx_ptr + off, d.to(dx_ptr.dtype.element_ty), mask=inside)
        if TWO_OUT:
            tl.store(dy_ptr + off, d.to(dy_ptr.dtype.element_ty), mask=inside)
        if HAS_DW:
            dw += _dw_term(dn, shat, s_ptr.dtype.element_ty, dn_ptr.dtype.element_ty, PROD_ROUND)
    if HAS_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw, mask=inside)


@triton.jit
def _gated_rms_norm_kernel(x_ptr, g_ptr, w_ptr, y_ptr, R, L, G, G_ROWS, g_stride, eps, HAS_GATE: tl.constexpr,
                           NORM_BEFORE_GATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    # R rows of L channels (a head, or a group); row r uses weight[(r % G) * L : (r % G + 1) * L]. x and y are
    # contiguous; the gate's row r starts at (r // G_ROWS) * g_stride + (r % G_ROWS) * L: lines of G_ROWS rows
    # each, g_stride apart (a column slice of a wider product; contiguous: G_ROWS = 1, g_stride = L).
    # BLOCK_R rows per program: rows are short (a 64-channel head); with one program per row the kernel took
    # 4.7 ms per training step for about 1 ms of bytes (H100, 2026-12-06). The default tile (4K elements) ran at
    # 88-93% of a copy's bandwidth on an H100, within 5% of the best of 28 tiles swept
    # (benchmarks/gated_norm_tiles_bench.py)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_L)
    inside = (rows < R)[:, None] & (cols < L)[None, :]
    off = rows[:, None] * L + cols[None, :]
    x = tl.load(x_ptr + off, mask=inside, other=0.0).to(tl.float32)
    if HAS_GATE:
        g_row = (rows // G_ROWS) * g_stride + (rows % G_ROWS) * L
        g = tl.load(g_ptr + g_row[:, None] + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        silu = g * tl.sigmoid(g)
        if not NORM_BEFORE_GATE:
            x = x * silu
    w = tl.load(w_ptr + (rows % G)[:, None] * L + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    y = x * (1.0 / tl.sqrt(tl.sum(x * x, 1) / L + eps))[:, None] * w
    if HAS_GATE and NORM_BEFORE_GATE:
        y = y * silu
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gate_terms(x, dy, gate, HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    """`(u, dyw, silu, dsilu)` of the gated norm's backward, float32: the normed input u (x, or x * silu(gate) when
    gated before the norm), the gradient w.r.t. norm(u) * w (dy, or dy * silu(gate) when gated after it), SiLU of
    the gate and its derivative (x as placeholders without a gate: never read then)."""
    u = x
    dyw = dy
    silu = x
    dsilu = x
    if HAS_GATE:
        sig = tl.sigmoid(gate)
        silu = gate * sig
        dsilu = sig * (1.0 + gate * (1.0 - sig))
        if NORM_BEFORE_GATE:
            dyw = dy * silu
        else:
            u = x * silu
    return u, dyw, silu, dsilu


@triton.jit
def _gated_input_grads(x, dy, du, uhat, w, silu, dsilu, HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    """`(dx, dgate)` from du, the gradient w.r.t. the normed input u (dgate = du as a placeholder without a gate)."""
    dx = du
    dgate = du
    if HAS_GATE:
        if NORM_BEFORE_GATE:
            dgate = dy * uhat * w * dsilu
        else:
            dx = du * silu
            dgate = du * x * dsilu
    return dx, dgate


@triton.jit
def _gated_rms_norm_bwd_kernel(x_ptr, g_ptr, w_ptr, dy_ptr, dx_ptr, dg_ptr, dw_ptr, R, L, G, G_ROWS, g_stride, eps,
                               HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_DW: tl.constexpr,
                               BLOCK_L: tl.constexpr):
    """Grid (P, G): program (p, k) takes the rows of weight group k (rows j * G + k) for j = p, p + P, ...; writes
    dx, dgate and, with HAS_DW, its float32 partial dw (row p * G + k of `dw [P * G, L]`). All math in float32, as
    the reference's. The gate is read where it lies, as the forward kernel reads it (lines of G_ROWS rows,
    g_stride apart); x, dy, dx and dgate are contiguous."""
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    cols = tl.arange(0, BLOCK_L)
    inside = cols < L
    w = tl.load(w_ptr + grp * L + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_L], dtype=tl.float32)
    for j in range(pid.to(tl.int64), R // G, tl.num_programs(0)):  # int64 start: int64 offsets
        off = (j * G + grp) * L
        x = tl.load(x_ptr + off + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off + cols, mask=inside, other=0.0).to(tl.float32)
        gate = x
        if HAS_GATE:
            r = j * G + grp
            gate = tl.load(g_ptr + (r // G_ROWS) * g_stride + (r % G_ROWS) * L + cols, mask=inside,
                           other=0.0).to(tl.float32)
        u, dyw, silu, dsilu = _gate_terms(x, dy, gate, HAS_GATE, NORM_BEFORE_GATE)
        rstd = 1.0 / tl.sqrt(tl.sum(u * u, 0) / L + eps)
        uhat = u * rstd
        duhat = dyw * w
        du = rstd * (duhat - uhat * (tl.sum(duhat * uhat, 0) / L))
        dx, dgate = _gated_input_grads(x, dy, du, uhat, w, silu, dsilu, HAS_GATE, NORM_BEFORE_GATE)
        if HAS_GATE:
            tl.store(dg_ptr + off + cols, dgate.to(dg_ptr.dtype.element_ty), mask=inside)
        tl.store(dx_ptr + off + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        if HAS_DW:
            dw += dyw * uhat
    if HAS_DW:
        tl.store(dw_ptr + (pid.to(tl.int64) * G + grp) * L + cols, dw, mask=inside)


@triton.jit
def _gated_rms_norm_bwd_tile_kernel(x_ptr, g_ptr, w_ptr, dy_ptr, dx_ptr, dg_ptr, dw_ptr, R, L, G, G_ROWS, g_stride,
                                    eps, HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                                    HAS_DW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """`_gated_rms_norm_bwd_kernel` on `[BLOCK_R, BLOCK_L]` tiles: program p takes row tiles p, p + P, ... (BLOCK_R
    rows from a multiple of BLOCK_R). The one-row kernel walks 64-channel rows with one warp, a reduction and a
    dependent load per row; a tile keeps BLOCK_R rows in flight. BLOCK_R is a multiple of G, so row i of every
    tile uses weight group i % G, and the program's float32 partial dw is `[BLOCK_R, L]` (row p * BLOCK_R + i of
    `dw [P * BLOCK_R, L]`), summed per group by the caller."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_L)
    slot = tl.arange(0, BLOCK_R)
    cin = cols < L
    w = tl.load(w_ptr + (slot % G)[:, None] * L + cols[None, :], mask=cin[None, :], other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
    for start in range(pid.to(tl.int64) * BLOCK_R, R, tl.num_programs(0) * BLOCK_R):  # int64 offsets
        rows = start + slot
        inside = (rows < R)[:, None] & cin[None, :]
        off = rows[:, None] * L + cols[None, :]
        x = tl.load(x_ptr + off, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=inside, other=0.0).to(tl.float32)
        gate = x
        if HAS_GATE:
            g_row = (rows // G_ROWS) * g_stride + (rows % G_ROWS) * L
            gate = tl.load(g_ptr + g_row[:, None] + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        u, dyw, silu, dsilu = _gate_terms(x, dy, gate, HAS_GATE, NORM_BEFORE_GATE)
        rstd = 1.0 / tl.sqrt(tl.sum(u * u, 1) / L + eps)
        uhat = u * rstd[:, None]
        duhat = dyw * w
        du = rstd[:, None] * (duhat - uhat * (tl.sum(duhat * uhat, 1) / L)[:, None])
        dx, dgate = _gated_input_grads(x, dy, du, uhat, w, silu, dsilu, HAS_GATE, NORM_BEFORE_GATE)
        if HAS_GATE:
            tl.store(dg_ptr + off, dgate.to(dg_ptr.dtype.element_ty), mask=inside)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        if HAS_DW:
            dw += dyw * uhat
    if HAS_DW:
        tl.store(dw_ptr + (pid.to(tl.int64) * BLOCK_R + slot)[:, None] * L + cols[None, :], dw,
                 mask=cin[None, :])


@triton.jit
def _swiglu(g, u, dtype: tl.constexpr):
    """`silu(g) * u` from float32 g and u: silu(g) rounds to the dtype before the product, as two PyTorch ops
    would; returns the float32 product (the caller rounds it once more, storing it)."""
    return (g * tl.sigmoid(g)).to(dtype).to(tl.float32) * u


@triton.jit
def _swiglu_bwd(g, u, dy, dtype: tl.constexpr):
    """`(dgate, dup)` in float32: `dup = dy * silu(g)` and `dgate = (dy * up) * silu'(g)`, each product rounded to
    the dtype where PyTorch's autograd of `F.silu(gate) * up` rounds it (the caller rounds each once more)."""
    sig = tl.sigmoid(g)
    act = (g * sig).to(dtype).to(tl.float32)
    dact = (dy * u).to(dtype).to(tl.float32)
    return dact * sig * (1.0 + g * (1.0 - sig)), dy * act


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _swiglu(g, u, y_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _silu_mul_bwd_kernel(g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    dg, du = _swiglu_bwd(g, u, dy, g_ptr.dtype.element_ty)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=inside)
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _packed_offsets(offs, I):
    """Element `offs` of the `[M, I]` output -> the offsets of its gate and up in the packed `[M, 2I]` input."""
    row = offs // I
    g_off = offs + row * I
    return g_off, g_off + I


@triton.jit
def _silu_mul_packed_kernel(gu_ptr, y_ptr, n, I, BLOCK: tl.constexpr):
    """`y [M, I]` from the packed `gu [M, 2I]` (both contiguous), over the flat `n = M * I` outputs."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g_off, u_off = _packed_offsets(offs, I)
    g = tl.load(gu_ptr + g_off, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + u_off, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _swiglu(g, u, y_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _silu_mul_packed_bwd_kernel(gu_ptr, dy_ptr, dgu_ptr, n, I, BLOCK: tl.constexpr):
    """`dgu [M, 2I]` (gate's gradient, then up's, per row) from `gu [M, 2I]` and `dy [M, I]`, all contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g_off, u_off = _packed_offsets(offs, I)
    g = tl.load(gu_ptr + g_off, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + u_off, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    dg, du = _swiglu_bwd(g, u, dy, gu_ptr.dtype.element_ty)
    tl.store(dgu_ptr + g_off, dg.to(dgu_ptr.dtype.element_ty), mask=inside)
    tl.store(dgu_ptr + u_off, du.to(dgu_ptr.dtype.element_ty), mask=inside)


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs(rows: int, device: torch.device, warps: int) -> int:
    """How many programs a backward kernel spreads `rows` over: on a GPU about 32 warps per SM (at least four
    programs), so narrow rows (a 64-channel head: one warp each) still keep the SM busy while the per-program weight
    partials stay a few MB at most; under the interpreter (CPU tensors) four, since it runs programs one after
    another anyway."""
    per_device = _sm_count(device) * max(4, 32 // warps) if device.type == "cuda" else 4
    return max(1, min(rows, per_device))


# -- forward launches --------------------------------------------------------------------------------------------


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=out_dtype or torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(N)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, N, eps, x2.stride(0), y.stride(0), BLOCK_N=block,
                                         num_warps=_warps(block))
    return y.view(x.shape)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as `[rows, N]` with unit column stride (a view where possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _add_rms_norm_fwd(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                      out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    N = x.shape[-1]
    x2, y2 = _rows(x), _rows(y)
    sum_dtype = torch.promote_types(x.dtype, y.dtype)
    s = torch.empty(x2.shape, dtype=sum_dtype, device=x.device)
    normed = torch.empty(x2.shape, dtype=out_dtype or torch.promote_types(sum_dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(N)
        _add_rms_norm_kernel[(x2.shape[0],)](x2, y2, weight, s, normed, N, eps, x2.stride(0), y2.stride(0),
                                             BLOCK_N=block, num_warps=_warps(block))
    return s.view(x.shape), normed.view(x.shape)


def _gate_lines(gate: torch.Tensor, L: int) -> tuple[torch.Tensor, int, int]:
    """The gate `[..., D]` as lines of whole rows of L channels, without a copy when it has such a layout:
    `(tensor, rows per line, line stride)`, row r starting at element `(r // rows per line) * stride + (r % rows
    per line) * L` of the tensor. Its trailing dims laid out contiguously make a line, and the leading ones must
    merge into one stride (a column slice of a wider product, viewed as heads: `[B, T, H, V]` with rows of V);
    otherwise a contiguous copy (one line of everything)."""
    if gate.numel() and gate.stride(-1) == 1:
        width, k = gate.shape[-1], gate.dim() - 1
        while k > 0 and gate.stride(k - 1) == width:
            width, k = width * gate.shape[k - 1], k - 1
        try:
            lines = gate.view(-1, width)
        except RuntimeError:  # the leading dims do not merge: copied below
            lines = None
        if lines is not None:
            return lines, width // L, lines.stride(0)
    return gate.contiguous(), 1, L


def _gated_rms_norm_fwd(x, gate, weight, eps, norm_before_gate, group_size, tile=None) -> torch.Tensor:
    """x contiguous; the gate anywhere `_gate_lines` reads it. `tile` = (rows per program, warps) overrides the
    default launch (benchmarks/gated_norm_tiles_bench.py sweeps it)."""
    hidden = x.shape[-1]
    L = group_size or hidden
    y = torch.empty_like(x)
    rows = x.numel() // L
    if rows:
        block = triton.next_power_of_2(L)
        if tile is None:
            # tiles of ~4K elements (one row when rows are that long already)
            block_r = min(max(1, 4096 // block), triton.next_power_of_2(rows))
            warps = _warps(block_r * block)
        else:
            block_r, warps = tile
        g, g_rows, g_stride = (x, 1, L) if gate is None else _gate_lines(gate, L)
        _gated_rms_norm_kernel[(triton.cdiv(rows, block_r),)](
            x, g, weight, y, rows, L, hidden // L, g_rows, g_stride, eps, HAS_GATE=gate is not None,
            NORM_BEFORE_GATE=norm_before_gate, BLOCK_R=block_r, BLOCK_L=block, num_warps=warps)
    return y


def _gated_bwd_tile(rows: int, L: int, G: int, device: torch.device) -> tuple[int, int, int] | None:
    """The tile backward's launch for `rows` rows of L channels in G weight groups: (rows per tile, warps, programs),
    or None for the one-row kernel (G not a power of two: a tile's rows must start at a multiple of G).

    The default of the gated norm's backward. One H100, bf16, 64-channel heads, strided gate
    (benchmarks/results/2026-12-06_h100_gated_norm_segpass): 85.6 us against the one-row kernel's 103.1 at the
    stage-1 step's 294,912 rows (83% vs 69% of a copy's bandwidth), 35.6 vs 37.5 us at the 8K prefill's 73,728."""
    if G & (G - 1):
        return None
    block = triton.next_power_of_2(L)
    block_r = max(G, min(max(1, 2048 // block), triton.next_power_of_2(rows)))
    warps = _warps(block_r * block)
    return block_r, warps, _programs(triton.cdiv(rows, block_r), device, warps)


def _gated_rms_norm_bwd(x, gate, weight, dy, eps, norm_before_gate, group_size, has_dw, tile="auto"):
    """`(dx, dgate, dweight)` of the gated RMS norm (dgate None without a gate, dweight None without has_dw). x and
    dy contiguous. `tile`: "auto" (`_gated_bwd_tile`), "rows" (the one-row kernel) or (rows per tile, warps,
    programs) for the tile kernel (benchmarks/gated_norm_tiles_bench.py)."""
    hidden = x.shape[-1]
    L = group_size or hidden
    G = hidden // L
    rows = x.numel() // L
    dx = torch.empty_like(x)
    # the gate's gradient contiguous, whatever the gate's layout (autograd takes it for a strided input)
    dgate = None if gate is None else torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    g, g_rows, g_stride = (x, 1, L) if gate is None else _gate_lines(gate, L)
    block = triton.next_power_of_2(L)
    if tile == "auto":
        tile = _gated_bwd_tile(rows, L, G, x.device) or "rows"
    if tile == "rows":
        # G programs per slot already: spread the rows of each weight group over P
        P = max(1, _programs(rows, x.device, _warps(block)) // G)
        dw = torch.empty(P * G, L, dtype=torch.float32, device=x.device) if has_dw else dx
        if rows:
            _gated_rms_norm_bwd_kernel[(P, G)](x, g, weight, dy, dx, dx if dgate is None else dgate, dw, rows, L, G,
                                               g_rows, g_stride, eps,
                                               HAS_GATE=gate is not None, NORM_BEFORE_GATE=norm_before_gate,
                                               HAS_DW=has_dw, BLOCK_L=block, num_warps=_warps(block))
        partials = dw.view(P, G * L) if has_dw else None
    else:
        block_r, warps, P = tile
        if block_r % G:
            raise ValueError(f"the tile backward needs rows per tile a multiple of G={G}, got {block_r}")
        dw = torch.empty(P * block_r, L, dtype=torch.float32, device=x.device) if has_dw else dx
        if rows:
            _gated_rms_norm_bwd_tile_kernel[(P,)](x, g, weight, dy, dx, dx if dgate is None else dgate, dw, rows, L,
                                                  G, g_rows, g_stride, eps, HAS_GATE=gate is not None,
                                                  NORM_BEFORE_GATE=norm_before_gate, HAS_DW=has_dw,
                                                  BLOCK_R=block_r, BLOCK_L=block, num_warps=warps)
        partials = dw.view(P * block_r // G, G * L) if has_dw else None
    dweight = None
    if has_dw:
        dweight = (partials.sum(0) if rows else torch.zeros(hidden, device=x.device)).to(weight.dtype)
    return dx, dgate, dweight


def _silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = 2048
        _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, y, n, BLOCK=block, num_warps=8)
    return y


def _silu_mul_packed_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    I = gate_up.shape[-1] // 2
    y = torch.empty(*gate_up.shape[:-1], I, dtype=gate_up.dtype, device=gate_up.device)
    n = y.numel()
    if n:
        block = 2048
        _silu_mul_packed_kernel[(triton.cdiv(n, block),)](gate_up, y, n, I, BLOCK=block, num_warps=8)
    return y


# -- autograd ----------------------------------------------------------------------------------------------------


def _norm_bwd_launch(M: int, N: int, x_dtype, w_dtype, dy_dtype, has_dw: bool, dx: torch.Tensor):
    """What an RMS-norm backward kernel launches with, for `[M, N]` rows: the row block, the number of persistent
    programs, the float32 `[P, N]` buffer of the weight gradient's partial sums (`dx` as a placeholder without one),
    and PROD_ROUND, how the forward rounded `x * weight` (0: float32; 1: to dy's dtype; 2: to their promoted dtype)."""
    block = triton.next_power_of_2(N)
    P = _programs(M, dx.device, _warps(block))
    dw = torch.empty(P, N, dtype=torch.float32, device=dx.device) if has_dw else dx
    product = torch.promote_types(x_dtype, w_dtype)
    prod_round = 0 if product == torch.float32 else 1 if product == dy_dtype else 2
    return block, P, dw, prod_round

class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _rms_norm_fwd(x, weight, eps, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        N = x.shape[-1]
        x2 = x.reshape(-1, N)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        dy2 = dy.reshape(-1, N)
        dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
        M = x2.shape[0]
        dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        has_dw = ctx.needs_input_grad[1]
        block, P, dw, prod_round = _norm_bwd_launch(M, N, x.dtype, weight.dtype, dy.dtype, has_dw, dx)
        if M:
            _rms_norm_bwd_kernel[(P,)](x2, weight, dy2, dx, dw, M, N, ctx.eps, x2.stride(0), dy2.stride(0),
                                       dx.stride(0), BLOCK_N=block, HAS_DW=has_dw, PROD_ROUND=prod_round,
                                       num_warps=_warps(block))
        dweight = None
        if has_dw:
            dweight = (dw.sum(0) if M else torch.zeros(N, device=x.device)).to(weight.dtype)
        return dx.view(x.shape) if ctx.needs_input_grad[0] else None, dweight, None, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, weight, eps, out_dtype):
        s, normed = _add_rms_norm_fwd(x, y, weight, eps, out_dtype)
        # the sum is an output the caller keeps (the residual stream): saving it costs no memory
        ctx.save_for_backward(s, weight)
        ctx.eps, ctx.x_dtype, ctx.y_dtype = eps, x.dtype, y.dtype
        # a sum nobody differentiates (the last layer's, under the final norm) arrives as None, not as zeros
        ctx.set_materialize_grads(False)
        return s, normed

    @staticmethod
    def backward(ctx, ds, dn):
        s, weight = ctx.saved_tensors
        N = s.shape[-1]
        s2 = s.view(-1, N)
        M = s2.shape[0]
        if dn is None:  # the norm unused: the sum's gradient is all there is
            d = torch.zeros_like(s) if ds is None else ds
            dx = d.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
            dy = d.to(ctx.y_dtype) if ctx.needs_input_grad[1] else None
            dw = torch.zeros_like(weight) if ctx.needs_input_grad[2] else None
            return dx, dy, dw, None, None
        dn2 = dn.reshape(M, N).contiguous()
        ds2 = None if ds is None else ds.reshape(M, N).contiguous()
        dx = torch.empty(M, N, dtype=ctx.x_dtype, device=s.device)
        two_out = ctx.y_dtype != ctx.x_dtype
        dy = torch.empty(M, N, dtype=ctx.y_dtype, device=s.device) if two_out else dx
        has_dw = ctx.needs_input_grad[2]
        block, P, dw, prod_round = _norm_bwd_launch(M, N, s.dtype, weight.dtype, dn.dtype, has_dw, dx)
        if M:
            _add_rms_norm_bwd_kernel[(P,)](s2, weight, dn2, dn2 if ds2 is None else ds2, dx, dy, dw, M, N, ctx.eps,
                                           BLOCK_N=block, HAS_DS=ds2 is not None, TWO_OUT=two_out, HAS_DW=has_dw,
                                           PROD_ROUND=prod_round, num_warps=_warps(block))
        dweight = None
        if has_dw:
            dweight = (dw.sum(0) if M else torch.zeros(N, device=s.device)).to(weight.dtype)
        # x and y of one dtype share one gradient tensor, as PyTorch's own add does
        return (dx.view(s.shape) if ctx.needs_input_grad[0] else None,
                dy.view(s.shape) if ctx.needs_input_grad[1] else None, dweight, None, None)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps, norm_before_gate, group_size):
        ctx.save_for_backward(x, gate, weight)
        ctx.eps, ctx.norm_before_gate, ctx.group_size = eps, norm_before_gate, group_size
        return _gated_rms_norm_fwd(x, gate, weight, eps, norm_before_gate, group_size)

    @staticmethod
    def backward(ctx, dy):
        x, gate, weight = ctx.saved_tensors
        dx, dgate, dweight = _gated_rms_norm_bwd(x, gate, weight, dy.contiguous(), ctx.eps, ctx.norm_before_gate,
                                                 ctx.group_size, ctx.needs_input_grad[2])
        return (dx if ctx.needs_input_grad[0] else None, dgate if ctx.needs_input_grad[1] else None, dweight,
                None, None, None)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _silu_mul_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            block = 2048
            _silu_mul_bwd_kernel[(triton.cdiv(n, block),)](gate, up, dy, dgate, dup, n, BLOCK=block, num_warps=8)
        return dgate, dup


class _SiluMulPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _silu_mul_packed_fwd(gate_up)

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        dy = dy.contiguous()
        dgate_up = torch.empty_like(gate_up)
        n = dy.numel()
        if n:
            block = 2048
            _silu_mul_packed_bwd_kernel[(triton.cdiv(n, block),)](gate_up, dy, dgate_up, n, gate_up.shape[-1] // 2,
                                                                   BLOCK=block, num_warps=8)
        return dgate_up


# -- the ops -----------------------------------------------------------------------------------------------------


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`naive_rms_norm` in one pass (and its backward in one more): x `[..., N]` (any row stride), weight `[N]`;
    returns `[..., N]` in `out_dtype`, else the promoted dtype of x and weight (the product is rounded once, to the
    output's dtype, so an `out_dtype` equals the reference followed by a cast). Shapes are checked by
    `jetnas.ops.fused.rms_norm`."""
    if needs_grad(x, weight):
        return _RMSNorm.apply(x, weight, eps, out_dtype)
    return _rms_norm_fwd(x, weight, eps, out_dtype)


def triton_add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                        out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`naive_add_rms_norm` in one pass (and its backward in one more): x and y `[..., N]` of one shape (any row
    stride), weight `[N]`; returns `(x + y, normed)`, the sum contiguous in the promoted dtype of x and y, normed in
    `out_dtype` (else the promoted dtype of the sum and the weight). Shapes are checked by
    `jetnas.ops.fused.add_rms_norm`."""
    if needs_grad(x, y, weight):
        return _AddRMSNorm.apply(x, y, weight, eps, out_dtype)
    return _add_rms_norm_fwd(x, y, weight, eps, out_dtype)


def triton_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
                          norm_before_gate: bool, group_size: int | None) -> torch.Tensor:
    """`naive_gated_rms_norm` in one pass (and its backward in one more): x and gate `[..., D]` of one shape,
    weight `[D]`, statistics over groups of `group_size` channels (None: all D); returns x's dtype. A gate that is a
    column slice of a wider tensor is read where it lies (`_gate_lines`), forward and backward, not copied (its
    gradient is written contiguous)."""
    x = x.contiguous()
    if needs_grad(x, gate, weight):
        return _GatedRMSNorm.apply(x, gate, weight, eps, norm_before_gate, group_size)
    return _gated_rms_norm_fwd(x, gate, weight, eps, norm_before_gate, group_size)


def triton_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` in one pass (and its backward in one more): gate and up of one shape and dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    if needs_grad(gate, up):
        return _SiluMul.apply(gate, up)
    return _silu_mul_fwd(gate, up)


def triton_silu_mul_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate_up[..., :I]) * gate_up[..., I:]` in one pass (and its backward in one more, which writes the
    gradient of the packed `[..., 2I]` input as one contiguous tensor); returns `[..., I]` in gate_up's dtype. The
    last dim's evenness is checked by `jetnas.ops.fused.silu_mul_packed`."""
    gate_up = gate_up.contiguous()
    if needs_grad(gate_up):
        return _SiluMulPacked.apply(gate_up)
    return _silu_mul_packed_fwd(gate_up)
