"""The fused inference kernels (`jetnas.ops.fused`) against their PyTorch references.

Triton runs on CUDA, else on CPU under the interpreter. Float32 statistics are summed in a different order than
PyTorch's, and 1 / sqrt differs from rsqrt in the last float32 bit, so an output rounded to bfloat16 can land one
bf16 step (2^-8 relative) away from the reference: the bf16 checks allow one step; the float32 ones 1e-5 relative.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from jetnas.ops import fused
from jetnas.ops.fused import naive_gated_rms_norm, naive_rms_norm, naive_silu_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="no CUDA and TRITON_INTERPRET is not 1")


def close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    elif DEVICE == "cuda":  # round-to-nearest like PyTorch: at most one bf16 step apart, almost all identical
        step = want.float().abs().clamp_min(1e-3) * 2.0 ** -7
        assert bool(((got.float() - want.float()).abs() <= step).all())
        assert (got != want).float().mean().item() < 0.02
    else:  # Triton's CPU interpreter truncates float32 -> bfloat16 (seen: silu(6.156) -> 6.125, not 6.156), and
        # the kernels round up to twice (SwiGLU: the activation, then the product): two bf16 steps
        step = want.float().abs().clamp_min(1e-3) * 2.0 ** -6
        assert bool(((got.float() - want.float()).abs() <= step).all())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [96, 100])  # a power of two's worth of lanes, and a masked tail
def test_rms_norm_kernel(dtype, width):
    from jetnas.ops.triton_fused import triton_rms_norm

    torch.manual_seed(0)
    x = (torch.randn(3, 7, width, device=DEVICE) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(width, device=DEVICE)).to(dtype)
    close(triton_rms_norm(x, w, 1e-6), naive_rms_norm(x, w, 1e-6))
    # a strided input (a slice of a wider tensor) reads the right elements
    wide = torch.randn(5, 2 * width, device=DEVICE).to(dtype)
    close(triton_rms_norm(wide[:, :width], w, 1e-6), naive_rms_norm(wide[:, :width], w, 1e-6))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_before_gate,group_size,gated", [(True, None, True), (True, None, False),
                                                                (False, 16, True), (False, None, True)])
def test_gated_rms_norm_kernel(dtype, norm_before_gate, group_size, gated):
    from jetnas.ops.triton_fused import triton_gated_rms_norm

    torch.manual_seed(1)
    x = torch.randn(2, 5, 3, 48, device=DEVICE).to(dtype)
    gate = torch.randn_like(x) if gated else None
    w = (1 + 0.1 * torch.randn(48, device=DEVICE)).to(dtype)
    got = triton_gated_rms_norm(x, gate, w, 1e-5, norm_before_gate, group_size)
    close(got, naive_gated_rms_norm(x, gate, w, 1e-5, norm_before_gate, group_size))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel(dtype):
    from jetnas.ops.triton_fused import triton_silu_mul

    torch.manual_seed(2)
    g, u = (torch.randn(3, 1000, device=DEVICE) * 4).to(dtype), torch.randn(3, 1000, device=DEVICE).to(dtype)
    close(triton_silu_mul(g, u), naive_silu_mul(g, u))


def test_dispatch_keeps_the_reference_for_training_and_cpu(monkeypatch):
    # the kernels have no backward: with a gradient needed, or off CUDA, or switched off, the reference runs
    calls = []
    monkeypatch.setattr(fused, "triton_usable", lambda: True)
    import jetnas.ops.triton_fused as tf

    monkeypatch.setattr(tf, "triton_silu_mul", lambda g, u: calls.append("fused") or naive_silu_mul(g, u))
    g = torch.randn(4, 8, requires_grad=True)
    fused.silu_mul(g, torch.randn(4, 8)).sum().backward()  # CPU tensors: never fused
    assert calls == [] and g.grad is not None
    assert not fused._fused(g)
    with torch.no_grad(), fused.fusion(False):
        assert not fused._fused(torch.randn(2, 2, device="meta"))
