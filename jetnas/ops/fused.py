"""Fused inference kernels for the elementwise tails of a layer: RMS norm, the gated RMS norm that closes the
linear-attention blocks, and SwiGLU's `silu(gate) * up`.

Each function here is the readable PyTorch reference and the dispatcher: the Triton kernel
(`jetnas.ops.triton_fused`) runs when the tensors are on CUDA, Triton is usable, fusion is enabled, and no
gradient is needed (the kernels have no backward: training keeps the autograd path). Results agree with the
references to float32 rounding before the final rounding to the output dtype (tests/ops/test_fused.py).

`fusion(False)` switches the kernels off (a context manager), e.g. to measure what they save in the same process.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from jetnas.ops.backend import triton_usable

_ENABLED = True


@contextlib.contextmanager
def fusion(enabled: bool):
    """Use (or not) the fused kernels inside the block."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = previous


def _fused(*tensors: torch.Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    if not _ENABLED or not present[0].is_cuda or not triton_usable():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return present[0].dtype in (torch.float16, torch.bfloat16, torch.float32)


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * round(x / sqrt(mean(x^2) + eps))`: float32 statistics, rounded to x's dtype before the weight
    (Llama / Qwen's order); float64 stays float64."""
    dtype = x.dtype
    x = x if x.dtype == torch.float64 else x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _fused(x, weight) and weight.dtype == x.dtype:
        from jetnas.ops.triton_fused import triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    return naive_rms_norm(x, weight, eps)


def naive_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
                         norm_before_gate: bool = True, group_size: int | None = None) -> torch.Tensor:
    """`norm(x) * weight * silu(gate)` (or `norm(x * silu(gate)) * weight` with `norm_before_gate=False`), the
    statistics over the last dim or over groups of `group_size` channels; float32 math, returned in x's dtype."""
    dtype = x.dtype
    x = x if x.dtype == torch.float64 else x.float()
    if gate is not None and not norm_before_gate:
        x = x * F.silu(gate.to(x.dtype))
    groups = x.unflatten(-1, (-1, group_size)) if group_size else x
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    x = (groups.flatten(-2) if group_size else groups) * weight.to(x.dtype)
    if gate is not None and norm_before_gate:
        x = x * F.silu(gate.to(x.dtype))
    return x.to(dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   norm_before_gate: bool = True, group_size: int | None = None) -> torch.Tensor:
    if _fused(x, gate, weight) and (gate is None or gate.shape == x.shape):
        from jetnas.ops.triton_fused import triton_gated_rms_norm

        return triton_gated_rms_norm(x, gate, weight, eps, norm_before_gate, group_size)
    return naive_gated_rms_norm(x, gate, weight, eps, norm_before_gate, group_size)


def naive_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's `silu(gate) * up`, fused into one pass on CUDA (inference)."""
    if _fused(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype:
        from jetnas.ops.triton_fused import triton_silu_mul

        return triton_silu_mul(gate, up)
    return naive_silu_mul(gate, up)
