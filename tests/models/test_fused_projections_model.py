"""`Backend.fused_projections` in a whole model: the MLP's gate|up as one product with `silu_mul_packed`, and the
JetBlock family's fused projections (tests/layers/test_fused_projections.py), against the same weights unfused.

float32, tolerance 1e-5 norm-relative: only summation orders differ (the products over concatenated weights, x's
gradient summed inside one product instead of by adds), ~1e-7 relative per layer; a misrouted half or weight shows
at order 1e-1. Under the torch backend and the interpreter-backed triton backend (our kernels on CPU tensors).
"""

import dataclasses
import importlib.util
import os

import pytest
import torch
from transformers.activations import ACT2FN

from jetnas.models import JetNemotronForCausalLM
from jetnas.models.modeling import JetNemotronMLP
from jetnas.ops.backend import Backend
from tests.models.test_modeling import assert_cached_generation_matches
from tests.utils import randomize_zero_init, rel_err, tiny_config

TOL = 1e-5
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
BACKENDS = [
    pytest.param(Backend("torch", fused_projections=False), id="torch"),
    pytest.param(Backend("triton", interpret=True, fused_projections=False), id="triton-interpret", marks=pytest.mark.skipif(
        not INTERPRETED, reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")),
]
BLOCK_TYPES = ["attn", "gdn", "jet", "deltanet", "swa"]


def models(backend, block_types=BLOCK_TYPES, **overrides):
    torch.manual_seed(0)
    config = tiny_config(block_types, **overrides)
    reference = randomize_zero_init(JetNemotronForCausalLM(config, backend=backend))
    fused = JetNemotronForCausalLM(config, backend=dataclasses.replace(backend, fused_projections=True))
    fused.load_state_dict(reference.state_dict())
    return reference, fused


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_every_gradient_match(backend, monkeypatch):
    reference, fused = models(backend)
    assert fused.model.layers[1].self_attn.backend.fused_projections
    assert fused.model.layers[0].mlp.backend.fused_projections
    if backend.name == "triton":
        # the packed SwiGLU kernel is what runs in the fused model's MLPs
        import jetnas.ops.triton_fused as tf

        calls = []
        original = tf.triton_silu_mul_packed
        monkeypatch.setattr(tf, "triton_silu_mul_packed", lambda gu: calls.append(1) or original(gu))
    ids = torch.randint(1, 97, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    outs = [m(ids, attention_mask=mask, labels=ids) for m in (reference, fused)]
    for out in outs:
        out.loss.backward()
    if backend.name == "triton":
        assert len(calls) == len(BLOCK_TYPES)
    assert rel_err(outs[1].logits, outs[0].logits) < TOL
    for (name, p_ref), p in zip(reference.named_parameters(), fused.parameters()):
        assert p_ref.grad is not None and p.grad is not None, name
        assert rel_err(p.grad, p_ref.grad) < TOL, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act,bias", [("silu", True), ("gelu_pytorch_tanh", False), ("gelu_pytorch_tanh", True)])
def test_mlp_biases_and_other_activations(backend, act, bias):
    # the biases are concatenated like the weights; an activation other than SiLU takes the two halves of the
    # packed product (no packed kernel)
    torch.manual_seed(1)
    config = tiny_config(["attn"], hidden_act=act, mlp_bias=bias)
    mlp = JetNemotronMLP(config, backend)
    fused = JetNemotronMLP(config, dataclasses.replace(backend, fused_projections=True))
    fused.load_state_dict(mlp.state_dict())
    x = torch.randn(2, 9, 32)
    results = []
    for m in (mlp, fused):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        out.square().sum().backward()
        results.append((out, xi.grad, [p.grad for p in m.parameters()]))
    (out, dx, grads), (out_f, dx_f, grads_f) = results
    want = mlp.down_proj(ACT2FN[act](mlp.gate_proj(x)) * mlp.up_proj(x))
    assert rel_err(out, want) < TOL
    assert rel_err(out_f, out) < TOL and rel_err(dx_f, dx) < TOL
    for g, g_f in zip(grads, grads_f):
        assert rel_err(g_f, g) < TOL


def test_frozen_mlp_weights_get_no_gradient():
    # PostNAS stage 1 freezes the MLPs: the concatenated weight carries no gradient back to them, x's still flows
    config = tiny_config(["attn"])
    mlp = JetNemotronMLP(config, Backend("torch", fused_projections=True))
    mlp.requires_grad_(False)
    x = torch.randn(2, 5, 32, requires_grad=True)
    mlp(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in mlp.parameters())


def test_mlp_fuses_only_when_a_gradient_flows(monkeypatch):
    # the fused product pays in backward; without a gradient (prefill, decode) its per-call weight cat would copy the
    # MLP's gate and up every step, so the MLP keeps two products there (same results either way)
    import jetnas.models.modeling as modeling

    packed = []
    original = modeling.silu_mul_packed
    monkeypatch.setattr(modeling, "silu_mul_packed", lambda *a, **kw: packed.append(1) or original(*a, **kw))
    torch.manual_seed(2)
    mlp = JetNemotronMLP(tiny_config(["attn"]), Backend("torch", fused_projections=True))
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        inference = mlp(x)
    with torch.no_grad():
        mlp(x)
    assert packed == []
    mlp.requires_grad_(False)
    mlp(x)  # nothing requires a gradient
    assert packed == []
    training = mlp(x.clone().requires_grad_(True))  # stage 1: frozen MLP, x's gradient flows
    assert packed == [1] and rel_err(training.detach(), inference) < TOL


@pytest.mark.parametrize("block_type", ["gdn", "jet", "deltanet"])
def test_cached_greedy_generation_equals_uncached(block_type):
    # the model-level cache contract (tests/models/test_modeling.py) with the flag on: batched, left padding
    _, model = models(Backend("torch"), ["attn", block_type, block_type])
    assert_cached_generation_matches(model.eval())
