"""Conversion from Llama / Qwen2 / Qwen3: logits equality with every layer kept as attention, frozen tensors
bit-identical, inheritance into linear blocks, and the layer-type syntax."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from jetnas.models.convert import convert_model, default_swa_window, hybrid_config
from jetnas.models.layer_types import DEFAULT_SWA_WINDOW, parse_layer_types

TINY = dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY, rope_theta=500000.0, tie_word_embeddings=True)),
    "llama-biased": lambda: LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=False)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16)),
}


def source_model(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # HF zero-inits biases: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_all_attention_conversion_reproduces_the_teacher(family):
    source = source_model(family)
    hybrid, report = convert_model(source, ["attn"] * 4)
    ids = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        diff = (hybrid(ids).logits - source(ids).logits).abs().max().item()
    print(f"{family}: max |logits - teacher logits| = {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_tensors_are_bit_identical_and_frozen(family):
    source = source_model(family)
    hybrid, report = convert_model(source, ["jet", "attn", "gdn", "swa"], {"swa": {"window_size": 8}})
    src = source.state_dict()
    for name, p in hybrid.named_parameters():
        if ".self_attn." in name:
            assert p.requires_grad, name
            continue
        assert not p.requires_grad, name
        assert torch.equal(p, src[name]), name
    assert report.frozen and all(".self_attn." not in n for n in report.frozen)


def test_linear_blocks_inherit_where_shapes_allow():
    source = source_model("qwen2")
    config = {"jet": {"num_heads": 6, "head_dim": 8, "expand_v": 1.0}, "gla": {"head_v_dim": 16}}
    hybrid, report = convert_model(source, ["jet", "gla", "mamba2", "attn"], config)
    assert set(report.inherited[0]) == {f"self_attn.{n}_proj.weight" for n in "qkvo"}
    assert set(report.inherited[1]) == {"self_attn.q_proj.weight", "self_attn.k_proj.weight"}
    assert report.inherited[2] == []  # mamba2 with one group: no inheritance rule applies
    q_src = source.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(hybrid.model.layers[0].self_attn.q_proj.weight, q_src)


def test_layer_type_syntax():
    assert parse_layer_types("jet*2,attn,swa", 4) == ["jet", "jet", "attn", "swa"]
    assert parse_layer_types("jet-nemotron-2b", 28)[14] == "attn"
    # one grammar for convert and the searches since issue 18 (`jetnas.models.layer_types`): its messages
    with pytest.raises(ValueError, match="give 3 layers but the model has 4"):
        parse_layer_types("jet*2,attn", 4)
    with pytest.raises(ValueError, match="unknown layer type 'lstm'"):
        parse_layer_types("lstm*4", 4)
    with pytest.raises(ValueError, match="preset 'jet-nemotron-2b' has 28 layers but the model has 30"):
        parse_layer_types("jet-nemotron-2b", 30)


def window_of(source, **extra):
    return hybrid_config(source, ["attn", "swa", "attn", "attn"], extra or None).efficient_attention_config["swa"][
        "window_size"]


def test_swa_without_a_window_gets_the_documented_default():
    # the README's one-liners give no window: the teacher's own when it uses one, else 512 capped at half its
    # positions; a given window always wins
    assert window_of(LlamaConfig(**{**TINY, "max_position_embeddings": 8192})) == DEFAULT_SWA_WINDOW == 512
    assert window_of(LlamaConfig(**TINY)) == 128  # 256 positions: 512 would be no window at all
    assert window_of(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=64)) == 64
    assert window_of(Qwen2Config(**{**TINY, "max_position_embeddings": 8192}, use_sliding_window=False,
                                 sliding_window=4096)) == 512  # a window the teacher does not use is not its own
    assert window_of(LlamaConfig(**TINY), swa={"window_size": 32}) == 32
    hybrid, _ = convert_model(source_model("llama"), ["attn", "swa", "attn", "attn"])
    assert hybrid.config.sliding_window == 128
    # a jetnas model converted again keeps its own window
    assert window_of(hybrid.config) == 128
    assert default_swa_window(hybrid.config)[1] == "the teacher's own sliding window"
