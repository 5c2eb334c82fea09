"""The static (captured) prefill: the same logits and the same cache as the forward prefill, for every block type,
odd lengths and a partial last chunk; no host read of a tensor inside a pass (a capture would fail on it); the
passes re-run from the counters saved at preparation, which is all a graph replay has."""

import importlib.util
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from jetnas.engine import Engine
from jetnas.engine.cache import StaticKV, WindowKV
from jetnas.engine.prefill import StaticPrefill, chunk_bounds
from tests.engine.test_engine import left_padded_batch, make_model
from tests.utils import ALL_TYPES, rel_err

LINEAR = [t for t in ALL_TYPES if t not in ("attn", "swa")]


def cache_tensors(cache, length):
    """Every tensor a prefill leaves in the cache: KV up to `length` (the ring whole), linear states."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, StaticKV):
            out += [layer.keys[:, :, :length], layer.values[:, :, :length]]
        elif isinstance(layer, WindowKV):
            out += [layer.keys, layer.values]
        else:
            for store, flags in ((layer.conv_states, layer.is_conv_states_initialized),
                                 (layer.recurrent_states, layer.is_recurrent_states_initialized)):
                out += [store[slot] for slot, on in flags.items() if on]
    return out


def prompts(batch, length, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("length", "chunk"), [(11, 4), (13, None), (9, 5), (1, 3)],
                         ids=["partial-last-chunk", "one-pass", "chunk-at-window", "one-token"])
@pytest.mark.parametrize("block_type", LINEAR)
def test_static_prefill_equals_the_forward_prefill(block_type, length, chunk):
    # window 5 < length: the ring wraps inside a pass and across passes
    model = make_model(["attn", block_type, "swa", block_type])
    ids = prompts(3, length)
    forward = Engine(model, chunk_size=chunk)
    want = forward.prefill(ids)
    static = Engine(model, chunk_size=chunk, prefill="static")
    got = static.prefill(ids)
    assert static.prefiller is not None and static.prefiller.bounds == chunk_bounds(length, chunk)
    # the same forward calls from the same counters: bit for bit, logits and every cache buffer
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cache_tensors(static.cache, length),
                                                 cache_tensors(forward.cache, length), strict=True))
    assert static.cache.counters() == forward.cache.counters()
    assert static.cache.get_seq_length() == length
    # and the model's own forward without a cache (chunking reorders float32 sums only)
    with torch.inference_mode():
        full = model(ids).logits[:, -1]
    assert rel_err(got, full) < 1e-5


def test_dropping_an_all_ones_mask_changes_nothing():
    # the forward prefill used to pass the mask to every chunk; without padding it now passes none (positions then
    # count from the cache): the same numbers, bit for bit, for every block type
    model = make_model(ALL_TYPES)
    ids = prompts(2, 13, seed=5)
    engine = Engine(model, chunk_size=5)
    got = engine.prefill(ids, torch.ones_like(ids))
    cache = Engine(model).cache_for(2, 13)
    with torch.inference_mode():
        for begin, end in chunk_bounds(13, 5):
            want = model(ids[:, begin:end], attention_mask=torch.ones(2, end, dtype=torch.long), past_key_values=cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1]
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cache_tensors(engine.cache, 13), cache_tensors(cache, 13), strict=True))


def test_all_block_types_in_one_model():
    model = make_model(ALL_TYPES)
    ids = prompts(2, 17, seed=1)
    want = Engine(model, chunk_size=6).prefill(ids)
    assert torch.equal(Engine(model, chunk_size=6, prefill="static").prefill(ids), want)


def test_a_prepared_prefill_is_reused_for_new_prompts_of_its_shape():
    model = make_model(["attn", "gdn", "swa", "jet"])
    engine = Engine(model, chunk_size=4, prefill="static")
    first = engine.prefill(prompts(2, 10, seed=1))
    prefiller = engine.prefiller
    second = engine.prefill(prompts(2, 10, seed=2))
    assert engine.prefiller is prefiller  # no second preparation (on CUDA: no second capture)
    # the input buffer is refilled: the second prompts' logits, not the first's
    assert torch.equal(second, Engine(model, chunk_size=4).prefill(prompts(2, 10, seed=2)))
    assert not torch.equal(first, second)
    engine.prefill(prompts(2, 12, seed=1))
    assert engine.prefiller is not prefiller  # a new length: new passes


class NoHostReads(TorchFunctionMode):
    """Raise on any read of a tensor's value by Python: on CUDA each is a synchronisation, which a capture forbids.
    Triton's CPU interpreter (which reads its tensors to run a kernel on CPU) is let through."""

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and not _inside_triton():
            raise AssertionError(f"a host read inside a prefill pass: {func}")
        return func(*args, **(kwargs or {}))


def _inside_triton() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if f"{os.sep}triton{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def test_a_pass_reads_no_tensor_value_on_the_host():
    # the model, layer and engine code of a pass, with the PyTorch references of the ops (fla's kernels replace
    # those on a GPU and are checked there by benchmarks/prefill_bench.py --check)
    model = make_model(ALL_TYPES)
    ids = prompts(2, 11)
    prefill = StaticPrefill(model, Engine(model).cache_for(2, 11), 2, 11, chunk_size=4)
    prefill.prepare()
    with NoHostReads():
        got = prefill.run(ids)
    assert torch.equal(got, Engine(model, chunk_size=4).prefill(ids))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")
