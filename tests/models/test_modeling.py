"""The hybrid model as a transformers model: save/load, the released key layout, caching and generation."""

import importlib.util
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from jetnas.models import JetNemotronForCausalLM
from jetnas.models.hf_compat import cache_nbytes, output_cache
from tests.utils import ALL_TYPES, randomize_zero_init, tiny_config


def make_model(block_types=None, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return randomize_zero_init(JetNemotronForCausalLM(tiny_config(block_types, **overrides))).to(dtype).eval()


def test_save_pretrained_then_auto_load_gives_identical_logits(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is JetNemotronForCausalLM
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def released_key_layout(block_types, with_lm_head=False):
    """The state-dict names of a released Jet-Nemotron checkpoint, spelled out from DESIGN.md (not from our
    modules), for a model with the given layers."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"] + (["lm_head.weight"] if with_lm_head else [])
    jet = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight", "g_proj.weight",
           "o_proj.weight", "A_log", "dt_bias", "o_norm.weight", "dynamic_conv1d.kernel_generator.w1.weight",
           "dynamic_conv1d.kernel_generator.w2.weight", "dynamic_conv1d.kernel_generator.w2.bias"]
    attn = ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
            "o_proj.weight"]
    for i, t in enumerate(block_types):
        p = f"model.layers.{i}."
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        keys += [p + f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
        keys += [p + "self_attn." + k for k in (jet if t == "jet" else attn)]
    return keys


def test_released_key_layout_loads_with_nothing_missing_or_unexpected(tmp_path):
    types = ["jet", "attn", "swa", "jet"]
    config = tiny_config(types)
    reference = make_model(types)
    keys = released_key_layout(types)
    state = reference.state_dict()
    assert set(keys) == set(state) - {"lm_head.weight"}  # lm_head is tied to the embeddings, not stored
    save_file({k: state[k].clone() for k in keys}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp_path)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("block_type", ALL_TYPES)
def test_cached_greedy_generation_equals_uncached(block_type):
    # every block type, next to full attention, batched with left padding
    assert_cached_generation_matches(make_model(["attn", block_type, block_type]))


def assert_cached_generation_matches(model) -> None:
    """Greedy generation of a batch with left padding: cached == uncached, and a padded row == the row alone."""
    ids = torch.randint(1, 97, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    # and a padded row generates what it generates alone
    alone = model.generate(ids[2:, 7:], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(alone[0, 3:], cached[2, 10:])


def test_sampling_is_seeded_and_batched():
    model = make_model()
    ids = torch.randint(1, 97, (2, 6))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(model.generate(ids, do_sample=True, temperature=0.9, top_k=20, max_new_tokens=8,
                                   pad_token_id=0))
    assert torch.equal(*outs) and outs[0].shape == (2, 14)


def test_cache_reports_its_bytes():
    model = make_model()
    ids = torch.randint(1, 97, (2, 13))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    measured = cache_nbytes(output_cache(out))
    # KV, conv inputs and recurrent states in float32 here; per sequence x batch
    assert measured == 2 * model.cache_bytes(13, dtype=torch.float32, state_dtype=torch.float32)


def test_output_hidden_states_and_loss():
    model = make_model()
    ids = torch.randint(1, 97, (2, 9))
    out = model(ids, labels=ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual)
    out.loss.backward()
    assert model.model.layers[2].self_attn.dynamic_conv1d.kernel_generator.w1.weight.grad is not None


def test_bad_mask_is_refused_with_a_clear_message():
    model = make_model()
    with pytest.raises(ValueError, match="2-D"):
        model(torch.randint(1, 97, (1, 4)), attention_mask=torch.ones(1, 1, 4, 4))


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not INTERPRETED, reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")
def test_the_model_runs_its_backend_everywhere_in_training(monkeypatch):
    # the same weights under the torch backend and under our Triton kernels (the interpreter lets CPU tensors reach
    # them: fused norms and SwiGLU, static and dynamic short convs, forward and backward; fla's recurrences never
    # run on CPU and stay the references): float32 logits and every gradient agree to float32 rounding, and the
    # fused kernels did run, as the backend passed down at construction said
    import jetnas.ops.triton_fused as tf
    from jetnas.ops.backend import Backend

    torch.manual_seed(0)
    config = tiny_config()
    reference = randomize_zero_init(JetNemotronForCausalLM(config, backend="torch"))
    model = JetNemotronForCausalLM(config, backend=Backend("triton", interpret=True))
    model.load_state_dict(reference.state_dict())
    calls = []
    # with the default fusions: the residual adds inside the norms, SwiGLU on the packed gate|up product
    names = ("triton_rms_norm", "triton_add_rms_norm", "triton_gated_rms_norm", "triton_silu_mul_packed")
    for name in names:
        monkeypatch.setattr(tf, name, lambda *a, _f=getattr(tf, name), _n=name: calls.append(_n) or _f(*a))
    ids = torch.randint(1, 97, (2, 11))
    outs = [m(ids, labels=ids) for m in (reference, model)]
    for out in outs:
        out.loss.backward()
    assert set(calls) == set(names)
    assert (outs[1].logits - outs[0].logits).abs().max() < 1e-5 * outs[0].logits.abs().max()
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters()):
        assert (p.grad - p_ref.grad).norm() <= 1e-4 * p_ref.grad.norm() + 1e-12, name


def test_a_model_backend_is_given_at_construction_and_on_loading(tmp_path):
    from jetnas.ops.backend import Backend

    unfused = Backend("torch", fused=False)
    model = JetNemotronForCausalLM(tiny_config(["attn", "jet"]), backend=unfused)
    assert model.model.backend is unfused and model.model.layers[1].self_attn.o_norm.backend is unfused
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, backend=unfused)
    assert loaded.model.backend is unfused and loaded.model.layers[0].mlp.backend is unfused
    assert "backend" not in loaded.config.to_dict()
