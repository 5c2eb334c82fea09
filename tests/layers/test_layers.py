"""Block-specific facts: JetBlock initialisation and names, cache sizes, inheritance from attention, the registry."""

import pytest
import torch

from jetnas.layers import Attention, GatedLinearAttention, JetBlock, Mamba2, build_layer
from jetnas.ops.backend import Backend, resolve_backend
from tests.utils import rel_err

RELEASED_JETBLOCK_PARAMS = {
    "q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight", "g_proj.weight",
    "o_proj.weight", "A_log", "dt_bias", "o_norm.weight", "dynamic_conv1d.kernel_generator.w1.weight",
    "dynamic_conv1d.kernel_generator.w2.weight", "dynamic_conv1d.kernel_generator.w2.bias",
}


def test_jetblock_has_exactly_the_released_parameter_names():
    assert set(JetBlock(64, num_heads=2, head_k_dim=8, head_v_dim=16).state_dict()) == RELEASED_JETBLOCK_PARAMS


def test_jetblock_at_init_is_a_static_short_convolution():
    jet = JetBlock(32, num_heads=2, head_k_dim=8, head_v_dim=16).double()
    static = JetBlock(32, num_heads=2, head_k_dim=8, head_v_dim=16, v_conv="static").double()
    state = {k: v for k, v in jet.state_dict().items() if "dynamic_conv1d" not in k}
    state["v_conv1d.weight"] = jet.dynamic_conv1d.kernel_generator.w2.bias.detach().view(32, 1, 4)
    static.load_state_dict(state)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    assert torch.equal(jet.dynamic_conv1d.kernel_generator.w2.weight, torch.zeros_like(jet.dynamic_conv1d.kernel_generator.w2.weight))
    assert rel_err(jet(x)[0], static(x)[0]) < 1e-12


def test_jetblock_generator_can_leave_its_initialisation():
    # w2 = 0 with w1 random: w2 gets a gradient (with both zero it could never move, see DynamicShortConvolution)
    jet = JetBlock(32, num_heads=2, head_k_dim=8, head_v_dim=16)
    jet(torch.randn(2, 9, 32))[0].square().mean().backward()
    assert jet.dynamic_conv1d.kernel_generator.w2.weight.grad.abs().sum() > 0


def test_jet_nemotron_2b_block_cache_size():
    jet = JetBlock(1536, num_heads=12, head_k_dim=96, head_v_dim=256)
    # H*K*V float32 recurrent state + H*V channels of (W - 1) bf16 conv inputs; independent of context
    expected = 12 * 96 * 256 * 4 + 12 * 256 * 3 * 2
    assert jet.cache_bytes(65536) == jet.cache_bytes(10) == expected
    attn = Attention(1536, 12, 2, 128)
    assert attn.cache_bytes(65536) == 2 * 65536 * 2 * 128 * 2
    assert Attention(1536, 12, 2, 128, window_size=1152).cache_bytes(65536) == 2 * 1151 * 2 * 128 * 2


@pytest.mark.parametrize("layer_type,kwargs", [
    ("jet", dict(num_heads=4, head_k_dim=8, head_v_dim=8)),
    ("gdn", dict(num_heads=4, head_k_dim=8, head_v_dim=8)),
    ("deltanet", dict(num_heads=4, head_k_dim=8, head_v_dim=8)),
    ("gla", dict(num_heads=4, head_k_dim=8, head_v_dim=8)),
    ("retnet", dict(num_heads=4, head_k_dim=8, head_v_dim=8)),
])
def test_linear_blocks_inherit_qkvo_when_shapes_fit(layer_type, kwargs):
    attn = Attention(32, num_heads=4, num_kv_heads=2, head_dim=8)
    block = build_layer(layer_type, 32, **kwargs)
    assert set(block.init_from_attention(attn)) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    assert torch.equal(block.q_proj.weight, attn.q_proj.weight)
    # GQA: key head j serves query heads 2j and 2j+1
    assert torch.equal(block.k_proj.weight.view(4, 8, 32)[1], attn.k_proj.weight.view(2, 8, 32)[0])
    assert torch.equal(block.v_proj.weight.view(4, 8, 32)[3], attn.v_proj.weight.view(2, 8, 32)[1])
    assert torch.equal(block.o_proj.weight, attn.o_proj.weight)


