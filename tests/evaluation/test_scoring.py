"""The vectorized scorers (`score_continuations`, `token_nll`) against their one-request-at-a-time references.

Tolerances: both paths take each token's log-probability from the same float32 log-softmax of the same logits row,
so the per-token values are identical; only the per-request (per-window) sums add them in another order (a
zero-padded row summed at once against a slice summed alone). Float32 sums of tens of terms of a few nats each
differ by a few units in the last place: 1e-5 absolute for continuations (|sum| < 100 here, ulp 8e-6), 1e-6
relative for the perplexity totals (hundreds of terms). Token counts, byte counts and greedy flags are exact.
"""

import pytest
import torch

from jetnas.evaluation import scoring, tasks
from jetnas.evaluation.scoring import (
    LanguageModel,
    _score_continuations_reference,
    _token_nll_reference,
    score_continuations,
    token_nll,
)
from tests.utils import save_tiny_llama, tiny_tokenizer

VOCAB = 64


class CharTokenizer:
    """One token per character (`ord(c) % VOCAB`): lengths and splits the tests control exactly."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def char_lm(dtype=torch.float32, **kwargs) -> LanguageModel:
    """A fixed random 'model' over CharTokenizer whose top next token is the current one plus 1: continuations of
    consecutive characters ("abcd" after "...z") are greedy, others mostly not. `dtype` is the logits' dtype."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(VOCAB, VOCAB, generator=gen) * 2
    table[torch.arange(VOCAB), (torch.arange(VOCAB) + 1) % VOCAB] += 6

    def logits(ids, mask):
        # position-dependent noise, so equal tokens at different positions are scored differently
        pos = torch.arange(ids.shape[1], dtype=torch.float32)[:, None]
        return (table[ids] + torch.sin(pos * 0.7 + torch.arange(VOCAB) * 0.3)).to(dtype)

    return LanguageModel(logits, CharTokenizer(), **kwargs)


def char_requests():
    """Varied context and continuation lengths, greedy and not, several requests per task row."""
    requests, rows = [], []
    contexts = ["Question: abc", "x", "the long context " * 6 + "then", "wxyz ", "q" * 40 + "mnop", "Answer:"]
    continuations = [" abcd", "defg", " no", "hijklmnopq", " zz", "a", "qrstuvwxyz{|}~"]
    for number, ctx in enumerate(contexts):
        for cont in continuations[number % 3:][:4]:
            requests.append((ctx, cont))
            rows.append(number)
    return requests, rows


def assert_same_scores(fast, reference):
    assert len(fast) == len(reference)
    for i, (a, b) in enumerate(zip(fast, reference)):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5, rel=0), i
        assert (a.num_tokens, a.num_bytes, a.is_greedy) == (b.num_tokens, b.num_bytes, b.is_greedy), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch_size, batch_tokens, max_length", [
    (1, 16384, 512), (4, 16384, 512), (64, 16384, 512), (64, 120, 512), (8, 16384, 20), (3, 50, 16),
], ids=["one-per-batch", "batch4", "all-in-one", "token-limit", "truncated", "truncated-token-limit"])
def test_fast_continuation_scores_equal_the_reference(dtype, batch_size, batch_tokens, max_length):
    lm = char_lm(dtype, batch_size=batch_size, batch_tokens=batch_tokens, max_length=max_length)
    requests, rows = char_requests()
    fast = score_continuations(lm, requests, rows=rows)
    assert_same_scores(fast, _score_continuations_reference(lm, requests, rows=rows))
    greedy = [s.is_greedy for s in fast]
    assert any(greedy) and not all(greedy)  # both outcomes are exercised


def test_chunked_log_softmax_gives_the_same_scores(monkeypatch):
    lm = char_lm(batch_size=64)
    requests, rows = char_requests()
    whole = score_continuations(lm, requests, rows=rows)
    # chunks of 3 positions: requests straddle chunk boundaries
    monkeypatch.setitem(scoring._CHUNK_BYTES, "cpu", 3 * 4 * VOCAB)
    chunked = score_continuations(lm, requests, rows=rows)
    assert [s.logprob for s in whole] == [s.logprob for s in chunked]
    assert [s.is_greedy for s in whole] == [s.is_greedy for s in chunked]


