"""SwiGLU on a packed `[..., 2I]` input (`jetnas.ops.fused.silu_mul_packed`, the MLP's gate|up product under
`Backend.fused_projections`): the Triton kernel against the reference, values and gradients, and the dispatch.

Tolerances as in tests/ops/test_fused.py (whose helpers these tests use): float32 to 1e-5 (the same float32 math),
bfloat16 within two bf16 steps of the reference and no further from the float64 result than a few times the
reference's own distance (the interpreter truncates where PyTorch rounds).
"""

import pytest
import torch

from jetnas.ops import fused
from jetnas.ops.backend import Backend
from jetnas.ops.fused import naive_silu_mul, naive_silu_mul_packed
from tests.ops.test_fused import DEVICE, DTYPES, ROWS, _Spy, check_values_and_grads, close, needs_triton


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1536, 77], ids=lambda i: f"I{i}")  # SmolLM2's MLP width; rows not a block's
def test_silu_mul_packed_kernel_is_the_two_halves(dtype, width):
    from jetnas.ops.triton_fused import triton_silu_mul_packed

    torch.manual_seed(0)
    gu = torch.cat([4 * torch.randn(3, 5, width, device=DEVICE), torch.randn(3, 5, width, device=DEVICE)], -1)
    gu = gu.to(dtype)
    got = triton_silu_mul_packed(gu)
    close(got, naive_silu_mul_packed(gu))
    # the reference is silu_mul's on the halves
    assert torch.equal(naive_silu_mul_packed(gu), naive_silu_mul(gu[..., :width], gu[..., width:]))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS, ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("width", [1536, 77], ids=lambda i: f"I{i}")
def test_silu_mul_packed_gradients(dtype, rows, width):
    from jetnas.ops.triton_fused import triton_silu_mul_packed

    torch.manual_seed(1)
    gu = torch.cat([4 * torch.randn(rows, width, device=DEVICE), torch.randn(rows, width, device=DEVICE)], -1)
    check_values_and_grads(triton_silu_mul_packed, naive_silu_mul_packed, [gu.to(dtype)],
                           torch.randn(rows, width, device=DEVICE).to(dtype))


@needs_triton
def test_backward_writes_one_packed_gradient(monkeypatch):
    # one backward kernel writes the whole [..., 2I] gradient (no halves assembled by a copy), contiguous, and it
    # equals the reference's
    import jetnas.ops.triton_fused as tf

    spy = _Spy(tf._silu_mul_packed_bwd_kernel)
    monkeypatch.setattr(tf, "_silu_mul_packed_bwd_kernel", spy)
    torch.manual_seed(2)
    gu = torch.randn(2, 7, 2 * 48, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 7, 48, device=DEVICE)
    (grad,) = torch.autograd.grad(tf.triton_silu_mul_packed(gu), gu, dy)
    (want,) = torch.autograd.grad(naive_silu_mul_packed(gu), gu, dy)
    assert len(spy.launches) == 1 and grad.is_contiguous() and grad.shape == gu.shape
    assert (grad - want).abs().max() <= 1e-5 * want.abs().max()
    # nothing needs a gradient: the forward kernel alone, no autograd node
    with torch.no_grad():
        assert tf.triton_silu_mul_packed(gu).grad_fn is None


def test_dispatch_follows_the_backend(monkeypatch):
    import jetnas.ops.triton_fused as tf

    calls = []
    monkeypatch.setattr(tf, "triton_silu_mul_packed", lambda gu: calls.append("packed") or naive_silu_mul_packed(gu))
    gu = torch.randn(4, 16, requires_grad=True)
    for backend in ("torch", Backend("triton"), Backend("triton", fused=False, interpret=True)):
        # the reference: torch; a CPU tensor without the interpreter; fusion switched off
        fused.silu_mul_packed(gu, backend).sum().backward()
    assert calls == [] and gu.grad is not None
    interpreted = Backend("triton", interpret=True)
    fused.silu_mul_packed(gu, interpreted)
    fused.silu_mul_packed(gu.double(), interpreted)  # float64: the reference
    assert calls == ["packed"]


def test_an_odd_width_is_refused_with_its_shape():
    with pytest.raises(ValueError, match=r"even last dim, got \[2, 7\]"):
        fused.silu_mul_packed(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"got \[\]"):
        fused.silu_mul_packed(torch.tensor(1.0))
