"""`short_conv_split`: the static convolution over q|k|v with its output split by channels. The Triton kernel
(`triton_short_conv_split`, interpreted on CPU) writes each part contiguous; the reference returns `y.split(...)`
views. Values, final states and every gradient against the reference.

Float32: both accumulate W <= 4 products in float32 in another order (and SiLU through Triton's sigmoid), so they
agree to ~1e-7 relative; TOL = 1e-5 as in test_triton_dynamic_conv.py, while a channel routed to the wrong part or
row shows at order 1. Final states are copies of inputs: exact.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from jetnas.ops.backend import Backend
from jetnas.ops.conv import short_conv_split
from tests.utils import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5
TRITON = Backend("triton", interpret=DEVICE == "cpu")

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA device and TRITON_INTERPRET is not 1")


def run(backend, x, weight, bias, state, sizes, dys, dfinal, activation):
    """Parts, final state, and the gradients of `sum <part_i, dy_i> + <final, dfinal>` (a None dy leaves that part
    out of the loss, so its gradient reaches backward as None)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias, state)]
    parts, final = short_conv_split(leaves[0], leaves[1], sizes, leaves[2], leaves[3], True, activation,
                                    backend=backend)
    loss = (final * dfinal).sum() + sum((p * dy).sum() for p, dy in zip(parts, dys) if dy is not None)
    present = [t for t in leaves if t is not None]
    return parts, final, torch.autograd.grad(loss, present)


@pytest.mark.parametrize("activation", [None, "silu"], ids=["linear", "silu"])
@pytest.mark.parametrize("bias_and_state", [False, True], ids=["plain", "bias_and_state"])
@pytest.mark.parametrize("sizes", [(48, 48, 48), (16, 16, 40), (24, 9)], ids=["qkv", "qk-narrow-v", "two-parts"])
@pytest.mark.parametrize("T", [1, 37], ids=lambda t: f"T{t}")
def test_parts_and_gradients_match_the_reference(T, sizes, bias_and_state, activation):
    torch.manual_seed(0)
    B, D, W = 2, sum(sizes), 4
    x = torch.randn(B, T, D, device=DEVICE)
    weight = torch.randn(D, W, device=DEVICE)
    bias = torch.randn(D, device=DEVICE) if bias_and_state else None
    state = torch.randn(B, D, W - 1, device=DEVICE) if bias_and_state else None
    # the second part's gradient unused: backward must fill zeros for it
    dys = [torch.randn(B, T, s, device=DEVICE) if i != 1 else None for i, s in enumerate(sizes)]
    dfinal = torch.randn(B, D, W - 1, device=DEVICE)
    want = run("torch", x, weight, bias, state, sizes, dys, dfinal, activation)
    got = run(TRITON, x, weight, bias, state, sizes, dys, dfinal, activation)
    for part, ref, size in zip(got[0], want[0], sizes):
        assert part.shape == (B, T, size) and part.is_contiguous()
        assert rel_err(part, ref) < TOL
    assert torch.equal(got[1], want[1])
    for name, g, ref in zip(["dx", "dweight", "dbias", "dstate"] if bias_and_state else ["dx", "dweight"],
                            got[2], want[2]):
        assert g.shape == ref.shape and rel_err(g, ref) < TOL, name


def test_parts_are_separate_contiguous_tensors_in_inference():
    # what the JetBlock hands fla: each part contiguous (fla copies strided inputs), no gradient bookkeeping
    x, weight = torch.randn(1, 23, 144, device=DEVICE), torch.randn(144, 4, device=DEVICE)
    with torch.inference_mode():
        parts, final = short_conv_split(x, weight, (48, 48, 48), backend=TRITON)
        ref, _ = short_conv_split(x, weight, (48, 48, 48), backend="torch")
    assert final is None and all(p.is_contiguous() for p in parts)
    assert not any(r.is_contiguous() for r in ref)  # the reference's parts are views of one output
    assert all(rel_err(p, r) < TOL for p, r in zip(parts, ref))


@pytest.mark.parametrize("sizes", [(48,), (10, 10, 10, 18), (48, 0, 0), (40, 40)], ids=str)
def test_bad_sizes_raise(sizes):
    x, weight = torch.randn(1, 5, 48, device=DEVICE), torch.randn(48, 4, device=DEVICE)
    for backend in ("torch", TRITON):
        with pytest.raises(ValueError, match="sizes"):
            short_conv_split(x, weight, sizes, backend=backend)
