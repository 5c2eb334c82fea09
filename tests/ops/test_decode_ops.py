"""The decode-step ops (`jetnas.ops.decode`): Triton kernels against the PyTorch references, and the references
against the model-level definitions they stand for.

Triton runs on CUDA, else on CPU under the interpreter. Float32 inputs: both sides accumulate in float32 in a
different order (the kernel's online softmax over tiles and splits), so they agree to ~1e-6 relative; 1e-4 leaves
margin while a wrong column, head or scale would show up at order 1.
"""

import pytest
import torch

from jetnas.layers.base import RecurrentState
from jetnas.ops.attention import causal_attention
from jetnas.ops.backend import Backend
from jetnas.ops.conv import dynamic_conv_step, short_conv_step
from jetnas.ops.decode import (
    conv_step_,
    decode_attention,
    gated_delta_rule_step_,
    gated_delta_rule_step_raw_,
    gla_step_,
    naive_decode_attention,
)
from jetnas.ops.delta_rule import gated_delta_rule_step
from jetnas.ops.gla import gla_step
from tests.utils import DEVICE, needs_triton, rel_err

TOL = 1e-4
# what a layer built with backend="triton" passes to its decode steps; `interpret` lets CPU tensors reach the kernels
TRITON = Backend("triton", interpret=DEVICE == "cpu")


def test_reference_full_cache_equals_causal_attention_last_query():
    torch.manual_seed(0)
    B, H, Hkv, D, T, R = 3, 4, 2, 16, 11, 20
    k, v = torch.randn(B, T, Hkv, D, dtype=torch.float64), torch.randn(B, T, Hkv, D, dtype=torch.float64)
    q = torch.randn(B, 1, H, D, dtype=torch.float64)
    pad = torch.tensor([0, 3, 5])
    mask = (torch.arange(T)[None] >= pad[:, None]).long()
    want = causal_attention(q, k, v, key_padding_mask=mask)[:, 0]
    kc = torch.zeros(B, Hkv, R, D, dtype=torch.float64)
    vc = torch.zeros_like(kc)
    kc[:, :, :T], vc[:, :, :T] = k.transpose(1, 2), v.transpose(1, 2)
    got = naive_decode_attention(q[:, 0], kc, vc, pad, torch.full((B,), T))
    assert rel_err(got, want) < 1e-12


def test_reference_ring_equals_sliding_window():
    torch.manual_seed(0)
    B, H, Hkv, D, T, W = 2, 4, 1, 8, 13, 5
    k, v = torch.randn(B, T, Hkv, D, dtype=torch.float64), torch.randn(B, T, Hkv, D, dtype=torch.float64)
    q = torch.randn(B, 1, H, D, dtype=torch.float64)
    want = causal_attention(q, k, v, window=W)[:, 0]
    ring_k = torch.zeros(B, Hkv, W, D, dtype=torch.float64)
    ring_v = torch.zeros_like(ring_k)
    for c in range(T):  # column c lands in slot c % W, overwriting column c - W
        ring_k[:, :, c % W], ring_v[:, :, c % W] = k[:, c], v[:, c]
    hi = torch.full((B,), T)
    got = naive_decode_attention(q[:, 0], ring_k, ring_v, hi - W, hi)
    assert rel_err(got, want) < 1e-12


@needs_triton
@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_triton_decode_attention_matches_reference(ring, splits):
    torch.manual_seed(1)
    B, H, Hkv, D, R = 3, 6, 2, 32, 150
    q = torch.randn(B, H, D, device=DEVICE)
    kc, vc = torch.randn(B, Hkv, R, D, device=DEVICE), torch.randn(B, Hkv, R, D, device=DEVICE)
    if ring:  # rows past the ring's end, one with a window shorter than the ring
        hi = torch.tensor([170, 300, 151], device=DEVICE, dtype=torch.int32)
        lo = torch.stack([hi[0] - R, hi[1] - 70, hi[2] - R])
    else:  # left padding, a row of one column, a full row
        lo = torch.tensor([0, 7, 149], device=DEVICE, dtype=torch.int32)
        hi = torch.tensor([100, 9, 150], device=DEVICE, dtype=torch.int32)
    want = naive_decode_attention(q, kc, vc, lo, hi)
    got = decode_attention(q, kc, vc, lo, hi, ring=ring, backend=TRITON, num_splits=splits)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("groups", [1, 3])
def test_sdpa_decode_attention_matches_reference(ring, groups):
    # the CPU fast path: same bounds as the Triton test, grouped heads read in place
    torch.manual_seed(1)
    B, Hkv, D, R = 3, 2, 32, 150
    q = torch.randn(B, Hkv * groups, D)
    kc, vc = torch.randn(B, Hkv, R, D), torch.randn(B, Hkv, R, D)
    if ring:
        hi = torch.tensor([170, 300, 151], dtype=torch.int32)
        lo = torch.stack([hi[0] - R, hi[1] - 70, hi[2] - R])
    else:
        lo = torch.tensor([0, 7, 100], dtype=torch.int32)
        hi = torch.tensor([100, 9, 120], dtype=torch.int32)
    want = naive_decode_attention(q, kc, vc, lo, hi)
    got = decode_attention(q, kc, vc, lo, hi, ring=ring, backend="torch")
    assert rel_err(got, want) < TOL


