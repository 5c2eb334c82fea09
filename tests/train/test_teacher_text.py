"""Teacher text sampled through the engine (`jetnas.train.data._sample_text`): a pure function of the seed, each
sample its prompt and the text up to the first EOS after it, as many tokens as asked, cached under the sampler's
name, resumed after an interruption with the same ids; the engine's sampling at temperature 1 is the model's softmax
(what `generate(do_sample=True)` draws); the generated source of a mixture is scored on its own held-out tail."""

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jetnas.engine import Engine
from jetnas.models import JetNemotronForCausalLM
from jetnas.train import data
from tests.evaluation.test_tasks import RecordingBar
from tests.utils import tiny_config

EOS = 0


class CharTokenizer:
    """Ids 1-7 from characters, 0 the end of document: with a vocabulary of 8 a random model ends a sample within a
    few steps (P(EOS) ~ 1/8 a step), so every batch exercises the cut at EOS."""

    name_or_path = "chars"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 7 for c in text]}

    def __len__(self):
        return 8


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return JetNemotronForCausalLM(tiny_config(["attn", "gdn"], vocab_size=8)).eval()


def split_documents(ids: list[int]) -> list[list[int]]:
    docs, doc = [], []
    for t in ids:
        if t == EOS:
            docs.append(doc)
            doc = []
        else:
            doc.append(t)
    assert doc == [], "the text ends with an EOS"
    return docs


def test_samples_are_seeded_cut_at_the_first_eos_and_reach_the_count(monkeypatch):
    monkeypatch.setattr(data, "tqdm", RecordingBar)
    RecordingBar.made = []
    raw = []
    generate = Engine.generate

    def recording(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        raw.append((args[0].clone(), args[1].clone(), out.sequences.clone()))
        return out

    monkeypatch.setattr(Engine, "generate", recording)
    tok, model = CharTokenizer(), tiny_teacher()
    ids = data._sample_text(model, tok, EOS, 500, seed=3, batch_size=4, length=20, name="tiny")
    assert len(ids) >= 500 and ids[-1] == EOS and max(ids) < len(tok)
    # what each row should give, read from the engine's raw output: the prompt without padding and its leading EOS,
    # then the new tokens up to (without) the first EOS among them, then one EOS
    expected = []
    for prompts, mask, sequences in raw:
        width = prompts.shape[1]
        for row in range(prompts.shape[0]):
            real = int(mask[row].sum())
            assert prompts[row, width - real] == EOS  # every prompt starts after an EOS
            new = sequences[row, width:].tolist()
            expected += prompts[row, width - real + 1:].tolist() + new[: new.index(EOS) if EOS in new else None]
            expected.append(EOS)
    assert ids == expected
    docs = split_documents(ids)
    assert len(docs) == 4 * len(raw) and all(len(d) <= prompts.shape[1] - 1 + 20 for d in docs)
    # most rows end early at this vocabulary: the cut is exercised, not just the length limit
    ended = sum(int((s[:, p.shape[1]:] == EOS).any(1).sum()) for p, _, s in raw)
    assert ended >= len(docs) // 2
    # the bar: one update per batch, by the tokens that batch kept, up to the count asked for
    bar = RecordingBar.made[-1]
    assert bar.total == 500 and bar.n == 500 and len(bar.updates) == len(raw) and all(u > 0 for u in bar.updates)
    # the seed alone decides the text
    monkeypatch.setattr(Engine, "generate", generate)
    assert data._sample_text(model, tok, EOS, 500, seed=3, batch_size=4, length=20, name="tiny") == ids
    assert data._sample_text(model, tok, EOS, 500, seed=4, batch_size=4, length=20, name="tiny") != ids


def test_generated_text_is_cached_under_the_samplers_name(tmp_path, monkeypatch):
    monkeypatch.setenv("JETNAS_CACHE", str(tmp_path))
    tok, model = CharTokenizer(), tiny_teacher()
    # a cache file of the transformers sampler's naming (before the engine): never read as the engine's text
    old = tmp_path / "data" / "generated-tiny-seed1-300.bin"
    data._write_bin(old, np.full(300, 5), np.dtype("<u2"))
    stream = data.teacher_generated(model, tok, EOS, 300, seed=1, batch_size=4, length=16, name="tiny")
    assert len(stream) == 300 and not (np.asarray(stream.array) == 5).all()
    made = sorted(p.name for p in (tmp_path / "data").glob("generated-*.bin"))
    assert made == ["generated-tiny-engine-cpu-seed1-b4-n16-300.bin", old.name]
    # built once: a second call reads the cache
    monkeypatch.setattr(data, "_sample_text", lambda *args: pytest.fail("sampled again instead of reading the cache"))
    again = data.teacher_generated(model, tok, EOS, 300, seed=1, batch_size=4, length=16, name="tiny")
    assert np.array_equal(np.asarray(again.array), np.asarray(stream.array))
    assert data.generation_defaults("cpu") == (16, 256) and data.generation_defaults("cuda") == (512, 512)
    with pytest.raises(ValueError, match="tokens, batch_size and length must be >= 1, got 300, 0, 16"):
        data.teacher_generated(model, tok, EOS, 300, seed=1, batch_size=0, length=16, name="tiny")


def test_an_interrupted_generation_goes_on_from_its_last_whole_batch(tmp_path, monkeypatch):
    # a long generation on a device whose calls have a time limit: cut off, it resumes with the very same ids
    monkeypatch.setenv("JETNAS_CACHE", str(tmp_path))
    tok, model = CharTokenizer(), tiny_teacher()
    calls = []
    generate = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, *a, **k: calls.append(1) or generate(self, *a, **k))
    whole = data._sample_text(model, tok, EOS, 400, seed=2, batch_size=4, length=16, name="tiny")
    batches = len(calls)
    assert batches > 3
    calls.clear()

    def cut_off_at_the_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", cut_off_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        data.teacher_generated(model, tok, EOS, 400, seed=2, batch_size=4, length=16, name="tiny")
    partial = next((tmp_path / "data").glob("*.partial"))
    assert json.loads(data._progress_path(partial).read_text())["batches"] == 2
    calls.clear()
    monkeypatch.setattr(Engine, "generate", lambda self, *a, **k: calls.append(1) or generate(self, *a, **k))
    stream = data.teacher_generated(model, tok, EOS, 400, seed=2, batch_size=4, length=16, name="tiny")
    assert np.asarray(stream.array).tolist() == whole[:400]
    assert len(calls) == batches - 2  # only the batches the cut-off run had not kept
    assert not list((tmp_path / "data").glob("*.partial*"))


