"""JetNemotronConfig: the released format loads unchanged; invalid configs name the field and the value."""

import json

import pytest

from jetnas.models import JetNemotronConfig
from jetnas.models.presets import count_parameters, preset_config

RELEASED_2B = {
    "architectures": ["JetNemotronForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_jet_nemotron.JetNemotronConfig",
                 "AutoModelForCausalLM": "modeling_jet_nemotron.JetNemotronForCausalLM"},
    "bos_token_id": 151643,
    "efficient_attention_config": {
        "jet": {"conv_size": 4, "dconv_generator_reduction": 8, "dconv_implementation": "triton",
                "expand_v": 2.6666666667, "head_dim": 96, "mode": "chunk", "norm_eps": "1e-5", "num_heads": 12},
        "swa": {"window_size": 1152}},
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960,
    "layer_types": ["jet"] * 14 + ["attn"] + ["jet"] * 4 + ["attn", "swa", "swa"] + ["jet"] * 6,
    "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "jet_nemotron",
    "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.3", "use_cache": True, "use_mrope": False, "vocab_size": 151936,
}


def test_released_config_json_loads_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_2B))
    config = JetNemotronConfig.from_pretrained(tmp_path)
    assert config.block_types == RELEASED_2B["layer_types"]
    assert config.layer_types[14] == "full_attention" and config.layer_types[20] == "sliding_attention"
    assert config.layer_types[0] == "linear_attention"
    assert config.sliding_window == 1152
    assert config.rope_parameters["rope_theta"] == 1e6
    assert config.block_kwargs("jet") == dict(num_heads=12, head_k_dim=96, head_v_dim=256, conv_size=4,
                                              generator_reduction=8, norm_eps=1e-5, initializer_range=0.02)
    config.save_pretrained(tmp_path / "again")
    assert JetNemotronConfig.from_pretrained(tmp_path / "again").block_types == config.block_types


def test_released_config_matches_the_2b_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_2B))
    released = JetNemotronConfig.from_pretrained(tmp_path)
    preset = preset_config("jet-nemotron-2b")
    assert released.block_types == preset.block_types
    assert released.block_kwargs("jet") == preset.block_kwargs("jet")
    assert released.block_kwargs("swa") == preset.block_kwargs("swa")


def test_preset_parameter_counts():
    # the paper's names: ~2B and ~4B (embeddings tied, counted once)
    n2, n4 = count_parameters(preset_config("jet-nemotron-2b")), count_parameters(preset_config("jet-nemotron-4b"))
    print(f"jet-nemotron-2b: {n2:,} parameters; jet-nemotron-4b: {n4:,}")
    assert 1.9e9 < n2 < 2.1e9 and 3.9e9 < n4 < 4.1e9


def _swa(layer_windows):
    return {"swa": {"window_size": 8, "layer_windows": layer_windows}}


@pytest.mark.parametrize("fields,message", [
    (dict(block_types=["attn", "lstm"]), r"block_types\[1\]='lstm' is not a known block"),
    (dict(block_types=["attn"]), r"block_types has 1 entries but num_hidden_layers=2"),
    (dict(block_types=["attn", "swa"]), r"\['swa'\]\['window_size'\] must be an int >= 1 .* got None"),
    (dict(block_types=["attn", "swa"], efficient_attention_config={"swa": {"window_size": 0}}),
     r"\['swa'\]\['window_size'\]=0: must be an integer >= 1"),
    (dict(block_types=["jet", "attn"], efficient_attention_config={"jet": {"heads": 4}}),
     r"\['jet'\]\['heads'\]: jet has no option 'heads'"),
    (dict(block_types=["jet", "attn"], efficient_attention_config={"jet": {"mode": "fast"}}),
     r"\['jet'\]\['mode'\]='fast': must be one of chunk, fused_recurrent"),
    (dict(num_key_value_heads=3), r"num_attention_heads=4 must be a multiple of num_key_value_heads=3"),
    (dict(block_types=["attn", "swa"], efficient_attention_config=_swa({"0": 4})),
     r"\['layer_windows'\] names layer 0, which is not 'swa' \(attn\)"),
    (dict(block_types=["attn", "swa"], efficient_attention_config=_swa({"5": 4})),
     r"names layer 5, which is not 'swa' \(beyond the 2 layers\)"),
    (dict(block_types=["attn", "swa"], efficient_attention_config=_swa({"1": 0})),
     r"\['layer_windows'\]\['1'\]=0: must be an integer >= 1"),
    (dict(block_types=["attn", "swa"], efficient_attention_config=_swa({"x": 4})),
     r"\['layer_windows'\]: key 'x' is not a layer index"),
    (dict(block_types=["attn", "swa"], efficient_attention_config=_swa([4])),
     r"\['layer_windows'\]=\[4\]: must be an object of layer index -> size"),
])
def test_invalid_configs_name_field_and_value(fields, message):
    base = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    with pytest.raises(ValueError, match=message):
        JetNemotronConfig(**{**base, **fields})


def test_swa_layers_take_their_own_windows_and_the_config_round_trips(tmp_path):
    from jetnas.models import JetNemotronForCausalLM

    config = JetNemotronConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                               intermediate_size=64, vocab_size=97, block_types=["swa", "attn", "swa", "swa"],
                               efficient_attention_config={"swa": {"window_size": 8, "layer_windows": {3: 3, "0": 5}}})
    assert JetNemotronConfig(**{**config.to_dict(), "efficient_attention_config": {"swa": {
        "window_size": 8, "layer_windows": {"3": 12}}}}).sliding_window == 12
    windows = [layer.self_attn.window_size for layer in JetNemotronForCausalLM(config).model.layers]
    assert windows == [5, None, 8, 3] and config.sliding_window == 8  # the largest
    config.save_pretrained(tmp_path)  # JSON keys are strings: the config reads back the same
    again = JetNemotronConfig.from_pretrained(tmp_path)
    assert again.efficient_attention_config["swa"]["layer_windows"] == {"0": 5, "3": 3}
    assert [again.block_kwargs("swa", i).get("window_size") for i in (0, 2, 3)] == [5, 8, 3]
