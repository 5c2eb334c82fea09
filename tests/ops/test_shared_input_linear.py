"""`jetnas.ops.fused.shared_input_linear` (products of one input whose backward adds x's gradients inside the
matrix products) against `naive_shared_input_linear` (`F.linear` per weight, autograd's adds): outputs and the
gradients of x and of every weight, in float32 and under bf16 autocast, and the cases it hands to the reference.

Tolerances:
- float32: the same products; x's gradient summed by the second product's `addmm_` instead of a separate add, so
  one float32 rounding fewer: 1e-6 relative (measured ~1e-7); outputs and weight gradients are the same products,
  compared bit for bit.
- bf16 autocast: outputs and weight gradients are the same bf16 products as autocast's `F.linear` (bit for bit).
  x's gradient: the reference rounds each product to bf16 and then their sum; here the first product is rounded
  and the second is added to it before one more rounding, so it is no further from the exact (float64) sum of the
  products than the reference (plus 1e-3 of slack for the products' own float32 accumulation order), and within
  1e-2 of the reference (bf16 steps are 2^-8 relative).
"""

import pytest
import torch

from jetnas.ops.fused import naive_shared_input_linear, shared_input_linear
from tests.utils import rel_err


def run(fn, x, weights, dys, autocast=False):
    """Outputs of `fn(x, weights)` and the gradients of x and the weights for output gradients `dys` (None: that
    output unused)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *weights)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = fn(leaves[0], leaves[1:])
    used = [(o, d.to(o.dtype)) for o, d in zip(outs, dys) if d is not None]
    torch.autograd.backward([o for o, _ in used], [d for _, d in used])
    return outs, [t.grad for t in leaves]


def inputs(shape=(2, 9, 24), widths=(40, 14)):
    torch.manual_seed(3)
    x = torch.randn(shape)
    weights = [torch.randn(n, shape[-1]) / shape[-1] ** 0.5 for n in widths]
    dys = [torch.randn(*shape[:-1], n) for n in widths]
    return x, weights, dys


@pytest.mark.parametrize("widths", [(40, 14), (8, 8, 16)], ids=["two", "three"])
def test_float32_matches_the_reference(widths):
    x, weights, dys = inputs(widths=widths)
    (outs, grads), (outs_ref, grads_ref) = (run(fn, x, weights, dys) for fn in
                                            (shared_input_linear, naive_shared_input_linear))
    for o, o_ref in zip(outs, outs_ref):
        assert o.shape == o_ref.shape and torch.equal(o, o_ref)
    assert rel_err(grads[0], grads_ref[0]) < 1e-6
    for g, g_ref in zip(grads[1:], grads_ref[1:]):
        assert torch.equal(g, g_ref)


def test_bf16_autocast_matches_autocasts_linear():
    # x as the model hands it (a bf16 norm output), float32 weights as parameters are
    x, weights, dys = inputs(shape=(4, 33, 64), widths=(96, 24))
    x = x.to(torch.bfloat16)
    (outs, grads), (outs_ref, grads_ref) = (run(fn, x, weights, dys, autocast=True) for fn in
                                            (shared_input_linear, naive_shared_input_linear))
    for o, o_ref in zip(outs, outs_ref):
        assert o.dtype == torch.bfloat16 and torch.equal(o, o_ref)
    for g, g_ref in zip(grads[1:], grads_ref[1:]):  # back to the weights' float32, as autocast's cast gives them
        assert g.dtype == torch.float32 and torch.equal(g, g_ref)
    dx, dx_ref = grads[0], grads_ref[0]
    assert dx.dtype == torch.bfloat16
    w16 = [w.to(torch.bfloat16).double() for w in weights]
    exact = sum(d.to(torch.bfloat16).double() @ w for d, w in zip(dys, w16))
    assert rel_err(dx, exact) <= rel_err(dx_ref, exact) + 1e-3
    assert rel_err(dx, dx_ref) < 1e-2


def test_partial_gradients_and_the_reference_cases():
    """An output without a gradient, frozen weights (no weight gradients), no grad mode and a single weight (the
    reference runs: nothing to add), and wrong shapes named."""
    x, weights, dys = inputs()
    (_, grads), (_, grads_ref) = (run(fn, x, weights, [dys[0], None]) for fn in
                                  (shared_input_linear, naive_shared_input_linear))
    assert torch.equal(grads[0], grads_ref[0]) and grads[2] is None and grads_ref[2] is None
    xl = x.clone().requires_grad_(True)
    outs = shared_input_linear(xl, weights)  # frozen weights: only x's gradient
    torch.autograd.backward(list(outs), dys)
    assert xl.grad is not None and all(w.grad is None for w in weights)
    with torch.no_grad():
        assert all(o.grad_fn is None for o in shared_input_linear(xl, weights))
    (out,) = shared_input_linear(xl, weights[:1])
    assert out.grad_fn.name() != "_SharedInputLinearBackward"
    with pytest.raises(ValueError, match=r"weights\[1\] must be \[N, D=24\] for x \[2, 9, 24\], got \[14, 23\]"):
        shared_input_linear(x, [weights[0], weights[1][:, :23]])
    with pytest.raises(ValueError, match="at least one weight"):
        shared_input_linear(x, [])
