"""The engine gives the tokens `generate()` gives, for every block type, with left padding and chunked prefill;
its caches are allocated once and sized as the model's cost accounting says."""

import importlib.util
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jetnas.engine import Engine, sample_next
from jetnas.models import JetNemotronForCausalLM
from tests.utils import ALL_TYPES, randomize_zero_init, tiny_config


def make_model(block_types, seed=0, **overrides):
    torch.manual_seed(seed)
    model = JetNemotronForCausalLM(tiny_config(list(block_types), **overrides)).eval()
    randomize_zero_init(model)
    return model


def left_padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0
    return ids, mask


@pytest.mark.parametrize("decode", ["static", "forward"])
@pytest.mark.parametrize("chunk_size", [None, 4], ids=["one-shot", "chunked"])
@pytest.mark.parametrize("block_type", ALL_TYPES)
def test_engine_greedy_equals_generate(block_type, chunk_size, decode):
    # the window (5) is shorter than the prompts: the static decoder's ring buffer wraps many times
    model = make_model(["attn", block_type, "swa", block_type])
    ids, mask = left_padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    out = Engine(model, chunk_size=chunk_size, decode=decode).generate(ids, mask, max_new_tokens=9)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("block_type", [t for t in ALL_TYPES if t not in ("attn", "swa")])
def test_static_decoder_logits_match_forward_decoding(block_type):
    # tokens could agree by luck of wide logit gaps (they did while RetNet's step rotated q/k at frozen
    # positions); the logits themselves must agree to float32 rounding
    from jetnas.engine.graph import StaticDecoder

    model = make_model(["attn", block_type, "swa", block_type])
    ids, mask = left_padded_batch(2)
    engine = Engine(model, decode="forward")
    ref = engine.generate(ids, mask, max_new_tokens=6).sequences
    with torch.inference_mode():
        full = model(ref, attention_mask=torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], 1)).logits
        cache = engine.cache_for(3, ref.shape[1])
        decoder = StaticDecoder(model, cache)
        decoder.prepare()
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        decoder.begin(mask)
        for t in range(ids.shape[1], ref.shape[1] - 1):
            got = decoder.step(ref[:, t])
            want = full[:, t]
            assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_engine_stops_rows_at_eos_like_generate():
    model = make_model(["attn", "jet"])
    ids, mask = left_padded_batch(1)
    free = Engine(model).generate(ids, mask, max_new_tokens=10).sequences
    eos = int(free[0, 13])  # row 0's third new token: it finishes there, the other rows may too
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                              pad_token_id=96)
    out = Engine(model).generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=96).sequences
    assert torch.equal(out, expected[:, : out.shape[1]])
    assert (expected[:, out.shape[1]:] == 96).all()


def test_plain_llama_is_served_through_conversion():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids, mask = left_padded_batch()
    expected = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(Engine(llama).generate(ids, mask, max_new_tokens=6).sequences, expected)