@needs_triton
@pytest.mark.parametrize("gated", [False, True])
def test_triton_delta_rule_step_in_place(gated):
    torch.manual_seed(2)
    B, H, K, V = 2, 3, 24, 40  # not powers of two: masked tiles
    q, k = torch.randn(B, H, K, device=DEVICE), torch.randn(B, H, K, device=DEVICE)
    v = torch.randn(B, H, V, device=DEVICE)
    g = -torch.rand(B, H, device=DEVICE) if gated else None
    beta = torch.rand(B, H, device=DEVICE) if gated else None
    state = torch.randn(B, H, K, V, device=DEVICE)
    want_o, want_state = gated_delta_rule_step(q, k, v, g, beta, state.clone(), use_qk_l2norm=True)
    ptr = state.data_ptr()
    o = gated_delta_rule_step_(q, k, v, g, beta, state, use_qk_l2norm=True, backend=TRITON)
    assert state.data_ptr() == ptr
    assert rel_err(o, want_o) < TOL and rel_err(state, want_state) < TOL


@needs_triton
@pytest.mark.parametrize("decay", [True, False], ids=["gdn/jet", "deltanet"])
def test_triton_delta_rule_step_makes_its_gates(decay):
    torch.manual_seed(9)
    B, H, K, V = 2, 3, 24, 40
    q, k = torch.randn(B, H, K, device=DEVICE), torch.randn(B, H, K, device=DEVICE)
    v = torch.randn(B, H, V, device=DEVICE)
    a, b = 3 * torch.randn(B, H, device=DEVICE), torch.randn(B, H, device=DEVICE)
    a[0, 0] = 25.0  # past softplus's linear threshold
    A_log, dt_bias = (torch.rand(H, device=DEVICE) * 2, torch.randn(H, device=DEVICE)) if decay else (None, None)
    state = torch.randn(B, H, K, V, device=DEVICE)
    g = -A_log.exp() * torch.nn.functional.softplus(a + dt_bias) if decay else None
    want_o, want_state = gated_delta_rule_step(q, k, v, g, b.sigmoid(), state.clone(), use_qk_l2norm=True)
    ptr = state.data_ptr()
    o = gated_delta_rule_step_raw_(q, k, v, a if decay else None, b, A_log, dt_bias, state, backend=TRITON)
    assert state.data_ptr() == ptr
    assert rel_err(o, want_o) < TOL and rel_err(state, want_state) < TOL

    # the PyTorch path of the same op
    state = torch.randn(B, H, K, V, device=DEVICE)
    want_o, want_state = gated_delta_rule_step(q, k, v, g, b.sigmoid(), state.clone(), use_qk_l2norm=True)
    o = gated_delta_rule_step_raw_(q, k, v, a if decay else None, b, A_log, dt_bias, state, backend="torch")
    assert rel_err(o, want_o) < 1e-6 and rel_err(state, want_state) < 1e-6


def test_torch_delta_rule_step_in_place():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 4)
    state = torch.randn(2, 2, 8, 4)
    want_o, want_state = gated_delta_rule_step(q, k, v, None, None, state.clone(), use_qk_l2norm=True)
    o = gated_delta_rule_step_(q, k, v, None, None, state)
    assert torch.equal(o, want_o) and torch.equal(state, want_state)
    with pytest.raises(ValueError, match="float32"):
        gated_delta_rule_step_(q, k, v, None, None, state.double())


@needs_triton
@pytest.mark.parametrize("per_channel", [True, False], ids=["gla", "per-head (retnet, mamba2)"])
def test_gla_step_kernel_in_place(per_channel):
    torch.manual_seed(4)
    B, H, K, V = 3, 2, 24, 40  # K and V not powers of two: masked lanes
    q, k = torch.randn(B, H, K, device=DEVICE), torch.randn(B, H, K, device=DEVICE)
    v = torch.randn(B, H, V, device=DEVICE)
    g = torch.nn.functional.logsigmoid(torch.randn(B, H, K, device=DEVICE) if per_channel
                                       else torch.randn(B, H, device=DEVICE))
    state = torch.randn(B, H, K, V, device=DEVICE)
    want_o, want_state = gla_step(q, k, v, g, state.clone(), scale=0.3)
    ptr = state.data_ptr()
    o = gla_step_(q, k, v, g, state, scale=0.3, backend=TRITON)
    assert state.data_ptr() == ptr
    assert rel_err(o, want_o) < TOL and rel_err(state, want_state) < TOL


