"""The Triton sliding-window attention forward (`jetnas.ops.triton_attention`) against the reference,
`causal_attention`'s SDPA paths run in float64, and its routing inside `causal_attention`.

On CPU the kernel runs under Triton's interpreter (every program in Python), so the shapes are tiny and the tiles
16 x 16: with T up to 40 a query block's keys span the three phases of its loop (window edge masked, whole blocks
unmasked, diagonal masked) once the window reaches 32 or more, and the ragged ends (T = 37, an offset of 19 cached
keys) fall inside blocks.

Tolerances (norm-relative, `rel_err`):
- float32: 1e-5. Products are exact float32 (the kernel multiplies float32 inputs at full precision, not TF32)
  and both sides sum in float32 or better, in another order: ~2e-7 measured. A wrong key, head or scale moves the
  output at order 1e-1 or more.
- bfloat16: 1e-2 against the float64 reference of the same (bfloat16) inputs. The kernel rounds its output to
  bfloat16 (~2e-3 relative alone, as SDPA's own bfloat16 output shows) and, as FlashAttention does, the
  probabilities to bfloat16 before multiplying them into V (~2e-3 more): ~4e-3 measured.
"""

import dataclasses

import pytest
import torch

from jetnas.ops.attention import causal_attention
from jetnas.ops.backend import Backend
from tests.utils import DEVICE, needs_triton, rel_err

pytestmark = needs_triton

TRITON = Backend("triton", interpret=DEVICE == "cpu")
TILES = {"block_m": 16, "block_n": 16}
F32_TOL = 1e-5
BF16_TOL = 1e-2


def inputs(B, Tq, Tk, H, Hkv, D, dtype=torch.float32):
    q = torch.randn(B, Tq, H, D, device=DEVICE).to(dtype)
    k = torch.randn(B, Tk, Hkv, D, device=DEVICE).to(dtype)
    v = torch.randn(B, Tk, Hkv, D, device=DEVICE).to(dtype)
    return q, k, v


def reference(q, k, v, window):
    """The PyTorch paths (mask or query blocks) in float64."""
    return causal_attention(q.double(), k.double(), v.double(), window=window)


def swa(*args, **kwargs):
    from jetnas.ops.triton_attention import triton_swa_forward

    return triton_swa_forward(*args, **kwargs)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H, Hkv", [(2, 2), (6, 2)], ids=["mha", "gqa3"])
@pytest.mark.parametrize("Tq, Tk", [(37, 37), (21, 40)], ids=["prompt", "after-cache"])
@pytest.mark.parametrize("window", [1, 3, 8, 16, 32, 40, None], ids=lambda w: f"w{w}")
def test_float32_matches_reference(window, Tq, Tk, H, Hkv, D):
    torch.manual_seed(0)
    q, k, v = inputs(2, Tq, Tk, H, Hkv, D)
    got = swa(q, k, v, window, **TILES)
    assert got.shape == (2, Tq, H, D) and got.dtype == torch.float32 and got.is_contiguous()
    assert rel_err(got, reference(q, k, v, window)) < F32_TOL


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Tq, Tk", [(37, 37), (21, 40)], ids=["prompt", "after-cache"])
@pytest.mark.parametrize("window", [3, 32, None], ids=lambda w: f"w{w}")
def test_bfloat16_matches_reference(window, Tq, Tk, D):
    torch.manual_seed(0)
    q, k, v = inputs(2, Tq, Tk, 6, 2, D, torch.bfloat16)
    got = swa(q, k, v, window, **TILES)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, reference(q, k, v, window)) < BF16_TOL


