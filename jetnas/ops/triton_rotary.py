"""Rotary position embeddings as one Triton kernel each way (contract and reference: `jetnas.ops.fused.rotary`,
`jetnas.ops.attention.apply_rotary`).

The reference `x * cos + cat([-x2, x1]) * sin` makes, per call, two casts of the float32 tables, a negation, a
concatenation, two products that broadcast the tables over the heads and a sum: seven passes over `[B, T, H, D]`
or its halves, with the broadcasting products on PyTorch's non-vectorized kernel. A stage-1 step of the SmolLM2-135M
GDN hybrid runs it on q and k of 34 attention layers (the teacher's 30 and the student's 4): about 19 GB of traffic
at 32 x 1,024 tokens (benchmarks/results/2026-12-06_cpu_elementwise), where one read of x and one write of the
result are 4 GB.

Here one program rotates all heads of one token: it reads the token's x (each element once more as the other
half's partner, from cache) and its row of the tables, and writes the result. Backward is the same kernel on the
output's gradient with the transposed rotation: `dx = dy * cos + rot^T(dy * sin)`, `rot^T(u) = cat([u2, -u1])`.
Rounding follows the reference and its autograd step by step: the tables rounded to x's dtype, each product rounded
to it, then their sum (in backward: `dy * cos` and `dy * sin` rounded, then the sum of the two gradient paths).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T, H, D, sx_b, sx_t, sx_h, sc_b, sc_t, ss_b, ss_t,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Row r = b * T + t of `x [B, T, H, D]` (strides sx_*, unit stride along D) against `cos, sin [B, T, D]`
    (strides sc_*, ss_*): `y = rnd(rnd(x c) + rnd(rot(x) s))` with `rot(x) = cat([-x2, x1])`, or with TRANSPOSE
    (the backward, x being the output's gradient) `y = rnd(rnd(x c) + rot^T(rnd(x s)))`, `rot^T(u) = cat([u2,
    -u1])`; rnd rounds to y's dtype, and so are the tables; y is contiguous `[B, T, H, D]`."""
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    t = r % T
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    half = D // 2
    low = cols < half
    partner = tl.where(low, cols + half, cols - half)
    in_cols = cols < D
    inside = (heads < H) & in_cols
    row = x_ptr + b * sx_b + t * sx_t + heads * sx_h
    x = tl.load(row + cols, mask=inside, other=0.0).to(tl.float32)
    xp = tl.load(row + partner, mask=inside, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    c = tl.load(cos_ptr + b * sc_b + t * sc_t + cols, mask=in_cols, other=0.0).to(dtype).to(tl.float32)
    direct = (x * c).to(dtype).to(tl.float32)
    if TRANSPOSE:
        # d(out[e]) / d(x[d]) through the rotated term: + s[d + D/2] at e = d + D/2 (d in the first half), and
        # - s[d - D/2] at e = d - D/2 (second half)
        sp = tl.load(sin_ptr + b * ss_b + t * ss_t + partner, mask=in_cols, other=0.0).to(dtype).to(tl.float32)
        rotated = (xp * sp).to(dtype).to(tl.float32)
        rotated = tl.where(low, rotated, -rotated)
    else:
        s = tl.load(sin_ptr + b * ss_b + t * ss_t + cols, mask=in_cols, other=0.0).to(dtype).to(tl.float32)
        rotated = (tl.where(low, -xp, xp) * s).to(dtype).to(tl.float32)
    y = (direct + rotated).to(dtype)
    tl.store(y_ptr + r * H * D + heads * D + cols, y, mask=inside)


def _tables(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    B, T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = _tables(cos), _tables(sin)
    y = torch.empty(B, T, H, D, dtype=x.dtype, device=x.device)
    if y.numel():
        block_h, block_d = triton.next_power_of_2(H), triton.next_power_of_2(D)
        _rotary_kernel[(B * T,)](x, cos, sin, y, T, H, D, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                                 cos.stride(1), sin.stride(0), sin.stride(1), BLOCK_H=block_h, BLOCK_D=block_d,
                                 TRANSPOSE=transpose, num_warps=max(1, min(8, block_h * block_d // 256)))
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, transpose=True), None, None


def triton_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`jetnas.ops.attention.apply_rotary` in one pass (and its backward in one more): x `[B, T, H, D]` (any
    strides; float16 / bfloat16 / float32), cos and sin `[B, T, D]` (any floating dtype, rounded to x's as the
    reference does; no gradient). Returns `[B, T, H, D]` contiguous in x's dtype. Shapes are checked by
    `jetnas.ops.fused.rotary`."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotary.apply(x, cos, sin)
    return _rotate(x, cos, sin, transpose=False)