def test_a_plain_llama_teacher_samples_through_conversion_and_is_left_as_it_was():
    # `load_teacher` returns the transformers model (SmolLM2: LlamaForCausalLM); the engine converts a copy
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).train()
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    ids = data._sample_text(llama, CharTokenizer(), EOS, 200, seed=0, batch_size=4, length=12, name="llama")
    assert len(ids) >= 200 and ids[-1] == EOS
    assert llama.training and all(p.requires_grad for p in llama.parameters())
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_engine_sampling_at_temperature_one_is_the_models_softmax():
    # what `generate(do_sample=True, temperature=1, top_k=0, top_p=1)` draws from: the softmax of the last logits.
    # 4,000 draws of a vocabulary of 8: a frequency's standard error is at most 0.008; 0.035 is over 4 of them
    model = tiny_teacher(seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # a peaked distribution, far from uniform, so a wrong one would show
    prompts, mask = data._seed_prompts(CharTokenizer(), EOS)
    k = 5  # "Once upon a time,": a left-padded prompt
    with torch.no_grad():
        probs = model(prompts[k:k + 1], attention_mask=mask[k:k + 1]).logits[0, -1].float().softmax(-1)
    n = 4000
    out = Engine(model).generate(prompts[[k] * n], mask[[k] * n], max_new_tokens=1, temperature=1.0, seed=0)
    freq = torch.bincount(out.sequences[:, -1], minlength=8).double() / n
    assert probs.max() > 0.3
    assert (freq - probs.double()).abs().max() < 0.035


def test_the_generated_source_gets_its_own_held_out_kl(tmp_path, models):
    # the pipeline's mixture (`data: {path, generate: {tokens, weight}, recall}`): the corpus's train.bin, the
    # generated.bin and recall.bin of out_dir/data; each source holds out its tail, scored on its own
    from jetnas.train.mixture import resolve_mixture
    from jetnas.train.stages import StageConfig, make_stage_eval

    teacher, student = models
    rng = np.random.default_rng(0)
    paths = [tmp_path / "corpus" / "train.bin", tmp_path / "run" / "data" / "generated.bin",
             tmp_path / "run" / "data" / "recall.bin"]
    for path in paths:
        data._write_bin(path, rng.integers(1, 97, 400), np.dtype("<u2"))
    spec = f"{paths[0]}:0.5,{paths[1]}:0.2,{paths[2]}:0.3"
    mixture = resolve_mixture(spec, tokenizer=None, teacher_eos=EOS, heldout_tokens=64)
    assert [len(s.heldout) for s in mixture.sources] == [64, 64, 64]
    config = StageConfig(stage=2, model="unused", kl_weight=1.0, seq_len=16, heldout_tokens=64,
                         eval_windows=2)
    metrics = make_stage_eval(config, teacher, mixture, torch.device("cpu"))(student)
    kl = {k: v for k, v in metrics.items() if k.startswith("heldout/kl")}
    assert set(kl) == {"heldout/kl", "heldout/kl/train.bin", "heldout/kl/generated.bin", "heldout/kl/recall.bin"}
    assert kl["heldout/kl/generated.bin"] > 0


class MarkupTokenizer(CharTokenizer):
    """CharTokenizer whose ids 1 and 2 are special (an instruction-tuned teacher's chat markup), 0 the EOS."""

    all_special_ids = (0, 1)

    def get_added_vocab(self):
        return {"<eos>": 0, "<|im_start|>": 1, "<|im_end|>": 2}


def test_sampling_without_special_tokens_never_draws_them_and_has_its_own_cache(tmp_path, monkeypatch):
    from jetnas.engine import sample_next

    # sample_next: a suppressed id is never chosen, greedy or sampled, even when it holds almost all the mass
    logits = torch.tensor([[0.0, 9.0, 8.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    assert int(sample_next(logits, suppress=torch.tensor([1]))) == 2
    draws = {int(sample_next(logits, 1.0, generator=g, suppress=torch.tensor([1, 2]))) for _ in range(50)}
    assert draws == {0, 3}
    assert int(sample_next(logits)) == 1  # and nothing is suppressed without it

    monkeypatch.setenv("JETNAS_CACHE", str(tmp_path))
    tok, model = MarkupTokenizer(), tiny_teacher()
    assert data.special_ids(tok, EOS) == [1, 2]
    with_markup = data.teacher_generated(model, tok, EOS, 300, seed=1, batch_size=4, length=16, name="tiny")
    plain = data.teacher_generated(model, tok, EOS, 300, seed=1, batch_size=4, length=16, name="tiny", special=False)
    prompts = {tuple(tok(p)["input_ids"]) for p in data.SEED_PROMPTS}

    def sampled(ids: list[int]) -> set[int]:
        """The ids the model drew: each document without its seed prompt (prompts are character ids 1-7 too)."""
        out = set()
        for doc in split_documents(ids):
            out |= set(doc[max((len(p) for p in prompts if tuple(doc[:len(p)]) == p), default=0):])
        return out

    allowed = data._sample_text(model, tok, EOS, 300, 1, 4, 16, "tiny")
    suppressed = data._sample_text(model, tok, EOS, 300, 1, 4, 16, "tiny", suppress=[1, 2])
    assert allowed[:300] == np.asarray(with_markup.array).tolist()
    assert suppressed[:300] == np.asarray(plain.array).tolist()
    assert sampled(allowed) & {1, 2}  # the random model draws them when allowed
    assert not sampled(suppressed) & {1, 2}
    names = sorted(p.name for p in (tmp_path / "data").glob("generated-*.bin"))
    assert names == ["generated-tiny-engine-cpu-seed1-b4-n16-300.bin",
                     "generated-tiny-engine-nospecial-cpu-seed1-b4-n16-300.bin"]
    with pytest.raises(ValueError, match=r"suppress_token_ids \[8\] outside the model's vocabulary of 8"):
        Engine(model).generate(torch.tensor([[1, 2]]), max_new_tokens=2, suppress_token_ids=[8])


def test_a_sample_length_without_a_batch_size_keeps_the_default_cache_positions(tmp_path, monkeypatch):
    monkeypatch.setenv("JETNAS_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(data, "_sample_text", lambda model, tok, eos, tokens, seed, batch, length, *rest:
                        seen.append((batch, length)) or [1] * tokens)
    tok, model = CharTokenizer(), tiny_teacher()
    data.teacher_generated(model, tok, EOS, 50, seed=1, length=1024, name="tiny")
    data.teacher_generated(model, tok, EOS, 50, seed=1, length=8192, name="tiny")
    data.teacher_generated(model, tok, EOS, 50, seed=1, name="tiny")
    assert seen == [(4, 1024), (1, 8192), (16, 256)]  # CPU defaults 16 x 256 positions
