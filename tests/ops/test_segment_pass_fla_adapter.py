"""The fla adapter's segment-parallel path (`jetnas.ops._fla._segment_parallel`) on CPU, against a stand-in for the
fla 0.6 functions it calls: PyTorch versions of their contracts as read in the fla 0.6.0 wheel (token-major
`[B, T, H, .]` tensors, log2-space decays cumulated per 64-token chunk, varlen state passes numbered by
`chunk_offsets`, the pre-scan's `[N | M]` summaries). What this checks is the adapter's own arithmetic (segment
boundaries, views of the flattened batch, the combine, the output's reading of the states); the real kernels are
checked against fla's plain op on a GPU by benchmarks/gdn_segment_pass_bench.py. float64 inputs, but the states
between passes are float32 as in fla (its final states, the pre-scan's summaries, the combine): 1e-5 relative covers
float32 rounding of the segments' initial states (~1e-7) grown over a few chunks; an index slip is an O(1) error.
"""

import sys
import types

import pytest
import torch

from jetnas.ops import _fla
from jetnas.ops.delta_rule import naive_chunk_gated_delta_rule

C = 64
RCP_LN2 = 1.4426950216


def _padded(x, T):
    NC = -(-T // C)
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, NC * C - T)), NC


def chunk_local_cumsum(g, chunk_size, scale=None, **_):
    B, T, H = g.shape
    gp, NC = _padded(g, T)
    return (gp.view(B, NC, C, H).cumsum(2) * scale).view(B, NC * C, H)[:, :T].contiguous()  # as fla allocates


def chunk_gated_delta_rule_fwd_intra(k, v, g, beta, chunk_size, **_):
    B, T, H, _ = k.shape
    (kp, NC), (vp, _), (gp, _), (bp, _) = (_padded(x, T) for x in (k, v, g, beta))
    kc, vc = kp.view(B, NC, C, H, -1).transpose(2, 3), vp.view(B, NC, C, H, -1).transpose(2, 3)
    gc, bc = gp.view(B, NC, C, H).transpose(2, 3), bp.view(B, NC, C, H).transpose(2, 3)  # [B, NC, H, C]
    lower = torch.ones(C, C, dtype=torch.bool).tril(-1)
    A = (bc[..., None] * (kc @ kc.transpose(-1, -2)) * torch.exp2(gc[..., :, None] - gc[..., None, :])) * lower
    tri = torch.eye(C, dtype=k.dtype) + A
    u = torch.linalg.solve_triangular(tri, bc[..., None] * vc, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(tri, (bc * torch.exp2(gc))[..., None] * kc, upper=False, unitriangular=True)

    def back(x):  # [B, NC, H, C, .] -> [B, T, H, .], contiguous as fla allocates
        return x.transpose(2, 3).reshape(B, NC * C, H, -1)[:, :T].contiguous()

    return back(w), back(u), A


def chunk_gated_delta_rule_fwd_h(k, w, u, g, initial_state=None, output_final_state=False, chunk_size=64,
                                 save_new_value=True, cu_seqlens=None, chunk_indices=None, chunk_offsets=None, **_):
    assert k.shape[0] == 1 and cu_seqlens is not None and chunk_offsets is not None  # the adapter's varlen calls
    _, _, H, K = k.shape
    V = u.shape[-1]
    bounds, offsets = cu_seqlens.tolist(), chunk_offsets.tolist()
    N = len(bounds) - 1
    assert len(chunk_indices) == offsets[-1] and torch.equal(chunk_indices[:, 0].bincount(minlength=N),
                                                             torch.tensor(offsets).diff())
    h = k.new_full((1, offsets[-1], H, K, V), float("nan"))
    v_new = torch.full_like(u, float("nan"))
    finals = []
    for n in range(N):
        S = k.new_zeros(H, K, V) if initial_state is None else initial_state[n].to(k.dtype)  # fla: float32 states
        for i, s in enumerate(range(bounds[n], bounds[n + 1], C)):
            e = min(s + C, bounds[n + 1])
            h[0, offsets[n] + i] = S
            vn = u[0, s:e].transpose(0, 1) - w[0, s:e].transpose(0, 1) @ S  # [H, c, V]
            v_new[0, s:e] = vn.transpose(0, 1)
            g_last = g[0, e - 1]
            kt = (k[0, s:e] * torch.exp2(g_last - g[0, s:e])[..., None]).transpose(0, 1)  # [H, c, K]
            S = torch.exp2(g_last)[:, None, None] * S + kt.transpose(-1, -2) @ vn
        finals.append(S)
    return h, (v_new if save_new_value else None), (torch.stack(finals).float() if output_final_state else None)


def chunk_cp_fwd_h(k, w, u, hm, g, cu_seqlens, chunk_size, multi_seqs):
    N, H, K, VK = hm.shape
    V = VK - K
    h0 = torch.zeros(N, H, K, VK, dtype=hm.dtype)
    h0[..., V:] = torch.eye(K, dtype=hm.dtype)
    offsets = torch.nn.functional.pad((cu_seqlens.diff() + C - 1).div(C, rounding_mode="floor").cumsum(0), (1, 0))
    idx = torch.zeros(int(offsets[-1]), 2, dtype=torch.long)
    idx[:, 0] = torch.repeat_interleave(torch.arange(N), offsets.diff())
    _, _, out = chunk_gated_delta_rule_fwd_h(k, w, torch.cat([u, u.new_zeros(*u.shape[:-1], K)], -1), g, h0, True,
                                             cu_seqlens=cu_seqlens, chunk_indices=idx, chunk_offsets=offsets)
    hm.copy_(out)


def chunk_fwd_o(q, k, v, h, g, scale, chunk_size, **_):
    B, T, H, K = q.shape
    (qp, NC), (kp, _), (vp, _), (gp, _) = (_padded(x, T) for x in (q, k, v, g))
    qc, kc = qp.view(B, NC, C, H, K).transpose(2, 3), kp.view(B, NC, C, H, K).transpose(2, 3)
    vc, gc = vp.view(B, NC, C, H, -1).transpose(2, 3), gp.view(B, NC, C, H).transpose(2, 3)
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    scores = (qc @ kc.transpose(-1, -2)) * torch.exp2(gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, 0)
    o = scale * ((qc * torch.exp2(gc)[..., None]) @ h + scores @ vc)  # h [B, NC, H, K, V]
    return o.transpose(2, 3).reshape(B, NC * C, H, -1)[:, :T]


def l2norm_fwd(x):
    return torch.nn.functional.normalize(x, dim=-1), None


@pytest.fixture
def fake_fla(monkeypatch):
    mods = {
        "fla": {}, "fla.modules": {}, "fla.modules.norm": {}, "fla.modules.norm.l2norm": {"l2norm_fwd": l2norm_fwd},
        "fla.ops": {}, "fla.ops.common": {},
        "fla.ops.common.chunk_delta_h": {"chunk_gated_delta_rule_fwd_h": chunk_gated_delta_rule_fwd_h},
        "fla.ops.common.chunk_o": {"chunk_fwd_o": chunk_fwd_o},
        "fla.ops.gated_delta_rule": {},
        "fla.ops.gated_delta_rule.chunk_fwd": {"chunk_gated_delta_rule_fwd_intra": chunk_gated_delta_rule_fwd_intra},
        "fla.ops.utils": {"chunk_local_cumsum": chunk_local_cumsum},
        "fla.ops.utils.constant": {"RCP_LN2": RCP_LN2},
        "fla.ops.cp": {}, "fla.ops.cp.chunk_fwd": {"chunk_cp_fwd_h": chunk_cp_fwd_h},
    }
    for name, attrs in mods.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))


