"""The chunked gated delta rule against the token-by-token recurrence, in float64.

Both forms are exact algebra of the same recurrence, so in float64 they agree to rounding: we allow a relative
error of 1e-10 (observed ~1e-15); anything algebraically wrong is off by O(1).
"""

import pytest
import torch

from jetnas.ops.delta_rule import (
    chunk_gated_delta_rule,
    gated_delta_rule_step,
    naive_chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)
from tests.utils import rel_err

TOL = 1e-10


def make_inputs(B, T, H, K, V, gated=True, dtype=torch.float64, requires_grad=False):
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, dtype=dtype)) if gated else None
    beta = torch.rand(B, T, H, dtype=dtype)
    inputs = [q, k, v, g, beta]
    if requires_grad:
        for t in inputs:
            if t is not None:
                t.requires_grad_(True)
    return inputs


@pytest.mark.parametrize("T", [1, 7, 63, 64, 100, 200], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("chunk_size", [16, 64], ids=lambda c: f"C{c}")
def test_chunk_equals_recurrent(T, gated, chunk_size):
    q, k, v, g, beta = make_inputs(2, T, 3, 8, 12, gated)
    h0 = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                    use_qk_l2norm=True)
    o, s = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                        use_qk_l2norm=True, chunk_size=chunk_size)
    assert rel_err(o, o_ref) < TOL
    assert rel_err(s, s_ref) < TOL


@pytest.mark.parametrize("T", [1, 63, 100], ids=lambda t: f"T{t}")
def test_gradients_agree(T):
    inputs = make_inputs(2, T, 2, 8, 6, requires_grad=True)
    h0 = torch.randn(2, 2, 8, 6, dtype=torch.float64, requires_grad=True)
    do, ds = torch.randn(2, T, 2, 6, dtype=torch.float64), torch.randn(2, 2, 8, 6, dtype=torch.float64)
    grads = []
    for fn in (naive_recurrent_gated_delta_rule, naive_chunk_gated_delta_rule):
        o, s = fn(*inputs, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
        grads.append(torch.autograd.grad((o * do).sum() + (s * ds).sum(), [*inputs, h0]))
    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], *grads):
        assert rel_err(a, b) < TOL, name


def test_packed_sequences_equal_separate_runs():
    lengths = [5, 0, 70, 1, 33]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v, g, beta = make_inputs(1, sum(lengths), 2, 8, 4)
    h0 = torch.randn(len(lengths), 2, 8, 4, dtype=torch.float64)
    o, s = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                        use_qk_l2norm=True)
    o_rec, s_rec = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                    cu_seqlens=cu, use_qk_l2norm=True)
    assert rel_err(o, o_rec) < TOL and rel_err(s, s_rec) < TOL
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, s_n = naive_recurrent_gated_delta_rule(*(x[:, a:b] for x in (q, k, v, g, beta)),
                                                    initial_state=h0[n : n + 1], output_final_state=True,
                                                    use_qk_l2norm=True)
        if b > a:
            assert rel_err(o[:, a:b], o_n) < TOL
        assert rel_err(s[n : n + 1], s_n) < TOL


def test_step_continues_a_prefill():
    q, k, v, g, beta = make_inputs(2, 40, 2, 8, 4)
    o_full, s_full = naive_chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o, s = naive_chunk_gated_delta_rule(*(x[:, :30] for x in (q, k, v, g, beta)), output_final_state=True)
    outs = [o]
    for t in range(30, 40):
        o_t, s = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s)
        outs.append(o_t[:, None])
    assert rel_err(torch.cat(outs, 1), o_full) < TOL
    assert rel_err(s, s_full) < TOL


def test_float32_inputs_keep_dtype_and_state_is_float32():
    q, k, v, g, beta = make_inputs(1, 17, 2, 8, 4, dtype=torch.float32)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert torch.isfinite(o).all()


def test_bad_shapes_name_the_values():
    q, k, v, g, beta = make_inputs(1, 5, 2, 8, 4)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\] = \[1, 5, 2, V\], got \[1, 5, 3, 4\]"):
        naive_chunk_gated_delta_rule(q, k, torch.randn(1, 5, 3, 4), g, beta)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[1, 2, 8, 4\]"):
        naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="must start at 0 and end at T=5"):
        naive_chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 3]))
