"""`Backend.fused_projections` in the JetBlock family: q|k|v and b|a|g as two matrix products (and, with static
convolutions on all three, one conv over q|k|v), and in GLA its five input products as one `shared_input_linear`,
give what the separate projections give, with the same weights.

Compared in float32 with tolerance 1e-5 (norm-relative): the fused path does the same float32 maths with different
summation orders only (a product over the concatenated weight may block its sums differently, and x's gradient is
one product's sum over all output columns instead of six products added), so the two agree to ~1e-7 relative, and
the recurrence amplifies that a little; a misrouted channel, weight or state shows at order 1e-1. Under the torch
backend and under the triton backend with Triton's interpreter (our static / dynamic conv and fused norm kernels;
fla's recurrences never run on CPU tensors and stay the references). The cache contract (tests/layers/
test_cache_contract.py, float64) is run again with the flag on.
"""

import copy
import dataclasses
import importlib.util
import os

import pytest
import torch

from jetnas.layers import build_layer
from jetnas.layers.jet import JetBlock
from jetnas.ops.backend import Backend
from tests.layers import test_cache_contract as contract
from tests.utils import rel_err

TOL = 1e-5
D = 32
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
BACKENDS = [
    pytest.param(Backend("torch", fused_projections=False), id="torch"),
    pytest.param(Backend("triton", interpret=True, fused_projections=False), id="triton-interpret", marks=pytest.mark.skipif(
        not INTERPRETED, reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")),
]
HEADS = dict(num_heads=2, head_k_dim=8, head_v_dim=16)
BLOCKS = {
    # one conv over q|k|v
    "gdn": lambda backend: build_layer("gdn", D, backend=backend, **HEADS),
    "deltanet": lambda backend: build_layer("deltanet", D, backend=backend, num_heads=2, head_k_dim=8, head_v_dim=8),
    "gdn-conv-bias": lambda backend: _with_conv_biases(build_layer("gdn", D, backend=backend, **HEADS)),
    # one conv per path, each on its slice of the q|k|v product (none on q and k; dynamic, static, mixed)
    "jet": lambda backend: build_layer("jet", D, backend=backend, **HEADS),
    "jet-static-v": lambda backend: JetBlock(D, **HEADS, qk_conv="none", v_conv="static", backend=backend),
    "jet-static-qk-dynamic-v": lambda backend: JetBlock(D, **HEADS, qk_conv="static", v_conv="dynamic",
                                                        backend=backend),
    "jet-dynamic-qk-no-gate": lambda backend: JetBlock(D, **HEADS, qk_conv="dynamic", v_conv="static",
                                                       use_output_gate=False, backend=backend),
    # GLA (the super-network's linear path): q, k, v, the gate and the decay's low-rank half as one shared product
    "gla": lambda backend: build_layer("gla", D, backend=backend, num_heads=2),
}


def _with_conv_biases(layer):
    # JetBlock's convolutions have no bias; a static conv with one (fla / Mamba2 checkpoints) takes the concatenated
    # biases in the one conv
    for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
        conv = getattr(layer, name)
        conv.bias = torch.nn.Parameter(0.1 * torch.randn(conv.hidden_size))
    return layer


def pair(kind, backend):
    """The block unfused and a copy with `fused_projections` on: the same weights, none left at zero."""
    torch.manual_seed(0)
    layer = BLOCKS[kind](backend)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "kernel_generator.w2.weight" in name:
                p.normal_(std=0.05)
    fused = copy.deepcopy(layer)
    fused.backend = dataclasses.replace(layer.backend, fused_projections=True)
    return layer, fused


def outputs_and_grads(layer, x, dy, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    out, _ = layer(x, **kwargs)
    out.backward(dy)
    return out, x.grad, {name: p.grad for name, p in layer.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
def test_outputs_and_every_gradient_match(kind, backend, padded):
    layer, fused = pair(kind, backend)
    x, dy = torch.randn(2, 23, D), torch.randn(2, 23, D)
    kwargs = {}
    if padded:
        mask = torch.ones(2, 23, dtype=torch.long)
        mask[1, :9] = 0
        kwargs = dict(attention_mask=mask)
    out, dx, grads = outputs_and_grads(layer, x, dy, **kwargs)
    out_f, dx_f, grads_f = outputs_and_grads(fused, x, dy, **kwargs)
    assert rel_err(out_f, out) < TOL
    assert rel_err(dx_f, dx) < TOL
    assert grads_f.keys() == grads.keys()
    for name, g in grads.items():
        assert g is not None and grads_f[name] is not None, name
        assert rel_err(grads_f[name], g) < TOL, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_caches_match_through_chunked_prefill_and_decode(kind, backend):
    # the fused prefill leaves each path's conv state (split back by channels) and the recurrent state the
    # separate projections leave; a second chunk starts from them (the one conv from concatenated states); decode
    # steps, which never take the fused path, go on from either cache alike: five of them (eleven until 2026-12-07,
    # 34 s of interpreted steps over the eight blocks), more than the conv width of 4, so the last steps' conv windows
    # hold decoded tokens only
    layer, fused = pair(kind, backend)
    x = torch.randn(2, 24, D)
    with torch.no_grad():
        states, outs = {}, {}
        for name, block in (("unfused", layer), ("fused", fused)):
            state, chunks = None, []
            for a, b in [(0, 7), (7, 19)]:
                out, state = block(x[:, a:b], state, use_cache=True)
                chunks.append(out)
            for t in range(19, 24):
                out, state = block(x[:, t : t + 1], state)
                chunks.append(out)
            states[name], outs[name] = state, torch.cat(chunks, 1)
    assert rel_err(outs["fused"], outs["unfused"]) < TOL
    want, got = states["unfused"], states["fused"]
    assert got.seq_length == want.seq_length == 24
    assert rel_err(got.recurrent, want.recurrent) < TOL
    assert got.conv.keys() == want.conv.keys()
    for name in want.conv:
        assert got.conv[name].shape == want.conv[name].shape and got.conv[name].dtype == want.conv[name].dtype
        assert rel_err(got.conv[name], want.conv[name]) < TOL, name


@pytest.mark.parametrize("kind", ["gdn", "jet"])
def test_decode_steps_keep_the_separate_projections(kind, monkeypatch):
    # the decode step (and the engine's captured step) is left exactly as it was: a one-token call with a cache
    # never takes the fused projections; a prompt (or a single token without a cache) does
    _, fused = pair(kind, Backend("torch"))
    calls = []
    original = JetBlock._fused_projections
    monkeypatch.setattr(JetBlock, "_fused_projections", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        _, state = fused(torch.randn(2, 5, D), use_cache=True)
        assert len(calls) == 1
        for _ in range(3):
            fused(torch.randn(2, 1, D), state)
        assert len(calls) == 1
        fused(torch.randn(2, 1, D))
        assert len(calls) == 2


@pytest.fixture
def fused_contract(monkeypatch):
    """tests/layers/test_cache_contract.py's layers, built with `fused_projections` on (torch backend, float64)."""
    from jetnas.layers import build_layer as build

    fused = Backend("torch", fused_projections=True)
    monkeypatch.setattr(contract, "build_layer", lambda layer_type, d, **kw: build(layer_type, d, backend=fused, **kw))


@pytest.mark.parametrize("layer_type", ["jet", "gdn", "deltanet"])
@pytest.mark.parametrize("check", [
    contract.test_prefill_then_decode_equals_full_forward,
    contract.test_chunked_prefill_equals_one_shot,
    contract.test_left_padding_matches_unpadded_rows,
], ids=lambda f: f.__name__.removeprefix("test_"))
def test_cache_contract_with_fused_projections(fused_contract, layer_type, check):
    assert contract.make(layer_type).backend.fused_projections
    check(layer_type)


@pytest.mark.skipif(not INTERPRETED, reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")
@pytest.mark.parametrize("kind", ["gdn", "deltanet", "gdn-conv-bias"])
def test_q_and_k_normalised_in_the_conv_only_without_gradients(kind, monkeypatch):
    # `Backend.conv_l2norm`: a prompt with no gradient gets q and k L2-normalised by the one conv's kernel and the
    # recurrence skips its own normalisation; the same outputs and caches as with it off (float32, TOL); with a
    # gradient (training) the conv leaves them alone
    import jetnas.layers.jet as jet

    _, on = pair(kind, Backend("triton", interpret=True))
    off = copy.deepcopy(on)
    off.backend = dataclasses.replace(on.backend, conv_l2norm=False)
    heads = []
    original = jet.short_conv_split
    monkeypatch.setattr(jet, "short_conv_split",
                        lambda *a, **kw: heads.append(kw.get("l2norm_head", 0)) or original(*a, **kw))
    x = torch.randn(2, 21, D)
    with torch.no_grad():
        (out_on, state_on), (out_off, state_off) = (block(x, None, use_cache=True) for block in (on, off))
    assert heads == [on.head_k_dim, 0]
    assert rel_err(out_on, out_off) < TOL and rel_err(state_on.recurrent, state_off.recurrent) < TOL
    assert all(torch.equal(state_on.conv[n], state_off.conv[n]) for n in state_off.conv)
    out, _ = on(x.requires_grad_(True))
    assert heads[-1] == 0 and out.requires_grad