@pytest.mark.parametrize("summary", ["prescan", "state_pass"])
@pytest.mark.parametrize(("B", "T", "segments", "with_state"), [(1, 512, 4, False), (2, 300, 3, True),
                                                                (1, 200, 8, True), (3, 64 * 5, 2, False)])
def test_adapter_segments_match_the_sequential_reference(fake_fla, summary, B, T, segments, with_state):
    gen = torch.Generator().manual_seed(T + B)
    H, K, V = 2, 8, 12
    q, k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), torch.randn(B, T, H, K, generator=gen,
                                                                                  dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = -0.05 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    S0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) if with_state else None
    ref_o, ref_S = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True,
                                                use_qk_l2norm=True, chunk_size=C)
    _fla._SEGMENT_INDEX.clear()
    o, S = _fla._segment_parallel(q, k, v, g, beta, None, S0, True, True, segments, summary)
    assert (o - ref_o).abs().max() < 1e-5 * ref_o.abs().max()
    assert (S.double() - ref_S).abs().max() < 1e-5 * ref_S.abs().max()


def test_segment_index_numbers_chunks_as_the_equal_length_layout():
    # 2 sequences of 300 tokens (5 chunks, the last partial) in 3 segments: 2 + 2 + 1 chunks each
    cu, idx, offsets, P = _fla._segment_index(2, 300, 3, C, torch.device("cpu"))
    assert P == 3
    assert cu.tolist() == [0, 128, 256, 300, 428, 556, 600]
    assert offsets.tolist() == [0, 2, 4, 5, 7, 9, 10]
    assert idx.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [3, 0], [3, 1], [4, 0], [4, 1], [5, 0]]
