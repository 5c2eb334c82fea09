"""The RWKV-7 block against an independent transcription of RWKV-7's time mixing (the paper's `V x K` state, its
softplus form of the decay, plain loops), in float64: outputs and every gradient agree to rounding (1e-10 relative).
Then its decode step in place, its cache accounting, its inheritance rule and its place in block selection."""

import math
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from jetnas.layers import Attention, LINEAR_LAYERS, RWKV7, build_layer
from jetnas.layers.base import RecurrentState
from jetnas.ops import triton_rwkv7
from jetnas.ops.backend import Backend
from tests.utils import rel_err

TOL = 1e-10
SMALL = dict(num_heads=2, head_k_dim=4, head_v_dim=6, decay_low_rank_dim=5, a_low_rank_dim=3, gate_low_rank_dim=4)


def reference_time_mixing(layer: RWKV7, x: torch.Tensor) -> torch.Tensor:
    """RWKV-7 time mixing as its paper and reference code write it, with the block's parameters: the decay as
    `exp(-exp(w))`, `w = -softplus(-(w0 + lora)) - 0.5`; state `S [V, K]`, `S = S (diag(decay) - kk^T (kk * a))
    + v^T k`, `y = S r`; `ln_x` over each head, then the bonus `(r . k . r_k) v`, then the gate."""
    B, T, D = x.shape
    H, K, V = layer.num_heads, layer.head_k_dim, layer.head_v_dim
    xx = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1) - x
    xr, xw, xk, xv, xa, xg = (x + xx * getattr(layer, n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
    r, k, v = layer.r_proj(xr), layer.k_proj(xk), layer.v_proj(xv)
    w1, w2 = layer.w_lora[0].weight.T, layer.w_lora[2].weight.T
    w = -F.softplus(-(layer.w0 + torch.tanh(xw @ w1) @ w2)) - 0.5
    a = torch.sigmoid(layer.a0 + (xa @ layer.a_lora[0].weight.T) @ layer.a_lora[1].weight.T)
    g = torch.sigmoid(xg @ layer.g_lora[0].weight.T) @ layer.g_lora[2].weight.T
    kk = k * layer.k_k
    kk = F.normalize(kk.view(B, T, H, K), dim=-1).view(B, T, H * K)
    k = k * (1 + (a - 1) * layer.k_a)
    decay = torch.exp(-torch.exp(w))
    y = torch.zeros(B, T, H, V, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            heads = slice(h * K, (h + 1) * K)
            S = torch.zeros(V, K, dtype=x.dtype)
            for t in range(T):
                kk_t, a_t = kk[b, t, heads], a[b, t, heads]
                S = S @ (torch.diag(decay[b, t, heads]) - torch.outer(kk_t, kk_t * a_t))
                S = S + torch.outer(v[b, t, h * V:(h + 1) * V], k[b, t, heads])
                y[b, t, h] = S @ r[b, t, heads]
    y = F.group_norm(y.reshape(B * T, H * V), H, layer.g_norm.weight, layer.g_norm.bias, eps=V * 1e-5)
    y = y.view(B, T, H, V)
    bonus = (r.view(B, T, H, K) * k.view(B, T, H, K) * layer.r_k).sum(-1, keepdim=True) * v.view(B, T, H, V)
    return layer.o_proj((y + bonus).view(B, T, H * V) * g)


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = RWKV7(16, **{**SMALL, **kwargs}).double()
    with torch.no_grad():  # parameters that start at constants or zero would hide a wrong index or transpose
        for name, p in layer.named_parameters():
            if name in ("k_a", "r_k", "g_norm.weight", "g_norm.bias") or name.startswith("x_"):
                p.add_(0.3 * torch.randn_like(p))
    return layer


def test_layer_equals_rwkv7_time_mixing():
    layer = make()
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    assert rel_err(layer(x)[0], reference_time_mixing(layer, x)) < TOL


def test_layer_gradients_equal_the_reference():
    # every parameter and the input; the block runs the chunked form (16-token chunks, so 21 tokens cross one)
    layer = make(1)
    x = torch.randn(2, 21, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 21, 16, dtype=torch.float64)
    params = [p for _, p in layer.named_parameters()]
    got = torch.autograd.grad((layer(x)[0] * dy).sum(), [x, *params])
    want = torch.autograd.grad((reference_time_mixing(layer, x) * dy).sum(), [x, *params])
    for name, a, b in zip(["input", *(n for n, _ in layer.named_parameters())], got, want):
        assert rel_err(a, b) < TOL, name


def test_decay_and_learning_rate_start_as_rwkv7s():
    layer = RWKV7(256, num_heads=4, head_k_dim=64, head_v_dim=64)
    decay = torch.exp(-math.exp(-0.5) * torch.sigmoid(layer.w0))
    # channels from slow (about 1 - 2e-3 per token) to fast (about 0.6) decay, per head a zigzag around the trend
    assert decay.max() > 0.995 and decay.min() < 0.7
    assert torch.allclose(layer.k_a, torch.full_like(layer.k_a, 1.02)) and (layer.r_k == -0.04).all()
    assert layer.decay_low_rank_dim == 32 and layer.gate_low_rank_dim == 64  # round(40 / 32), round(80 / 32) (to even)
    assert "v_lora" not in dict(layer.named_modules())  # no cross-layer value residual (module docstring)


def test_decode_updates_the_cached_state_in_place():
    torch.manual_seed(2)
    layer = RWKV7(16, **SMALL)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        _, state = layer(x[:, :5], use_cache=True)
        before = state.recurrent
        # the same values in a non-contiguous tensor cannot be updated in place: the out-of-place reference step
        strided = before.transpose(-1, -2).contiguous().transpose(-1, -2)
        expected, _ = layer(x[:, 5:], RecurrentState(strided, {k: c.clone() for k, c in state.conv.items()}, 5))
        out, state = layer(x[:, 5:], state)
    assert state.recurrent is before  # one read and one write of the memory per step
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(state.conv["shift"], x[:, 5:].transpose(1, 2))  # the token shift keeps the last token


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="no CUDA and TRITON_INTERPRET is not 1")
def test_decode_with_the_step_kernel_equals_the_reference_step():
    # the engine's path on a GPU: the block's decode step through the Triton kernel (here under the interpreter);
    # float32, the kernel sums in another order: 1e-5 relative
    torch.manual_seed(3)
    layer = RWKV7(16, **SMALL)
    x = torch.randn(2, 9, 16)
    outs = {}
    kernel = triton_rwkv7.triton_rwkv7_step_
    with torch.no_grad(), mock.patch.object(triton_rwkv7, "triton_rwkv7_step_", wraps=kernel) as calls:
        for name, backend in (("torch", "torch"), ("triton", Backend("triton", interpret=True))):
            layer.backend = backend
            out, state = layer(x[:, :6], use_cache=True)
            steps = [layer(x[:, t : t + 1], state)[0] for t in range(6, 9)]
            outs[name] = (torch.cat(steps, 1), state.recurrent)
    assert calls.call_count == 3  # the three triton decode steps took the kernel
    assert rel_err(outs["triton"][0], outs["torch"][0]) < 1e-5
    assert rel_err(outs["triton"][1], outs["torch"][1]) < 1e-5


def test_cache_bytes_at_jet_nemotron_2b_shapes():
    block = RWKV7(1536, num_heads=12, head_k_dim=128, head_v_dim=128)
    # H*K*V float32 memory + the previous token's hidden state in bf16; independent of context
    assert block.cache_bytes(65536) == block.cache_bytes(1) == 12 * 128 * 128 * 4 + 1536 * 2
    x = torch.randn(3, 5, 32)
    small = RWKV7(32, **{**SMALL, "head_k_dim": 8})
    with torch.no_grad():
        _, state = small(x, use_cache=True)
    assert state.nbytes() == 3 * small.cache_bytes(5, dtype=torch.float32)


def test_inherits_rkvo_from_attention_when_shapes_fit():
    attn = Attention(32, num_heads=4, num_kv_heads=2, head_dim=8)
    block = build_layer("rwkv7", 32, num_heads=4, head_k_dim=8, head_v_dim=8)
    assert set(block.init_from_attention(attn)) == {"r_proj.weight", "k_proj.weight", "v_proj.weight",
                                                    "o_proj.weight"}
    assert torch.equal(block.r_proj.weight, attn.q_proj.weight)
    # GQA: key head j serves query heads 2j and 2j+1
    assert torch.equal(block.k_proj.weight.view(4, 8, 32)[1], attn.k_proj.weight.view(2, 8, 32)[0])
    assert torch.equal(block.v_proj.weight.view(4, 8, 32)[3], attn.v_proj.weight.view(2, 8, 32)[1])
    assert torch.equal(block.o_proj.weight, attn.o_proj.weight)
    # the inherited paths read the current token only (no token shift), as the attention did
    assert not block.x_r.any() and not block.x_k.any() and not block.x_v.any() and block.x_w.any()


def test_inheritance_skips_what_does_not_fit():
    attn = Attention(32, num_heads=4, num_kv_heads=2, head_dim=8)
    wide_values = RWKV7(32, num_heads=4, head_k_dim=8, head_v_dim=16)
    x_v = wide_values.x_v.detach().clone()
    assert set(wide_values.init_from_attention(attn)) == {"r_proj.weight", "k_proj.weight"}
    assert torch.equal(wide_values.x_v, x_v)  # a path that inherits nothing keeps its token shift
    assert RWKV7(32, num_heads=2, head_k_dim=8, head_v_dim=8).init_from_attention(attn) == []


def test_takes_part_in_block_selection():
    from jetnas.models.layer_types import block_options, parse_block

    assert LINEAR_LAYERS["rwkv7"] is RWKV7
    assert {"num_heads", "head_k_dim", "head_v_dim", "decay_low_rank_dim"} <= set(block_options("rwkv7"))
    candidate = parse_block("rwkv7:num_heads=4+head_k_dim=8")
    assert candidate.block_type == "rwkv7" and candidate.block_config() == {"rwkv7": {"num_heads": 4,
                                                                                      "head_k_dim": 8}}


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="num_heads, head_k_dim and head_v_dim must be >= 1"):
        RWKV7(32, num_heads=2, head_k_dim=-1)