@pytest.fixture(scope="module")
def llama_lm(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = save_tiny_llama(tmp_path_factory.mktemp("llama"), num_layers=2)
    model = LlamaForCausalLM.from_pretrained(path).eval()
    return lambda **kw: LanguageModel.from_hf(model, tiny_tokenizer(), **{"max_length": 512, **kw})


@pytest.mark.parametrize("batch_size, batch_tokens, max_length", [
    (1, 16384, 512), (5, 16384, 512), (32, 200, 512), (6, 16384, 24),
], ids=["one-per-batch", "batch5", "token-limit", "truncated"])
def test_fast_scores_equal_the_reference_on_a_tiny_llama(llama_lm, batch_size, batch_tokens, max_length):
    lm = llama_lm(batch_size=batch_size, max_length=max_length)
    lm.batch_tokens = batch_tokens
    ctxs = ["Question: what is the capital of France?\nAnswer:", "The quick brown fox jumps over the lazy",
            "A farmer walked along the stone wall before the sun went down. " * 3 + "The special code for Lisbon is",
            "0123456789 ABCD.", "Multiple choice questions about astronomy, biology, history and geography follow. "]
    conts = [" Paris", " dog", " 4821", " Lisbon is a city.", "Answer: Paris. The quick brown fox"]
    requests = [(c, x) for c in ctxs for x in conts]
    rows = [i for i in range(len(ctxs)) for _ in conts]
    assert_same_scores(score_continuations(lm, requests, rows=rows),
                       _score_continuations_reference(lm, requests, rows=rows))


def test_a_hybrid_scores_through_its_kept_positions_as_through_all_logits(tmp_path):
    # `LanguageModel.from_hf` keeps only the sequence positions some continuation needs (`logits_to_keep`)
    import dataclasses

    import jetnas  # noqa: F401
    from transformers import AutoModelForCausalLM

    from jetnas.models.convert import convert_model

    teacher = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path, num_layers=2)).eval()
    hybrid, _ = convert_model(teacher, ["gdn", "attn"])
    lm = LanguageModel.from_hf(hybrid.eval(), tiny_tokenizer(), max_length=512, batch_size=4)
    assert lm.logits_at is not None
    requests = [("The quick brown fox jumps over the lazy", " dog"), ("0123456789 ABCD.", " EFGH and more"),
                ("A farmer walked along the stone wall. " * 3, "The end."), ("Answer:", " Paris")]
    assert_same_scores(score_continuations(lm, requests), score_continuations(dataclasses.replace(lm, logits_at=None),
                                                                              requests))


def test_a_continuation_longer_than_the_window_is_an_error():
    lm = char_lm(max_length=8)
    with pytest.raises(ValueError, match=r"request 1: the continuation takes 9 tokens, more than the model's window "
                                         r"\(max_length=8\)"):
        score_continuations(lm, [("ab", "cd"), ("ab", "cdefghijk")])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length, window, stride, batch_size, batch_tokens", [
    (301, 64, None, 4, 16384), (301, 64, 16, 3, 16384), (301, 64, 48, 8, 16384), (301, 300, None, 2, 16384),
    (301, 50, 50, 16, 120), (2, 64, None, 4, 16384), (97, 32, 1, 64, 16384),
], ids=["disjoint", "stride16", "stride48", "one-window", "token-limit", "two-tokens", "stride1"])
def test_fast_token_nll_equals_the_reference(dtype, length, window, stride, batch_size, batch_tokens):
    lm = char_lm(dtype, batch_size=batch_size, batch_tokens=batch_tokens)
    tokens = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(length))
    nll, count = token_nll(lm, tokens, window, stride)
    ref_nll, ref_count = _token_nll_reference(lm, tokens, window, stride)
    assert count == ref_count == length - 1
    assert nll == pytest.approx(ref_nll, rel=1e-6) and nll > 0