def test_sampling_is_seeded_and_filters():
    model = make_model(["attn", "gdn"])
    ids, mask = left_padded_batch()
    engine = Engine(model)
    runs = [engine.generate(ids, mask, max_new_tokens=8, temperature=0.8, top_k=5, seed=s).sequences
            for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(50)} == {2, 3}
    # top_p = 0.5: token 3 alone has probability 0.64 >= 0.5, so it is the only candidate
    assert {int(sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(20)} == {3}


@pytest.mark.parametrize("prefill,decode", [("static", "static"), ("forward", "forward")])
def test_swa_layers_with_windows_of_their_own_decode_like_generate(prefill, decode):
    # windows 3 and 7 (the default 5 nowhere): each ring wraps at its own size, and the static prefill's and the
    # static decoder's slot arithmetic (what a GPU captures) is per window
    model = make_model(["swa", "gdn", "swa", "attn"], efficient_attention_config={
        "swa": {"window_size": 5, "layer_windows": {"0": 3, "2": 7}}})
    assert [getattr(layer.self_attn, "window_size", None) for layer in model.model.layers] == [3, None, 7, None]
    ids, mask = left_padded_batch(1)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    engine = Engine(model, chunk_size=4, prefill=prefill, decode=decode)
    out = engine.generate(ids, mask, max_new_tokens=9)
    assert torch.equal(out.sequences, expected)
    assert [engine.cache.layers[i].keys.shape[2] for i in (0, 2)] == [3, 7]


def test_cache_is_allocated_once_and_window_bounded():
    model = make_model(["attn", "swa", "jet"])
    engine = Engine(model)
    ids, mask = left_padded_batch()
    engine.generate(ids, mask, max_new_tokens=4)
    cache = engine.cache
    pointers = [layer.keys.data_ptr() for layer in cache.layers[:2]]
    recurrent = cache.layers[2].recurrent_states[0].data_ptr()
    engine.generate(ids, mask, max_new_tokens=4)
    assert engine.cache is cache and [layer.keys.data_ptr() for layer in cache.layers[:2]] == pointers
    assert cache.layers[2].recurrent_states[0].data_ptr() == recurrent
    # swa keeps a ring of window = 5 tokens whatever the length; attn holds prompt + new tokens
    assert cache.layers[1].keys.shape[2] == 5 and cache.layers[0].keys.shape[2] == 15
    # the linear layer's state is what the model's cost accounting says per sequence
    per_seq = model.model.layers[2].self_attn.cache_bytes(15, dtype=torch.float32)
    assert cache.layers[2].nbytes() == 3 * per_seq


def test_bad_inputs_are_named():
    engine = Engine(make_model(["attn"]))
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1, got 0"):
        engine.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=0)
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1"):
        Engine(make_model(["attn"]), chunk_size=0)


@pytest.mark.parametrize("decode", ["static", "forward"])
def test_replicated_prompt_decodes_like_a_batch_of_copies(decode):
    model = make_model(["attn", "jet", "swa", "mamba2"])
    prompt = left_padded_batch(3)[0][:1]
    expected = Engine(model, decode=decode).generate(prompt.expand(3, -1), max_new_tokens=7).sequences
    out = Engine(model, decode=decode).generate_replicated(prompt, 3, max_new_tokens=7)
    assert torch.equal(out.sequences, expected) and out.new_tokens == 7


@pytest.mark.parametrize("chunk_size", [None, 3], ids=["one-shot", "chunked"])
def test_prefill_returns_the_forwards_last_logits(chunk_size):
    model = make_model(["attn", "jet", "swa", "gdn"])
    ids, mask = left_padded_batch(4)
    engine = Engine(model, chunk_size=chunk_size)
    with torch.inference_mode():
        want = model(ids, attention_mask=mask).logits[:, -1]
    got = engine.prefill(ids, mask)
    # chunking reorders float32 sums only
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert engine.cache.get_seq_length() == ids.shape[1]
    again = engine.prefill(ids, mask, cache=engine.cache_for(3, 20))  # a given (reset, longer) cache: the same
    assert (again - got).abs().max() < 1e-5 * got.abs().max()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")
def test_static_decoder_runs_the_kernels_of_the_models_backend(monkeypatch):
    # the decode step's attention takes the backend its attention layer was built with, as the linear blocks' steps
    # do theirs: under the triton backend (interpreted on CPU) the flash-decoding kernel runs, and the logits are
    # those of the torch backend's step to float32 rounding
    import jetnas.ops.triton_decode as td
    from jetnas.engine.graph import StaticDecoder
    from jetnas.ops.backend import Backend

    types = ["attn", "gdn", "swa", "jet"]
    reference = make_model(types, head_dim=16)  # the kernel takes head dims of powers of two >= 16
    model = JetNemotronForCausalLM(tiny_config(types, head_dim=16), backend=Backend("triton", interpret=True)).eval()
    model.load_state_dict(reference.state_dict())
    calls = []
    monkeypatch.setattr(td, "triton_decode_attention",
                        lambda *a, _f=td.triton_decode_attention: calls.append(1) or _f(*a))
    ids, mask = left_padded_batch(5)
    logits = []
    with torch.inference_mode():
        for m in (reference, model):
            cache = Engine(m).cache_for(3, ids.shape[1] + 3)
            decoder = StaticDecoder(m, cache)
            decoder.prepare()
            m(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            decoder.begin(mask)
            logits.append(torch.stack([decoder.step(ids[:, -1 - t]).clone() for t in range(3)]))
    assert calls and (logits[1] - logits[0]).abs().max() < 1e-4 * logits[0].abs().max()