def test_a_pass_on_our_triton_kernels_reads_no_tensor_value_on_the_host():
    # the same with the GPU's code paths of our own kernels (static and dynamic convs, fused norms and SwiGLU),
    # interpreted on CPU; fla's recurrences are GPU-only (benchmarks/prefill_bench.py checks their capture)
    from jetnas.models import JetNemotronForCausalLM
    from jetnas.ops.backend import Backend
    from tests.utils import randomize_zero_init, tiny_config

    torch.manual_seed(0)
    config = tiny_config(ALL_TYPES, head_dim=16)  # the kernels take head dims of powers of two >= 16
    model = randomize_zero_init(JetNemotronForCausalLM(config, backend=Backend("triton", interpret=True)).eval())
    reference = JetNemotronForCausalLM(config).eval()
    reference.load_state_dict(model.state_dict())
    ids = prompts(2, 11)
    prefill = StaticPrefill(model, Engine(model).cache_for(2, 11), 2, 11, chunk_size=4)
    prefill.prepare()
    with NoHostReads():
        got = prefill.run(ids)
    # float32 kernels against the references: rounding order only
    assert rel_err(got, Engine(reference, chunk_size=4).prefill(ids)) < 1e-5


def test_the_forward_prefill_reads_the_mask_once_not_per_layer():
    # without padding the mask is dropped after one check; a padded batch still gets it
    model = make_model(["attn", "gdn", "swa", "gdn"])
    ids = prompts(3, 9)
    reads = []

    class CountReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.__bool__:
                reads.append(1)
            return func(*args, **(kwargs or {}))

    engine = Engine(model, chunk_size=4)
    with CountReads():
        engine.prefill(ids, torch.ones_like(ids))
    assert len(reads) == 1


def test_left_padded_prompts_take_the_forward_path_and_generate_like_generate():
    model = make_model(["attn", "jet", "swa", "mamba2"])
    ids, mask = left_padded_batch()
    engine = Engine(model, chunk_size=4, prefill="static")
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(engine.generate(ids, mask, max_new_tokens=6).sequences, expected)
    assert engine.prefiller is None
    # the same prompts unpadded (the padded rows' last tokens) take the static passes
    full = ids[:, -3:]
    expected = model.generate(full, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(engine.generate(full, torch.ones_like(full), max_new_tokens=6).sequences, expected)
    assert engine.prefiller is not None


@pytest.mark.parametrize("block_type", LINEAR)
def test_static_prefill_then_graph_decode_equals_generate(block_type):
    model = make_model(["attn", block_type, "swa", block_type])
    ids = prompts(2, 11, seed=3)
    expected = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0)
    out = Engine(model, chunk_size=4, prefill="static").generate(ids, max_new_tokens=7)
    assert torch.equal(out.sequences, expected)


def test_replicated_prompt_with_static_prefill():
    model = make_model(["attn", "jet", "swa", "gdn"])
    prompt = prompts(1, 10, seed=4)
    want = Engine(model, chunk_size=3).generate_replicated(prompt, 3, max_new_tokens=5)
    engine = Engine(model, chunk_size=3, prefill="static")
    got = engine.generate_replicated(prompt, 3, max_new_tokens=5)
    assert torch.equal(got.sequences, want.sequences)
    assert engine.prefiller is None  # the one-row passes are dropped before the batch's cache is allocated


def test_moved_buffers_and_wrong_shapes_are_named():
    model = make_model(["attn", "gdn"])
    cache = Engine(model).cache_for(2, 8)
    prefill = StaticPrefill(model, cache, 2, 8, chunk_size=3)
    prefill.prepare()
    with pytest.raises(ValueError, match=r"prepared for prompts of shape \[2, 8\], got \[2, 7\]"):
        prefill.run(prompts(2, 7))
    cache.layers[1].recurrent_states[0] = cache.layers[1].recurrent_states[0].clone()
    with pytest.raises(RuntimeError, match=r"layer 1 recurrent_states\[0\]"):
        prefill.run(prompts(2, 8))
    with pytest.raises(ValueError, match=r"holds 2 rows of 8 tokens; a prefill of 2 x 9"):
        StaticPrefill(model, cache, 2, 9)
    with pytest.raises(ValueError, match="prefill must be one of"):
        Engine(model, prefill="graph")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunk_bounds(5, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_prefill_equals_eager_on_cuda():
    # float32 through the same kernels (fla's take head dims >= 16): replaying the captured passes gives the eager
    # prefill's numbers up to the GEMMs' algorithm choice on the capture stream
    config = {"swa": {"window_size": 5}, "jet": {"num_heads": 2, "head_dim": 32},
              "gdn": {"num_heads": 2, "head_k_dim": 32, "head_v_dim": 32}}
    model = make_model(["attn", "gdn", "swa", "jet"], head_dim=16, efficient_attention_config=config).cuda()
    ids = prompts(2, 100).cuda()
    want = Engine(model, chunk_size=32).prefill(ids)
    engine = Engine(model, chunk_size=32, prefill="static")
    got = engine.prefill(ids)
    assert len(engine.prefiller.graphs) == 4 and rel_err(got, want) < 1e-5
    assert torch.equal(engine.prefill(ids), got)  # a second replay
