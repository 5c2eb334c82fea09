"""The gated RMS norm's kernels read a gate that is a column slice of a wider product where it lies (the JetBlock
family's output gate: the first H*V columns of its g|b|a product), forward and backward, without the copy they made
before; other layouts still work (copied). Against `naive_gated_rms_norm`, float32, tolerance 1e-5 as in
test_fused.py (the same float32 math in another order agrees to ~1e-7; a row read from the wrong place shows at
order 1).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from jetnas.ops.fused import naive_gated_rms_norm
from jetnas.ops.triton_fused import _gate_lines, triton_gated_rms_norm
from tests.utils import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA device and TRITON_INTERPRET is not 1")


def product_gate(B, T, H, V, extra):
    """The gate as the fused g|b|a product leaves it: `[B, T, H, V]` viewed from the first H*V of H*V + extra
    columns."""
    bag = torch.randn(B, T, H * V + extra, device=DEVICE)
    return bag[..., : H * V].view(B, T, H, V)


@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm-before-gate", "norm-after-gate"])
@pytest.mark.parametrize("B,T", [(1, 37), (2, 5)], ids=["B1", "B2"])
def test_a_column_slice_gate_is_read_in_place(B, T, norm_before_gate):
    H, V = 9, 16
    gate = product_gate(B, T, H, V, extra=24)
    x, w = torch.randn(B, T, H, V, device=DEVICE), 1 + 0.1 * torch.randn(V, device=DEVICE)
    lines, rows_per_line, stride = _gate_lines(gate, V)
    # one line per token of H rows, H*V + 24 apart, in the product's own memory
    assert lines.data_ptr() == gate.data_ptr() and (rows_per_line, stride) == (H, H * V + 24)
    with torch.inference_mode():
        got = triton_gated_rms_norm(x, gate, w, 1e-5, norm_before_gate, None)
    assert rel_err(got, naive_gated_rms_norm(x, gate, w, 1e-5, norm_before_gate, None)) < TOL


def test_groups_over_a_column_slice():
    # Mamba2's grouped norm of a gate sliced from a wider product: rows of 8 within 48 channels
    gate = torch.randn(2, 7, 56, device=DEVICE)[..., :48]
    x, w = torch.randn(2, 7, 48, device=DEVICE), 1 + 0.1 * torch.randn(48, device=DEVICE)
    assert _gate_lines(gate, 8)[1:] == (6, 56)
    with torch.inference_mode():
        got = triton_gated_rms_norm(x, gate, w, 1e-5, False, 8)
    assert rel_err(got, naive_gated_rms_norm(x, gate, w, 1e-5, False, 8)) < TOL


def test_layouts_without_lines_are_copied_and_still_right():
    # batch-major memory viewed time-major: the leading dims do not merge into one stride
    gate = product_gate(3, 5, 2, 16, extra=8).transpose(0, 1)
    x, w = torch.randn(5, 3, 2, 16, device=DEVICE), torch.ones(16, device=DEVICE)
    lines, rows_per_line, stride = _gate_lines(gate, 16)
    assert lines.is_contiguous() and lines.data_ptr() != gate.data_ptr() and (rows_per_line, stride) == (1, 16)
    with torch.inference_mode():
        got = triton_gated_rms_norm(x, gate, w, 1e-5, True, None)
    assert rel_err(got, naive_gated_rms_norm(x, gate, w, 1e-5, True, None)) < TOL


@pytest.mark.parametrize("norm_before_gate,group_size", [(True, None), (False, None), (False, 8)],
                         ids=["norm-before-gate", "norm-after-gate", "groups"])
def test_gradients_with_a_column_slice_gate(norm_before_gate, group_size):
    """Training reads the gate where it lies too, forward and backward (the autograd node keeps the slice of the
    product, not a copy), and the product gets the gate's gradient in its columns: values and every gradient as the
    reference's. A layout without lines is copied and still right."""
    H, V = 3, 16
    bag = torch.randn(2, 6, H * V + 8, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 6, H, V, device=DEVICE, requires_grad=True)
    w = (1 + 0.1 * torch.randn(V, device=DEVICE)).requires_grad_(True)
    dy = torch.randn(2, 6, H, V, device=DEVICE)
    results = []
    for fn in (triton_gated_rms_norm, naive_gated_rms_norm):
        gate = bag[..., : H * V].view(2, 6, H, V)
        y = fn(x, gate, w, 1e-5, norm_before_gate, group_size)
        if fn is triton_gated_rms_norm:
            assert y.grad_fn.saved_tensors[1].data_ptr() == bag.data_ptr()
        results.append((y, *torch.autograd.grad((y * dy).sum(), (x, bag, w))))
    for got, want in zip(*results):
        assert rel_err(got, want) < TOL
    transposed = torch.randn(6, 2, H * V + 8, device=DEVICE)[..., : H * V].transpose(0, 1).view(2, 6, H, V)
    gate = transposed.detach().requires_grad_(True)
    got = torch.autograd.grad((triton_gated_rms_norm(x, gate, w, 1e-5, True, None) * dy).sum(), (x, gate, w))
    want = torch.autograd.grad((naive_gated_rms_norm(x, gate, w, 1e-5, True, None) * dy).sum(), (x, gate, w))
    for g, g_ref in zip(got, want):
        assert rel_err(g, g_ref) < TOL
