"""Chunked GLA (per-channel and per-head decay) against the token-by-token recurrence, in float64 (tolerance as in
test_delta_rule.py: exact algebra, 1e-10 relative)."""

import pytest
import torch

from jetnas.ops.gla import gla_step, naive_chunk_gla, naive_recurrent_gla
from tests.utils import rel_err

TOL = 1e-10


def make_inputs(B, T, H, K, V, per_channel, strong_decay=False, requires_grad=False):
    f64 = torch.float64
    q, k, v = torch.randn(B, T, H, K, dtype=f64), torch.randn(B, T, H, K, dtype=f64), torch.randn(B, T, H, V, dtype=f64)
    shape = (B, T, H, K) if per_channel else (B, T, H)
    g = torch.nn.functional.logsigmoid(torch.randn(shape, dtype=f64)) * (40 if strong_decay else 1)
    inputs = [q, k, v, g]
    if requires_grad:
        for t in inputs:
            t.requires_grad_(True)
    return inputs


@pytest.mark.parametrize("T", [1, 15, 16, 63, 100], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("per_channel", [True, False], ids=["gla", "simple"])
def test_chunk_equals_recurrent(T, per_channel):
    q, k, v, g = make_inputs(2, T, 3, 8, 5, per_channel)
    h0 = torch.randn(2, 3, 8, 5, dtype=torch.float64)
    o_ref, s_ref = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o, s = naive_chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL


@pytest.mark.parametrize("per_channel", [True, False], ids=["gla", "simple"])
def test_strong_decay_stays_finite_and_exact(per_channel):
    # cumulative log-decay reaches about -40 * 64: a ratio of cumulative decays would overflow float64
    q, k, v, g = make_inputs(1, 64, 2, 4, 4, per_channel, strong_decay=True)
    o_ref, _ = naive_recurrent_gla(q, k, v, g)
    o, _ = naive_chunk_gla(q, k, v, g)
    assert torch.isfinite(o).all()
    assert rel_err(o, o_ref) < TOL


@pytest.mark.parametrize("per_channel", [True, False], ids=["gla", "simple"])
def test_gradients_agree(per_channel):
    inputs = make_inputs(1, 37, 2, 4, 3, per_channel, requires_grad=True)
    h0 = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (naive_recurrent_gla, naive_chunk_gla):
        o, s = fn(*inputs, initial_state=h0, output_final_state=True)
        grads.append(torch.autograd.grad(o.pow(2).sum() + s.sum(), [*inputs, h0]))
    for name, a, b in zip(["q", "k", "v", "g", "h0"], *grads):
        assert rel_err(a, b) < TOL, name


def test_packed_and_step():
    cu = torch.tensor([0, 9, 9, 40])
    q, k, v, g = make_inputs(1, 40, 2, 4, 3, True)
    o, s = naive_chunk_gla(q, k, v, g, output_final_state=True, cu_seqlens=cu)
    o_ref, s_ref = naive_recurrent_gla(q, k, v, g, output_final_state=True, cu_seqlens=cu)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL
    # one step after a prefill of the third sequence's first 30 tokens gives its last output and final state
    _, s_prefix = naive_chunk_gla(*(x[:, 9:39] for x in (q, k, v, g)), output_final_state=True)
    o_step, s_step = gla_step(q[:, -1], k[:, -1], v[:, -1], g[:, -1], s_prefix)
    assert rel_err(o_step, o[:, -1]) < TOL and rel_err(s_step, s[2:3]) < TOL
