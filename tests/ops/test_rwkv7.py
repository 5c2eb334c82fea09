"""RWKV-7's generalised delta rule (`jetnas.ops.rwkv7`): the recurrence against the paper's own convention, the
chunked form against the recurrence (values, final states, every gradient), packed sequences, the decode step and its
in-place / Triton forms, and input validation.

Float64 comparisons of two exact algebraic forms agree to rounding: 1e-10 relative, as in test_delta_rule.py. The
Triton step runs in float32 (on CPU under the interpreter) and sums in another order than the reference: 1e-5.
"""

import pytest
import torch

from jetnas.ops.backend import Backend
from jetnas.ops.decode import rwkv7_step_
from jetnas.ops.rwkv7 import (
    chunk_rwkv7,
    fused_recurrent_rwkv7,
    naive_chunk_rwkv7,
    naive_recurrent_rwkv7,
    rwkv7_step,
)
from tests.utils import DEVICE, needs_triton, rel_err

TOL = 1e-10


def make_inputs(B, T, H, K, V, decay_scale=1.0, dtype=torch.float64, requires_grad=False, seed=0):
    """RWKV-7's own parametrisation: w in (-exp(-1/2), 0), a = -kk, b = kk * iclr with kk unit-norm per head."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    r, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    w = -0.6065 * torch.sigmoid(randn(B, T, H, K)) * decay_scale
    kk = torch.nn.functional.normalize(randn(B, T, H, K), dim=-1)
    iclr = torch.sigmoid(randn(B, T, H, K))
    inputs = [r, w, k, v, -kk, kk * iclr]
    if requires_grad:
        inputs = [t.detach().requires_grad_() for t in inputs]
    return inputs


def paper_recurrence(r, w, k, v, a, b, S0):
    """The RWKV-7 paper's form, written independently of the module: state `[V, K]`,
    `S_t = S_{t-1} (diag(exp w_t) + a_t b_t^T) + v_t k_t^T`, `o_t = S_t r_t` (one head at a time, plain loops)."""
    B, T, H, K = r.shape
    o = torch.zeros(*v.shape, dtype=torch.float64)
    S_final = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            S = S0[bi, h].T.clone()  # [V, K]
            for t in range(T):
                transition = torch.diag(w[bi, t, h].exp()) + torch.outer(a[bi, t, h], b[bi, t, h])
                S = S @ transition + torch.outer(v[bi, t, h], k[bi, t, h])
                o[bi, t, h] = S @ r[bi, t, h]
            S_final[bi, h] = S.T
    return o, S_final


def test_recurrence_is_the_papers():
    inputs = make_inputs(2, 9, 2, 4, 3)
    h0 = torch.randn(2, 2, 4, 3, dtype=torch.float64)
    o, s = naive_recurrent_rwkv7(*inputs, initial_state=h0, output_final_state=True)
    o_ref, s_ref = paper_recurrence(*inputs, h0)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL


@pytest.mark.parametrize("T", [1, 15, 16, 17, 63, 100], ids=lambda t: f"T{t}")
def test_chunk_equals_recurrent(T):
    inputs = make_inputs(2, T, 3, 8, 5)
    h0 = torch.randn(2, 3, 8, 5, dtype=torch.float64)
    o_ref, s_ref = naive_recurrent_rwkv7(*inputs, initial_state=h0, output_final_state=True)
    o, s = naive_chunk_rwkv7(*inputs, initial_state=h0, output_final_state=True)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL


@pytest.mark.parametrize("chunk_size", [1, 5, 32])
def test_chunk_size_does_not_change_the_result(chunk_size):
    inputs = make_inputs(1, 37, 2, 4, 6)
    o_ref, s_ref = naive_recurrent_rwkv7(*inputs, output_final_state=True)
    o, s = naive_chunk_rwkv7(*inputs, output_final_state=True, chunk_size=chunk_size)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL


def test_strong_decay_stays_finite_and_exact():
    # log decay down to ~-24 per token, ~-1500 over a chunk of 64: a ratio of cumulative decays would overflow
    inputs = make_inputs(1, 64, 2, 4, 4, decay_scale=40.0)
    o_ref, _ = naive_recurrent_rwkv7(*inputs)
    o, _ = naive_chunk_rwkv7(*inputs, chunk_size=64)
    assert torch.isfinite(o).all() and rel_err(o, o_ref) < TOL


def test_gradients_agree():
    inputs = make_inputs(1, 37, 2, 4, 3, requires_grad=True)
    h0 = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (naive_recurrent_rwkv7, naive_chunk_rwkv7):
        o, s = fn(*inputs, scale=0.7, initial_state=h0, output_final_state=True)
        grads.append(torch.autograd.grad(o.pow(2).sum() + s.sum(), [*inputs, h0]))
    for name, a, b in zip(["r", "w", "k", "v", "a", "b", "h0"], *grads):
        assert rel_err(a, b) < TOL, name


def test_chunk_gradients_match_finite_differences():
    # the chunked form's autograd (through solve_triangular) against central differences, every input
    inputs = make_inputs(1, 11, 1, 3, 2, requires_grad=True)
    h0 = torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True)

    def fn(*args):
        o, s = naive_chunk_rwkv7(*args[:6], initial_state=args[6], output_final_state=True, chunk_size=4)
        return o, s

    assert torch.autograd.gradcheck(fn, (*inputs, h0), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_packed_sequences_and_step():
    cu = torch.tensor([0, 9, 9, 40])
    inputs = make_inputs(1, 40, 2, 4, 3)
    h0 = torch.randn(3, 2, 4, 3, dtype=torch.float64)
    o, s = naive_chunk_rwkv7(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_ref, s_ref = naive_recurrent_rwkv7(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL
    assert torch.equal(s[1], h0[1])  # the empty sequence keeps its state
    # each packed sequence alone gives the same outputs
    alone, _ = naive_recurrent_rwkv7(*(x[:, :9] for x in inputs), initial_state=h0[:1])
    assert rel_err(o[:, :9], alone) < TOL
    # one step after a prefill of the third sequence's first 30 tokens gives its last output and final state
    _, s_prefix = naive_chunk_rwkv7(*(x[:, 9:39] for x in inputs), initial_state=h0[2:], output_final_state=True)
    o_step, s_step = rwkv7_step(*(x[:, -1] for x in inputs), s_prefix)
    assert rel_err(o_step, o[:, -1]) < TOL and rel_err(s_step, s[2:3]) < TOL


def test_dispatchers_run_the_references_on_cpu():
    inputs = make_inputs(2, 20, 2, 4, 3, dtype=torch.float32)
    o_ref, s_ref = naive_recurrent_rwkv7(*inputs, output_final_state=True)
    for fn in (chunk_rwkv7, fused_recurrent_rwkv7):
        # on CPU tensors the Triton backend falls back to the reference (fla is CUDA-only)
        o, s = fn(*inputs, output_final_state=True, backend="triton")
        assert s.dtype == torch.float32 and rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_torch_step_in_place():
    r, w, k, v, a, b = (x[:, 0].float() for x in make_inputs(2, 1, 3, 8, 5))
    state = torch.randn(2, 3, 8, 5)
    want_o, want_state = rwkv7_step(r, w, k, v, a, b, state.clone(), scale=0.5)
    o = rwkv7_step_(r, w, k, v, a, b, state, scale=0.5)
    assert torch.equal(o, want_o) and torch.equal(state, want_state)
    with pytest.raises(ValueError, match="float32"):
        rwkv7_step_(r, w, k, v, a, b, state.double())


@needs_triton
@pytest.mark.parametrize("K,V", [(24, 40), (16, 64), (8, 130)], ids=["masked", "pow2", "several-value-blocks"])
def test_step_kernel_in_place(K, V):
    B, H = 3, 2
    r, w, k, v, a, b = (x[:, 0].float().to(DEVICE) for x in make_inputs(B, 1, H, K, V, seed=4))
    state = torch.randn(B, H, K, V, device=DEVICE)
    want_o, want_state = rwkv7_step(r, w, k, v, a, b, state.clone(), scale=0.7)
    ptr = state.data_ptr()
    # a plain "triton" would keep CPU tensors on the reference: `interpret` sends them to the kernel
    o = rwkv7_step_(r, w, k, v, a, b, state, scale=0.7, backend=Backend("triton", interpret=DEVICE == "cpu"))
    assert state.data_ptr() == ptr
    assert rel_err(o, want_o) < 1e-5 and rel_err(state, want_state) < 1e-5


def test_bad_shapes_are_named():
    r, w, k, v, a, b = make_inputs(2, 5, 2, 4, 3)
    with pytest.raises(ValueError, match=r"r must be \[B, T, H, K\], got shape \[2, 5, 8\]"):
        naive_chunk_rwkv7(r.flatten(2), w, k, v, a, b)
    with pytest.raises(ValueError, match=r"b must have the shape of r \[2, 5, 2, 4\], got \[2, 5, 2, 3\]"):
        chunk_rwkv7(r, w, k, v, a, b[..., :3])
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\] = \[2, 5, 2, V\], got \[2, 4, 2, 3\]"):
        fused_recurrent_rwkv7(r, w, k, v[:, :4], a, b)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[2, 2, 4, 3\], got \[2, 2, 3, 4\]"):
        naive_recurrent_rwkv7(r, w, k, v, a, b, initial_state=torch.zeros(2, 2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        naive_chunk_rwkv7(r, w, k, v, a, b, chunk_size=0)
    with pytest.raises(ValueError, match="expected r, w, k, a, b"):
        rwkv7_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0, :, :3], None)