@pytest.mark.parametrize("D", [64, 128])
def test_strided_views_of_a_fused_product(D):
    """q, k, v as the layer passes them: column slices of one `[B, T, (H + 2 Hkv) D]` product (row stride larger
    than H D), and a scale other than the default."""
    torch.manual_seed(0)
    B, T, H, Hkv, W = 2, 35, 6, 2, 8
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D + 16, device=DEVICE)
    q = qkv[..., :H * D].view(B, T, H, D)
    k = qkv[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D)
    v = qkv[..., (H + Hkv) * D:(H + 2 * Hkv) * D].view(B, T, Hkv, D)
    assert not q.is_contiguous() and q.stride(1) == (H + 2 * Hkv) * D + 16
    got = swa(q, k, v, W, scale=0.3, **TILES)
    want = causal_attention(q.double(), k.double(), v.double(), window=W, scale=0.3)
    assert rel_err(got, want) < F32_TOL


def test_default_tiles_and_long_queries():
    """The GPU launch's tiles (128 queries x 64 keys) on a prompt longer than 2W (the old query-block path)."""
    torch.manual_seed(0)
    q, k, v = inputs(1, 150, 150, 3, 1, 64)
    assert rel_err(swa(q, k, v, 20), reference(q, k, v, 20)) < F32_TOL


def test_rejects_what_it_does_not_support():
    q, k, v = inputs(1, 4, 4, 2, 2, 32)
    with pytest.raises(ValueError, match="head dims"):
        swa(q, k, v, 2)
    q, k, v = inputs(1, 5, 4, 3, 2, 64)
    with pytest.raises(ValueError, match="multiple"):
        swa(q, k, v, 2)
    q, k, v = inputs(1, 5, 4, 2, 2, 64)
    with pytest.raises(ValueError, match="more queries"):
        swa(q, k, v, 2)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The calls `causal_attention` makes to the kernel."""
    import jetnas.ops.triton_attention as ta

    calls = []
    original = ta.triton_swa_forward
    monkeypatch.setattr(ta, "triton_swa_forward", lambda *a, **kw: calls.append(a[0].shape) or original(*a, **kw))
    return calls


@pytest.mark.parametrize("Tq, Tk, window", [(40, 40, 8), (12, 40, 8), (12, 40, 32)],
                         ids=["long-prompt", "chunk-after-cache", "chunk-after-cache-within-window"])
def test_causal_attention_routes_windows_without_grad(kernel_calls, Tq, Tk, window):
    torch.manual_seed(0)
    q, k, v = inputs(2, Tq, Tk, 6, 2, 64)
    got = causal_attention(q, k, v, window=window, backend=TRITON)
    assert len(kernel_calls) == 1
    assert rel_err(got, reference(q, k, v, window)) < F32_TOL


def test_causal_attention_keeps_sdpa_elsewhere(kernel_calls):
    torch.manual_seed(0)
    q, k, v = inputs(2, 20, 20, 6, 2, 64)
    causal_attention(q, k, v, backend=TRITON)  # full attention: SDPA (cuDNN) stays faster
    causal_attention(q, k, v, window=4)  # the default backend
    causal_attention(q[:, -1:], k, v, window=4, backend=TRITON)  # a decode step
    causal_attention(q, k, v, window=20, backend=TRITON)  # a prompt within its window: plain causal, SDPA's flash
    causal_attention(q, k, v, window=4, sinks=2, backend=TRITON)
    pad = torch.ones(2, 20, dtype=torch.long, device=DEVICE)
    pad[0, :3] = 0
    causal_attention(q, k, v, window=4, key_padding_mask=pad, backend=TRITON)
    causal_attention(q.double(), k.double(), v.double(), window=4, backend=TRITON)
    causal_attention(*inputs(2, 20, 20, 6, 2, 32), window=4, backend=TRITON)  # head dim 32
    causal_attention(q, k, v, window=4, backend=dataclasses.replace(TRITON, window_kernel=False))  # switched off
    q.requires_grad_(True)
    out = causal_attention(q, k, v, window=4, backend=TRITON)  # training: SDPA's backward
    assert out.requires_grad
    assert kernel_calls == []
    with torch.no_grad():
        causal_attention(q, k, v, window=4, backend=TRITON)
    # an all-ones padding mask is no padding
    causal_attention(q.detach(), k, v, window=4, key_padding_mask=torch.ones_like(pad), backend=TRITON)
    assert len(kernel_calls) == 2