def test_torch_gla_step_in_place():
    torch.manual_seed(5)
    q, k, v, g = torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 4), -torch.rand(2, 2)
    state = torch.randn(2, 2, 8, 4)
    want_o, want_state = gla_step(q, k, v, g, state.clone())
    o = gla_step_(q, k, v, g, state)
    assert torch.equal(o, want_o) and torch.equal(state, want_state)
    with pytest.raises(ValueError, match="float32"):
        gla_step_(q, k, v, g, state.double())


@pytest.mark.parametrize("layer_type", ["jet", "gdn", "deltanet", "gla", "retnet", "mamba2"])
def test_linear_blocks_decode_into_their_cached_state(layer_type):
    # one read and one write of the recurrent state per step: the cached tensor itself is updated, not replaced
    from jetnas.layers import build_layer

    torch.manual_seed(6)
    layer = build_layer(layer_type, 32, **({"head_dim": 8, "state_size": 8} if layer_type == "mamba2"
                                           else {"num_heads": 2}))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        _, state = layer(x[:, :4], use_cache=True)
        before, convs = state.recurrent, dict(state.conv)
        expected = layer(x[:, 4:], RecurrentState(before.clone(), {k: c.clone() for k, c in convs.items()}, 4))[0]
        out, state = layer(x[:, 4:], state)
    assert state.recurrent is before
    assert all(state.conv[k] is c for k, c in convs.items())  # the conv windows shift in place too
    assert torch.allclose(out, expected, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("kind", ["static", "static+bias", "per-token"])
@pytest.mark.parametrize("W", [4, 3, 2])
@pytest.mark.parametrize("layout", ["contiguous", "time-major"])
def test_conv_step_kernel_in_place(kind, W, layout):
    torch.manual_seed(7)
    B, D = 3, 300  # D not a multiple of the channel block: masked lanes
    x = torch.randn(B, D, device=DEVICE)
    kernels = torch.randn(D, W, device=DEVICE) if kind != "per-token" else torch.randn(B, D, W, device=DEVICE)
    bias = torch.randn(D, device=DEVICE) if kind == "static+bias" else None
    # the prefill's final conv state is a transposed view of its inputs [B, W-1, D]: the cache keeps those strides
    state = (torch.randn(B, D, W - 1, device=DEVICE) if layout == "contiguous"
             else torch.randn(B, W - 1, D, device=DEVICE).transpose(1, 2))
    want_state = state.clone()
    want = conv_step_(x, kernels, bias, want_state, "silu", backend="torch")
    ptr = state.data_ptr()
    got = conv_step_(x, kernels, bias, state, "silu", backend=TRITON)
    assert state.data_ptr() == ptr
    assert rel_err(got, want) < TOL and torch.equal(state, want_state)


def test_torch_conv_step_in_place_equals_the_reference_steps():
    torch.manual_seed(8)
    x, w, bias, state = torch.randn(2, 6), torch.randn(6, 4), torch.randn(6), torch.randn(2, 6, 3)
    want_y, want_state = short_conv_step(x, w, bias, state.clone(), "silu")
    got_state = state.clone()
    assert torch.equal(conv_step_(x, w, bias, got_state, "silu"), want_y) and torch.equal(got_state, want_state)
    kernels = torch.randn(2, 6, 4)
    want_y, want_state = dynamic_conv_step(x, kernels, state.clone(), "silu")
    got_state = state.clone()
    assert torch.equal(conv_step_(x, kernels, None, got_state, "silu"), want_y) and torch.equal(got_state, want_state)
    with pytest.raises(ValueError, match="state must be"):
        conv_step_(x, w, None, torch.randn(2, 6, 2))


@needs_triton
def test_dispatch_follows_the_backend(monkeypatch):
    # the kernels run exactly when the backend says so (no environment variable decides it): "triton" and a tensor
    # it takes; "torch", or a CPU tensor without `interpret`, keeps the PyTorch path
    import jetnas.ops.triton_decode as td

    calls = []
    for name in ("triton_decode_attention", "triton_gla_step_", "triton_conv_step_"):
        monkeypatch.setattr(td, name, lambda *a, _n=name, **k: calls.append(_n))
    q, kc = torch.randn(1, 2, 16, device=DEVICE), torch.randn(1, 2, 5, 16, device=DEVICE)
    lo, hi = torch.zeros(1, dtype=torch.int32, device=DEVICE), torch.full((1,), 5, dtype=torch.int32, device=DEVICE)
    state, g = torch.zeros(1, 2, 16, 16, device=DEVICE), -torch.rand(1, 2, device=DEVICE)
    x, w = torch.randn(1, 16, device=DEVICE), torch.randn(16, 4, device=DEVICE)
    conv = torch.zeros(1, 16, 3, device=DEVICE)
    untaken = ["torch", Backend("torch", interpret=True)] + ([Backend("triton")] if DEVICE == "cpu" else [])
    for backend in [*untaken, TRITON]:
        decode_attention(q, kc, kc, lo, hi, backend=backend)
        gla_step_(q, q, q, g, state, backend=backend)
        conv_step_(x, w, None, conv, backend=backend)
    assert calls == ["triton_decode_attention", "triton_gla_step_", "triton_conv_step_"]