def test_inheritance_skips_what_does_not_fit():
    attn = Attention(32, num_heads=4, num_kv_heads=2, head_dim=8)
    gla = GatedLinearAttention(32, num_heads=4, head_k_dim=8, head_v_dim=16)
    assert set(gla.init_from_attention(attn)) == {"q_proj.weight", "k_proj.weight"}
    assert Mamba2(32, num_heads=2, head_dim=8, state_size=8).init_from_attention(attn) == []


def test_mamba2_inherits_with_one_group_per_head():
    attn = Attention(32, num_heads=4, num_kv_heads=2, head_dim=8)
    m = Mamba2(32, num_heads=4, head_dim=8, state_size=8, n_groups=4)
    assert m.init_from_attention(attn)
    C = m.in_proj.weight[96:128]  # rows: z [0, 32), x [32, 64), B [64, 96), C [96, 128), dt
    assert torch.equal(C, attn.q_proj.weight)


def test_swa_shares_attention_weights():
    attn = Attention(32, 4, 2, 8)
    swa = build_layer("swa", 32, num_heads=4, num_kv_heads=2, head_dim=8, window_size=4)
    swa.init_from_attention(attn)
    x = torch.randn(1, 3, 32)
    # within the window the two are the same function
    assert torch.allclose(swa(x)[0], attn(x)[0], atol=1e-6)
    assert swa.layer_type == "swa" and attn.layer_type == "attn"


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="'swa' needs window_size"):
        build_layer("swa", 32, num_heads=4)
    with pytest.raises(ValueError, match="unknown layer type 'rwkv9'; known: attn, swa, jet"):
        build_layer("rwkv9", 32)
    with pytest.raises(ValueError, match="qk_conv must be one of"):
        JetBlock(32, num_heads=2, head_k_dim=8, head_v_dim=8, qk_conv="wavelet")


def test_backend_resolution_on_cpu():
    assert resolve_backend("torch") == Backend("torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda")
    if not torch.cuda.is_available():
        assert resolve_backend("auto").name == "torch"
        with pytest.raises(ValueError, match="needs CUDA and flash-linear-attention"):
            resolve_backend("triton")
    # options survive resolution; a resolved backend comes back as it is
    custom = Backend("auto", fused=False, static_conv=False)
    assert resolve_backend(custom) == Backend(resolve_backend("auto").name, fused=False, static_conv=False)
    interpreted = resolve_backend(Backend("triton", interpret=True))  # the tests' way to reach our kernels on CPU
    assert interpreted.name == "triton" and resolve_backend(interpreted) is interpreted


@pytest.mark.parametrize("layer_type", ["attn", "jet", "gdn", "deltanet", "gla", "retnet", "mamba2"])
def test_a_layer_passes_its_backend_to_every_module_it_calls(layer_type):
    # one value decides every kernel of the block: its norms get the very backend the block resolved
    from jetnas.modules.norm import GatedRMSNorm, RMSNorm

    backend = Backend("torch", fused=False, static_conv=False)
    kwargs = {"head_dim": 8, "state_size": 8} if layer_type == "mamba2" else {"num_heads": 4}
    if layer_type == "attn":
        kwargs.update(qk_norm=True)
    layer = build_layer(layer_type, 32, backend=backend, **kwargs)
    norms = [m for m in layer.modules() if isinstance(m, (RMSNorm, GatedRMSNorm))]
    assert layer.backend is backend and norms and all(m.backend is backend for m in norms)


def test_set_backend_switches_every_module_below():
    from jetnas.modules.backend import set_backend
    from jetnas.models import JetNemotronForCausalLM
    from tests.utils import tiny_config

    model = JetNemotronForCausalLM(tiny_config(), backend="torch")
    holders = [m for m in model.modules() if isinstance(getattr(m, "backend", None), Backend)]
    # the model, every layer's mixer, MLP and two norms, the final norm, the blocks' own norms
    assert len(holders) > 4 * len(model.model.layers)
    assert all(m.backend == Backend("torch") for m in holders)
    unfused = set_backend(model, Backend("torch", fused=False))
    assert all(m.backend is unfused for m in holders)
