"""The gated delta rule's gates as one Triton kernel forward and one backward (contract and reference:
`jetnas.ops.gates`).

Forward, per token row and head: `beta = sigmoid(b)`, `g = -exp(A_log) * softplus(a + dt_bias)`, both times the
padding mask when there is one; g is stored in float32, beta in the dtype asked for. Backward recomputes the
sigmoid and softplus from a and b (cheaper than saving them: a and b are read anyway), writes da and db in a's and
b's dtypes, and each program sums its rows' contributions to dt_bias's gradient (`sum da`, float32) and A_log's
(`sum dg * g`, since dg/dA_log = g) into a `[P, 2, H]` partial, summed over programs by one `sum`.

Rounding follows the reference: float32 math, one rounding to each output's dtype. The sigmoid is `1 / (1 +
exp(-b))` and softplus `x > 20 ? x : log1p(exp(x))` as PyTorch's kernels write them; Triton has no log1p, so it is
`log(w) * u / (w - 1)` with `w = 1 + u` (exact to a few ulps, also for tiny u), and A_log's gradient is summed as
`dg * g` per element rather than PyTorch's `-(sum dg * softplus) * exp(A_log)`: float32 rounding apart
(tests/ops/test_gates.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# token rows per program
BLOCK_M = 64


@triton.jit
def _log1p(u):
    w = 1.0 + u
    # log(w) * u / (w - 1) cancels w's rounding error; when w rounds to 1, log1p(u) is u to float32 precision
    return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _softplus(x):
    # PyTorch's threshold (20): above it softplus(x) is x to float32 precision
    # (the branch not taken is computed too: exp of at most 20, so it stays finite)
    return tl.where(x > 20.0, x, _log1p(tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _gdn_gates_fwd_kernel(a_ptr, b_ptr, alog_ptr, dtb_ptr, m_ptr, g_ptr, beta_ptr, M, H, stride_a, stride_b,
                          HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    in_rows, in_cols = rows < M, cols < H
    inside = in_rows[:, None] & in_cols[None, :]
    neg_A = -tl.exp(tl.load(alog_ptr + cols, mask=in_cols, other=0.0).to(tl.float32))
    dtb = tl.load(dtb_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows[:, None] * stride_b + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    beta = 1.0 / (1.0 + tl.exp(-b))
    g = neg_A[None, :] * _softplus(a + dtb[None, :])
    if HAS_MASK:
        m = tl.load(m_ptr + rows, mask=in_rows, other=0).to(tl.float32)
        beta = beta * m[:, None]
        g = g * m[:, None]
    out = rows[:, None] * H + cols[None, :]
    tl.store(g_ptr + out, g, mask=inside)
    tl.store(beta_ptr + out, beta.to(beta_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gdn_gates_bwd_kernel(a_ptr, b_ptr, alog_ptr, dtb_ptr, m_ptr, dg_ptr, dbeta_ptr, da_ptr, db_ptr, part_ptr,
                          M, H, stride_a, stride_b, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_H: tl.constexpr):
    """Program p takes row blocks p, p + P, ...; writes da, db and its float32 partial sums of dt_bias's and A_log's
    gradients (`part[p, 0]`, `part[p, 1]`)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    in_cols = cols < H
    neg_A = -tl.exp(tl.load(alog_ptr + cols, mask=in_cols, other=0.0).to(tl.float32))
    dtb = tl.load(dtb_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
    d_dtb = tl.zeros([BLOCK_H], dtype=tl.float32)
    d_alog = tl.zeros([BLOCK_H], dtype=tl.float32)
    for block in range(pid.to(tl.int64), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        in_rows = rows < M
        inside = in_rows[:, None] & in_cols[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None] * stride_b + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        out = rows[:, None] * H + cols[None, :]
        dg = tl.load(dg_ptr + out, mask=inside, other=0.0).to(tl.float32)
        dbeta = tl.load(dbeta_ptr + out, mask=inside, other=0.0).to(tl.float32)
        if HAS_MASK:
            m = tl.load(m_ptr + rows, mask=in_rows, other=0).to(tl.float32)
            dg = dg * m[:, None]
            dbeta = dbeta * m[:, None]
        s = 1.0 / (1.0 + tl.exp(-b))
        db = dbeta * (1.0 - s) * s
        x = a + dtb[None, :]
        z = tl.exp(tl.minimum(x, 20.0))
        dsp = dg * neg_A[None, :]
        dx = tl.where(x > 20.0, dsp, dsp * z / (z + 1.0))
        tl.store(da_ptr + out, dx.to(da_ptr.dtype.element_ty), mask=inside)
        tl.store(db_ptr + out, db.to(db_ptr.dtype.element_ty), mask=inside)
        d_dtb += tl.sum(tl.where(inside, dx, 0.0), 0)
        d_alog += tl.sum(tl.where(inside, dsp * _softplus(x), 0.0), 0)
    tl.store(part_ptr + pid.to(tl.int64) * 2 * H + cols, d_dtb, mask=in_cols)
    tl.store(part_ptr + pid.to(tl.int64) * 2 * H + H + cols, d_alog, mask=in_cols)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t [B, T, H]` as `[B * T, H]` with unit column stride (a view where possible: a column slice of a wider
    projection, as `JetBlock._fused_projections` makes a and b, stays one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _flat_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    m = mask.reshape(-1)
    return m.view(torch.uint8) if m.dtype == torch.bool else m


class _GdnGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, A_log, dt_bias, mask, beta_dtype):
        B, T, H = b.shape
        a2, b2, m = _rows(a), _rows(b), _flat_mask(mask)
        M = a2.shape[0]
        g = torch.empty(B, T, H, dtype=torch.float32, device=b.device)
        beta = torch.empty(B, T, H, dtype=beta_dtype, device=b.device)
        if M:
            block_h = triton.next_power_of_2(H)
            _gdn_gates_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
                a2, b2, A_log, dt_bias, m if m is not None else a2, g, beta, M, H, a2.stride(0), b2.stride(0),
                HAS_MASK=m is not None, BLOCK_M=BLOCK_M, BLOCK_H=block_h)
        ctx.save_for_backward(a2, b2, A_log, dt_bias, m)
        ctx.shapes = (a.shape, a.dtype, b.dtype)
        return g, beta

    @staticmethod
    def backward(ctx, dg, dbeta):
        a2, b2, A_log, dt_bias, m = ctx.saved_tensors
        shape, a_dtype, b_dtype = ctx.shapes
        M, H = a2.shape
        dg = dg.reshape(M, H).contiguous()
        dbeta = dbeta.reshape(M, H).contiguous()
        da = torch.empty(M, H, dtype=a_dtype, device=a2.device)
        db = torch.empty(M, H, dtype=b_dtype, device=a2.device)
        blocks = triton.cdiv(M, BLOCK_M)
        # on a GPU about four programs per SM; under the interpreter (CPU) four, since it runs them one by one
        P = max(1, min(blocks, 4 * _sm_count(a2.device) if a2.device.type == "cuda" else 4))
        part = torch.empty(P, 2, H, dtype=torch.float32, device=a2.device)
        if M:
            _gdn_gates_bwd_kernel[(P,)](
                a2, b2, A_log, dt_bias, m if m is not None else a2, dg, dbeta, da, db, part, M, H, a2.stride(0),
                b2.stride(0), HAS_MASK=m is not None, BLOCK_M=BLOCK_M, BLOCK_H=triton.next_power_of_2(H))
        needs = ctx.needs_input_grad
        sums = None
        if needs[2] or needs[3]:  # frozen gates (A_log, dt_bias) skip the sum
            sums = part.sum(0) if M else part.new_zeros(2, H)
        return (da.view(shape) if needs[0] else None, db.view(shape) if needs[1] else None,
                sums[1].to(A_log.dtype) if needs[2] else None, sums[0].to(dt_bias.dtype) if needs[3] else None,
                None, None)


def triton_gdn_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                     mask: torch.Tensor | None = None,
                     beta_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`jetnas.ops.gates.naive_gdn_gates` with a decay (`a` given), one kernel each way: `(g [B, T, H] float32,
    beta [B, T, H] in beta_dtype, default float32)`. a and b: `[B, T, H]` float16 / bfloat16 / float32 (a column
    slice of a wider tensor is read in place); A_log, dt_bias `[H]`; mask `[B, T]` (any dtype, 0 = padding) or
    None. Differentiable in a, b, A_log and dt_bias."""
    return _GdnGates.apply(a, b, A_log, dt_bias, mask, beta_dtype or torch.float32)