def test_fast_token_nll_equals_the_reference_on_a_tiny_llama(llama_lm, monkeypatch):
    lm = llama_lm(batch_size=4)
    tokens = torch.randint(0, len(tiny_tokenizer()), (500,), generator=torch.Generator().manual_seed(1))
    configs = [(128, None), (128, 32), (500, None)]
    fast = {c: token_nll(lm, tokens, *c) for c in configs}
    for config in configs:
        expected = _token_nll_reference(lm, tokens, *config)
        assert fast[config][1] == expected[1] and fast[config][0] == pytest.approx(expected[0], rel=1e-6)
    # chunks of 7 positions (windows straddle them): the same per-token values, the same sums
    monkeypatch.setitem(scoring._CHUNK_BYTES, "cpu", 7 * 4 * len(tiny_tokenizer()))
    assert {c: token_nll(lm, tokens, *c) for c in configs} == fast


def test_tasks_report_the_same_metrics_with_either_scorer(tmp_path, llama_lm, monkeypatch):
    """Every built-in task scores through `score_continuations` / `token_nll`: the metrics they report are those of
    the reference scorers (accuracies exactly, losses to float32 rounding)."""
    from tests.evaluation.test_tasks import MC_ROWS, write_jsonl

    lm = llama_lm(batch_size=3)
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    cloze = write_jsonl(tmp_path / "cloze.jsonl", [{"context": "The quick brown fox jumps over the", "target": "lazy"},
                                                   {"context": "The capital of France is", "target": "Paris"}])
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 30)
    specs = [f"mc:{mc}", f"mc:{mc}?shots=2", f"cloze:{cloze}", f"ppl:{tmp_path / 'text.txt'}?window=64&stride=32",
             "retrieval:kv@200?n=2", "retrieval:mqar@200?n=2&queries=3"]
    fast = {s: tasks.parse_task(s).evaluate(lm) for s in specs}
    monkeypatch.setattr(tasks, "score_continuations", _score_continuations_reference)
    monkeypatch.setattr(tasks, "token_nll", _token_nll_reference)
    for spec in specs:
        reference = tasks.parse_task(spec).evaluate(lm)
        assert fast[spec].keys() == reference.keys(), spec
        for key, value in reference.items():
            exact = key in ("acc", "acc_norm", "n")
            assert fast[spec][key] == (value if exact else pytest.approx(value, rel=1e-6)), (spec, key)


@pytest.mark.parametrize("fewshot", [False, True], ids=["own-pool", "fewshot-file"])
def test_shots_are_the_first_rows_of_the_subject_but_the_row_itself(tmp_path, fewshot):
    from tests.evaluation.test_tasks import MC_ROWS, write_jsonl

    rows = [{**r, "id": f"r{i}", "subject": ["geography", "history", None][i % 3]} for i, r in
            enumerate(MC_ROWS * 3)] + [{**MC_ROWS[0], "subject": "history", "id": "r4"}]  # a duplicate id
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    pool = write_jsonl(tmp_path / "pool.jsonl", rows[::-1]) if fewshot else None
    task = tasks.MultipleChoiceTask(path, shots=2, fewshot=pool)
    full = 0
    for row in task.rows():
        # the definition: scan the whole pool in order
        same = [r for r in task._shots_pool if r is not row and r.get("id") != row.get("id")
                and r.get("subject") == row.get("subject")][:2]
        ctx, _ = tasks.mc_prompt(row)
        shots = "".join(tasks.mc_prompt(ex)[0] + tasks.mc_prompt(ex)[1][ex["label"]] + "\n\n" for ex in same)
        assert task.context(row) == tasks._mmlu_description(row) + shots + ctx
        full += len(same) == 2
    assert full > len(rows) // 2  # most rows get both shots: the comparison is not between empty prompts
