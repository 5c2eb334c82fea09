"""The segment-parallel state pass of the chunked gated delta rule against the sequential references.

Tolerances: float64 1e-10 (the segments only regroup the same products: the rounding of float64, ~1e-15 measured,
times the sequence's few hundred steps); float32 2e-5 against the float64 recurrence (float32 rounding ~1e-7 grown
over the chunk steps and the combine; the sequential float32 chunked form is held to the same bound beside it).
"""

import pytest
import torch

from jetnas.ops.backend import Backend
from jetnas.ops.delta_rule import chunk_state_pass, naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule
from jetnas.ops.segment_pass import (
    combine_segment_maps,
    segment_count,
    segment_layout,
    segment_parallel_chunk_gated_delta_rule,
)


def _inputs(B, T, H, K, V, dtype, gated=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = -0.1 * torch.rand(B, T, H, generator=gen, dtype=dtype) if gated else None
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype) if gated else None
    S0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return q, k, v, g, beta, S0


@pytest.mark.parametrize("segments", [2, 3, 4, 16])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_matches_recurrence_float64(segments, with_state, gated):
    # T = 150 with 16-token chunks: 10 chunks, not a multiple of any segment count here (the last segment shorter)
    q, k, v, g, beta, S0 = _inputs(2, 150, 3, 8, 12, torch.float64, gated)
    S0 = S0 if with_state else None
    ref_o, ref_S = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True)
    o, S = segment_parallel_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True,
                                                   chunk_size=16, segments=segments)
    assert (o - ref_o).abs().max() < 1e-10
    assert (S - ref_S).abs().max() < 1e-10


@pytest.mark.parametrize("segments", [2, 5])
def test_float32_within_rounding_of_float64(segments):
    q, k, v, g, beta, S0 = _inputs(1, 200, 2, 16, 8, torch.float64, seed=1)
    ref_o, ref_S = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True)
    f32 = [x.float() for x in (q, k, v, g, beta, S0)]
    o, S = segment_parallel_chunk_gated_delta_rule(*f32[:5], initial_state=f32[5], output_final_state=True,
                                                   chunk_size=16, segments=segments, use_qk_l2norm=False)
    seq_o, seq_S = naive_chunk_gated_delta_rule(*f32[:5], initial_state=f32[5], output_final_state=True, chunk_size=16)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    for got in ((o, S), (seq_o, seq_S)):
        assert (got[0].double() - ref_o).abs().max() < 2e-5 * ref_o.abs().max()
        assert (got[1].double() - ref_S).abs().max() < 2e-5 * ref_S.abs().max()


def test_l2norm_scale_and_one_segment():
    q, k, v, g, beta, S0 = _inputs(1, 70, 2, 8, 8, torch.float64, seed=2)
    kw = {"scale": 0.3, "initial_state": S0, "output_final_state": True, "use_qk_l2norm": True}
    ref = naive_chunk_gated_delta_rule(q, 3 * k, v, g, beta, chunk_size=8, **kw)
    for segments in (1, 3, 100):  # 100 > the 9 chunks: one chunk a segment
        got = segment_parallel_chunk_gated_delta_rule(q, 3 * k, v, g, beta, chunk_size=8, segments=segments, **kw)
        assert all((a - b).abs().max() < 1e-10 for a, b in zip(got, ref))


def test_gradients_match_the_sequential_chunked_form():
    q, k, v, g, beta, S0 = _inputs(1, 40, 2, 4, 6, torch.float64, seed=3)
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta, S0)]

    def grads(fn, **kw):
        o, S = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, chunk_size=8, **kw)
        return torch.autograd.grad((o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() + S.sum(), leaves)

    for a, b in zip(grads(segment_parallel_chunk_gated_delta_rule, segments=3), grads(naive_chunk_gated_delta_rule)):
        assert (a - b).abs().max() < 1e-10


def test_state_pass_is_pluggable_and_runs_twice():
    """The generic contract: the given pass runs on the segments twice, V + K wide (the maps), then V wide."""
    calls = []

    def counting(U, W, k_to_end, chunk_decay, S0):
        calls.append((U.shape[0], U.shape[-1]))
        return chunk_state_pass(U, W, k_to_end, chunk_decay, S0)

    q, k, v, g, beta, S0 = _inputs(2, 64, 1, 4, 6, torch.float64, seed=4)
    o, S = segment_parallel_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True,
                                                   chunk_size=8, segments=4, state_pass=counting)
    assert calls == [(2 * 4, 6 + 4), (2 * 4, 6)]
    ref = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True, chunk_size=8)
    assert (o - ref[0]).abs().max() < 1e-10 and (S - ref[1]).abs().max() < 1e-10


def test_segment_layout():
    assert segment_layout(10, 4) == (3, 4)  # 3 + 3 + 3 + 1
    assert segment_layout(9, 4) == (3, 3)  # 4 segments of 3 would leave one empty
    assert segment_layout(128, 8) == (16, 8)
    assert segment_layout(3, 8) == (1, 3)
    assert segment_layout(5, 1) == (5, 1)
    with pytest.raises(ValueError, match="num_chunks=0"):
        segment_layout(0, 2)


def test_segment_count_rule():
    # SmolLM2 hybrid's GDN at batch 1: 9 heads x 1 block of 64 values on 132 SMs, 128 chunks at 8K
    assert segment_count(1, 9, 8192, 64, 8, 132) == 8
    assert segment_count(1, 9, 8192, 64, 0, 132) == 1  # off
    assert segment_count(32, 9, 1024, 64, 8, 132) == 1  # 288 blocks already fill the GPU
    assert segment_count(1, 12, 65536, 256, 16, 132) == 16  # Jet-Nemotron-2B's JetBlock: 48 blocks
    assert segment_count(1, 9, 300, 64, 8, 132) == 2  # 5 chunks: at least 2 a segment
    assert segment_count(1, 9, 100, 64, 8, 132) == 1


def test_combine_segment_maps():
    gen = torch.Generator().manual_seed(5)
    M, N = torch.randn(4, 2, 3, 5, 5, generator=gen), torch.randn(4, 2, 3, 5, 7, generator=gen)
    S0 = torch.randn(2, 3, 5, 7, generator=gen)
    for init in (None, S0):
        S = torch.zeros(2, 3, 5, 7) if init is None else init
        expected = []
        for p in range(4):
            expected.append(S)
            S = M[p] @ S + N[p]
        assert torch.allclose(combine_segment_maps(M, N, init), torch.stack(expected), atol=1e-5)
    with pytest.raises(ValueError, match="initial_state"):
        combine_segment_maps(M, N, S0[0])
    with pytest.raises(ValueError, match="M must be"):
        combine_segment_maps(M[..., :4], N, None)


def test_backend_field():
    assert Backend("triton").segment_state_pass == 0  # off until a GPU measures it
    assert Backend("triton", segment_state_pass=8).segment_state_pass == 8
    with pytest.raises(ValueError, match="segment_state_pass"):
        Backend("triton", segment_state_pass=-1)


def test_rejects_bad_arguments():
    q, k, v, g, beta, _ = _inputs(1, 8, 1, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="segments"):
        segment_parallel_chunk_gated_delta_rule(q, k, v, g, beta, segments=0)
    with pytest.raises(ValueError, match="v must be"):
        segment_parallel_chunk_gated_delta_rule(q, k, v[:, :4], g, beta)
