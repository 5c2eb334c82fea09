"""Attention against an explicit softmax in float64 (tolerance 1e-10: same math, different summation order)."""

import math

import pytest
import torch

from jetnas.ops.attention import apply_rotary, attention_mask, causal_attention, rotary_cos_sin
from tests.utils import rel_err


def reference(q, k, v, window=None, key_padding_mask=None):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    out = torch.zeros(B, Tq, H, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for i in range(Tq):
            pos = i + Tk - Tq
            keys = [j for j in range(Tk) if j <= pos and (window is None or j > pos - window)
                    and (key_padding_mask is None or key_padding_mask[b, j])]
            for h in range(H):
                s = torch.stack([q[b, i, h] @ k[b, j, h] for j in keys]) / math.sqrt(D)
                out[b, i, h] = torch.softmax(s, 0) @ v[b, keys, h]
    return out


@pytest.mark.parametrize("Tq,Tk", [(9, 9), (1, 9), (4, 9)], ids=["prefill", "decode", "chunk"])
@pytest.mark.parametrize("window", [None, 3], ids=["full", "swa3"])
def test_matches_explicit_softmax(Tq, Tk, window):
    q = torch.randn(2, Tq, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, Tk, 2, 8, dtype=torch.float64), torch.randn(2, Tk, 2, 8, dtype=torch.float64)
    assert rel_err(causal_attention(q, k, v, window=window), reference(q, k, v, window)) < 1e-10


def test_padding_mask_and_fully_masked_rows():
    q, k, v = (torch.randn(2, 6, 2, 4, dtype=torch.float64) for _ in range(3))
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = causal_attention(q, k, v, key_padding_mask=pad)
    assert torch.isfinite(out).all()  # the padded queries see nothing; their rows must not be NaN
    ref = reference(q[:, 2:], k, v, key_padding_mask=pad)
    assert rel_err(out[:, 2:], ref) < 1e-10


def test_rotary_is_relative():
    # <rot(q, m), rot(k, n)> depends on m - n only
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def dot(m, n):
        cq, sq = rotary_cos_sin(torch.tensor([[m]]), 16, 10000.0, torch.float64)
        ck, sk = rotary_cos_sin(torch.tensor([[n]]), 16, 10000.0, torch.float64)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    # the angle tables are float32 like the HF models' (so converted teachers match exactly): ~1e-6 at position 100
    assert abs(dot(5, 2) - dot(103, 100)) < 1e-5
    assert abs(dot(5, 2) - dot(2, 5)) > 1e-6


def test_bad_heads_named():
    with pytest.raises(ValueError, match="H=3 must be a multiple of key/value heads Hkv=2"):
        causal_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))


@pytest.mark.parametrize("Tq, Tk, window", [(5, 12, None), (12, 12, 3), (40, 40, 4), (37, 50, 5), (9, 50, 4)])
def test_fast_paths_equal_the_explicit_mask(Tq, Tk, window):
    # chunked prefill (lower-right causal bias, no mask) and long windowed prompts (query blocks against their key
    # band) against SDPA with the full explicit mask, in float64
    torch.manual_seed(0)
    q = torch.randn(2, Tq, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, Tk, 2, 8, dtype=torch.float64), torch.randn(2, Tk, 2, 8, dtype=torch.float64)
    mask = attention_mask(Tq, Tk, window, None, force=True)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(causal_attention(q, k, v, window=window), want, atol=1e-12)
