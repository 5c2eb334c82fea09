"""The cache contract, for every block type (float64, so every comparison is exact up to rounding: 1e-9 relative).

- prefill then token-by-token decode == one full forward;
- chunked prefill == one-shot prefill;
- a left-padded batch gives each row what it gets alone, through prefill and decode;
- length 1 and odd lengths give finite outputs.
"""

import pytest
import torch

from jetnas.layers import LAYER_TYPES, build_layer
from tests.utils import rel_err

TOL = 1e-9
D = 32

CONFIGS = {
    "attn": dict(num_heads=4, num_kv_heads=2, head_dim=8),
    "swa": dict(num_heads=4, num_kv_heads=2, head_dim=8, window_size=5),
    "jet": dict(num_heads=2, head_k_dim=8, head_v_dim=16),
    "gdn": dict(num_heads=2, head_k_dim=8, head_v_dim=16),
    "deltanet": dict(num_heads=2, head_k_dim=8, head_v_dim=8),
    "gla": dict(num_heads=2, head_k_dim=8, head_v_dim=16),
    "retnet": dict(num_heads=2, head_k_dim=8, head_v_dim=16),
    "mamba2": dict(num_heads=4, head_dim=8, state_size=8, n_groups=2),
    "rwkv7": dict(num_heads=2, head_k_dim=8, head_v_dim=16, decay_low_rank_dim=8, a_low_rank_dim=8,
                  gate_low_rank_dim=8),
}


def make(layer_type):
    layer = build_layer(layer_type, D, **CONFIGS[layer_type]).double()
    # parameters that start at zero would hide bugs: give the JetBlock's generator a dynamic part, and the
    # convolutions a bias (which makes padded positions nonzero after the conv)
    for name, p in layer.named_parameters():
        if "kernel_generator.w2.weight" in name or name.endswith("conv1d.bias"):
            torch.nn.init.normal_(p, std=0.05)
    return layer


def test_every_registered_type_is_covered():
    assert set(CONFIGS) == set(LAYER_TYPES)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_prefill_then_decode_equals_full_forward(layer_type):
    layer = make(layer_type)
    x = torch.randn(2, 23, D, dtype=torch.float64)
    full, _ = layer(x)
    out, state = layer(x[:, :15], use_cache=True)
    outs = [out]
    for t in range(15, 23):
        out, state = layer(x[:, t : t + 1], state)
        outs.append(out)
    assert rel_err(torch.cat(outs, 1), full) < TOL
    assert state.get_seq_length() == 23


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_chunked_prefill_equals_one_shot(layer_type):
    layer = make(layer_type)
    x = torch.randn(2, 30, D, dtype=torch.float64)
    full, _ = layer(x)
    state, outs = None, []
    for a, b in [(0, 7), (7, 8), (8, 21), (21, 30)]:
        out, state = layer(x[:, a:b], state, use_cache=True)
        outs.append(out)
    assert rel_err(torch.cat(outs, 1), full) < TOL


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_left_padding_matches_unpadded_rows(layer_type):
    layer = make(layer_type)
    lengths = [17, 11]
    T = max(lengths)
    x = torch.randn(2, T, D, dtype=torch.float64)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    new = torch.randn(2, 3, D, dtype=torch.float64)
    out, state = layer(x, attention_mask=mask, position_ids=positions, use_cache=True)
    steps = []
    for t in range(3):
        mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
        pos = positions[:, -1:] + 1 + t
        o, state = layer(new[:, t : t + 1], state, attention_mask=mask, position_ids=pos)
        steps.append(o)
    for b, n in enumerate(lengths):
        alone, s = layer(x[b : b + 1, T - n:], use_cache=True)
        assert rel_err(out[b : b + 1, T - n:], alone) < TOL
        for t in range(3):
            o, s = layer(new[b : b + 1, t : t + 1], s)
            assert rel_err(steps[t][b : b + 1], o) < TOL


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
@pytest.mark.parametrize("T", [1, 63, 100], ids=lambda t: f"T{t}")
def test_odd_lengths_are_finite(layer_type, T):
    layer = build_layer(layer_type, D, **CONFIGS[layer_type])
    x = torch.randn(2, T, D, requires_grad=True)
    out, _ = layer(x)
    out.square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
