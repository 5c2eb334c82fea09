"""Triton kernels that fuse the elementwise tails of a layer for inference (contracts and references in
`jetnas.ops.fused`).

Each is one pass over its rows: the unfused PyTorch code makes 5-8 passes, half of them in float32 (a 64K-token
prefill of the Jet-Nemotron-2B architecture spent a third of its GPU time in such kernels, measured on an H200,
benchmarks/results/2026-12-02_h200_checks). Rounding follows the references step by step: float32 math, and a
rounding to the output dtype wherever the reference rounds; the float32 sums run in another order and 1 / sqrt
stands for rsqrt, so an output can land one rounding step of its dtype away (tests/ops/test_fused.py: bf16 within
one step, < 2% of elements differing, on an H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, eps, stride_x, stride_y, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    inside = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    # HF order: normalise in float32, round to the input dtype, then multiply by the weight (rounded again)
    normed = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gated_rms_norm_kernel(x_ptr, g_ptr, w_ptr, y_ptr, L, G, eps, HAS_GATE: tl.constexpr,
                           NORM_BEFORE_GATE: tl.constexpr, BLOCK_L: tl.constexpr):
    # rows of L channels (a head, or a group); row r uses weight[(r % G) * L : (r % G + 1) * L]
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_L)
    inside = cols < L
    x = tl.load(x_ptr + row * L + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(g_ptr + row * L + cols, mask=inside, other=0.0).to(tl.float32)
        silu = g * tl.sigmoid(g)
        if not NORM_BEFORE_GATE:
            x = x * silu
    w = tl.load(w_ptr + (row % G) * L + cols, mask=inside, other=0.0).to(tl.float32)
    y = x * (1.0 / tl.sqrt(tl.sum(x * x, 0) / L + eps)) * w
    if HAS_GATE and NORM_BEFORE_GATE:
        y = y * silu
    tl.store(y_ptr + row * L + cols, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    # silu(g) rounds to the dtype before the product, as two PyTorch ops would
    act = (g * tl.sigmoid(g)).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs, (act * u).to(y_ptr.dtype.element_ty), mask=inside)


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(N)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, N, eps, x2.stride(0), y.stride(0), BLOCK_N=block,
                                     num_warps=_warps(block))
    return y.view(x.shape)


def triton_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
                          norm_before_gate: bool, group_size: int | None) -> torch.Tensor:
    hidden = x.shape[-1]
    L = group_size or hidden
    x = x.contiguous()
    gate = None if gate is None else gate.contiguous()
    y = torch.empty_like(x)
    rows = x.numel() // L
    block = triton.next_power_of_2(L)
    _gated_rms_norm_kernel[(rows,)](x, x if gate is None else gate, weight, y, L, hidden // L, eps,
                                    HAS_GATE=gate is not None, NORM_BEFORE_GATE=norm_before_gate, BLOCK_L=block,
                                    num_warps=_warps(block))
    return y


def triton_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    block = 2048
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, y, n, BLOCK=block, num_warps=8)
    return y
