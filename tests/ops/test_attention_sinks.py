"""Sliding-window attention with attention sinks against a brute-force softmax over explicitly listed keys.

Tolerance 1e-10 relative in float64 (values and gradients): the same math in a different summation order.
"""

import math

import pytest
import torch

from jetnas.ops.attention import attention_mask, causal_attention
from tests.utils import rel_err


def sink_reference(q, k, v, window, sinks, key_padding_mask=None):
    """Query i (absolute position t = i + Tk - Tq) sees keys max(0, t - window + 1)..t and the first `sinks` keys
    (the first `sinks` real keys of its row with padding), never a later or padded key; listed one by one."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    rows = []
    for b in range(B):
        real = [j for j in range(Tk) if key_padding_mask is None or key_padding_mask[b, j]]
        sink_keys = set(real[:sinks])
        per_query = []
        for i in range(Tq):
            t = i + Tk - Tq
            keys = [j for j in real if j <= t and (j >= t - window + 1 or j in sink_keys)]
            heads = []
            for h in range(H):
                s = torch.stack([q[b, i, h] @ k[b, j, h] for j in keys]) / math.sqrt(D)
                heads.append(torch.softmax(s, 0) @ v[b, keys, h])
            per_query.append(torch.stack(heads))
        rows.append(torch.stack(per_query))
    return torch.stack(rows)


def _inputs(B, Tq, Tk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, 4, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, Tk, 2, 8, dtype=torch.float64, generator=g) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (23, 23), (1, 23), (7, 23)], ids=["one", "prefill", "decode", "chunk"])
@pytest.mark.parametrize("window,sinks", [(3, 1), (5, 4), (4, 30), (40, 2)],
                         ids=["w3s1", "w5s4", "sinks-beyond-T", "window-beyond-T"])
def test_sinks_match_brute_force_values_and_gradients(Tq, Tk, window, sinks):
    q, k, v = (x.requires_grad_() for x in _inputs(2, Tq, Tk))
    out = causal_attention(q, k, v, window=window, sinks=sinks)
    ref = sink_reference(q, k, v, window, sinks)
    assert rel_err(out, ref) < 1e-10
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        # atol for the one-key case: q's true gradient is 0 there (a softmax over one key), ours ~1e-16
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sinks_are_the_first_real_keys_of_a_right_padded_row():
    q, k, v = _inputs(2, 17, 17, seed=1)
    pad = torch.ones(2, 17, dtype=torch.long)
    pad[0, 12:] = 0  # right padding, as the evaluation's batches are
    out = causal_attention(q, k, v, window=3, key_padding_mask=pad, sinks=2)
    ref = sink_reference(q, k, v, 3, 2, pad)
    assert rel_err(out[1], ref[1]) < 1e-10 and rel_err(out[0, :12], ref[0, :12]) < 1e-10
    # left padding: the sinks move with the first real token
    left = torch.ones(2, 17, dtype=torch.long)
    left[0, :5] = 0
    out = causal_attention(q, k, v, window=3, key_padding_mask=left, sinks=2)
    ref = sink_reference(q[:, 5:], k, v, 3, 2, left)
    assert rel_err(out[:, 5:], ref) < 1e-10


def test_sinks_change_only_queries_beyond_the_window():
    q, k, v = _inputs(1, 30, 30, seed=2)
    plain = causal_attention(q, k, v, window=6)
    with_sinks = causal_attention(q, k, v, window=6, sinks=3)
    # queries 0..8 see keys 0..2 through their window already (t - 6 + 1 <= 3 - 1 ... up to t = 8 for key 2)
    assert torch.equal(with_sinks[:, :6], plain[:, :6])
    assert (with_sinks[:, 9:] - plain[:, 9:]).abs().amax(dim=(2, 3)).min() > 1e-6


def test_no_sinks_keeps_the_plain_window_and_full_attention_ignores_them():
    q, k, v = _inputs(1, 40, 40, seed=3)
    # sinks=0 is the existing path (the blockwise one here: 40 > 2 * 6) bit for bit
    assert torch.equal(causal_attention(q, k, v, window=6, sinks=0), causal_attention(q, k, v, window=6))
    assert torch.equal(causal_attention(q, k, v, sinks=4), causal_attention(q, k, v))
    mask = attention_mask(40, 40, 6, sinks=4)[0, 0]
    assert mask[39, :4].all() and not mask[39, 4:34].any() and mask[39, 34:].all() and not mask[2, 3:].any()


@pytest.mark.parametrize("sinks", [-1, 1.5, True], ids=["negative", "float", "bool"])
def test_bad_sinks_named(sinks):
    q, k, v = _inputs(1, 4, 4)
    with pytest.raises(ValueError, match=f"sinks must be an integer >= 0, got {sinks!r}"):
        causal_attention(q, k, v, window=2, sinks=sinks)
