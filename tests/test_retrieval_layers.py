"""benchmarks/retrieval_layers.py: the scoring of attention rows, the source positions it scores them against, and
the probe's attention (windows, sinks, zeroed heads, recorded rows) against eager attention on a tiny Llama."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.utils import rel_err, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import retrieval_layers as rl


def test_score_attention_hand_built():
    # 2 layers, 2 heads, 3 queries, 5 keys; sources 1, 2, 4; spans {1, 2} for the first two, {4} for the third
    probs = torch.zeros(2, 2, 3, 5)
    probs[0, 0] = torch.tensor([[0.1, 0.6, 0.3, 0, 0], [0.2, 0.2, 0.6, 0, 0], [0.5, 0, 0, 0, 0.5]])
    probs[0, 1] = torch.tensor([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0]])
    probs[1, 0] = torch.full((3, 5), 0.2)
    probs[1, 1] = torch.tensor([[0, 0, 0, 0.9, 0.1], [0, 0.7, 0.3, 0, 0], [0, 0, 0, 0, 1.0]])
    scores = rl.score_attention(probs, torch.tensor([1, 2, 4]), [[1, 2], [1, 2], [4]])
    # [0, 0]: argmax hits the source for queries 0 and 1; query 2 ties 0.5/0.5 and the first maximum (key 0) wins
    # float32 sums of 3-5 terms: 1e-6 is a few ulps
    close = lambda got, want: torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-6)
    close(scores["copy"], [[2 / 3, 0.0], [0.0, 1 / 3]])
    close(scores["mass"], [[(0.6 + 0.6 + 0.5) / 3, 0.0], [0.2, (0 + 0.3 + 1.0) / 3]])
    close(scores["span_mass"], [[(0.9 + 0.8 + 0.5) / 3, 0.0], [(0.4 + 0.4 + 0.2) / 3, (0 + 1.0 + 1.0) / 3]])


def test_score_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[L, H, P, T\]"):
        rl.score_attention(torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long), [[0]] * 3)
    with pytest.raises(ValueError, match="P=3"):
        rl.score_attention(torch.zeros(1, 1, 3, 4), torch.zeros(2, dtype=torch.long), [[0]] * 3)
    with pytest.raises(ValueError, match="sources must lie"):
        rl.score_attention(torch.zeros(1, 1, 1, 4), torch.tensor([4]), [[0]])


def test_source_start_needle_and_mqar():
    needle = "Filler. The special magic number for Oslo is 1234567. More filler.\nWhat is the special magic number " \
             "for Oslo? The special magic number for Oslo is"
    at = rl.source_start(needle, " 1234567")
    assert needle[at:at + 8] == " 1234567"
    mqar = "red cat is 12. big dog is 34. big cat is 56.\nNow recall.\nbig dog is 34\nbig cat is"
    at = rl.source_start(mqar, " 56")
    assert mqar[at - 10:at + 3] == "big cat is 56"
    with pytest.raises(ValueError, match="not stated before the query"):
        rl.source_start(mqar, " 99")


def test_rank_layers_and_band_mask():
    assert rl.rank_layers([0.1, 0.5, 0.5, 0.2], 3) == [1, 2, 3]
    mask = rl.band_mask(5, 2, sinks=1).int().tolist()
    assert mask == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]]
    assert rl.band_mask(3, None).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_tokenise_row_points_at_the_stated_value():
    """A real RetrievalTask row (the evaluation's generator, a tiny BPE tokenizer): every scored answer token's
    source is the same token in the fact, before the query, and the context encodes to a prefix of the row."""
    tok = tiny_tokenizer()
    for kind, length in (("needle", 160), ("kv", 200), ("mqar", 120)):
        rows, _ = rl.make_rows(kind, length, 2, 16, tok, far_only=False)
        for row in rows:
            assert row.queries and len(row.queries) == len(row.sources) == len(row.spans)
            for q, s, span in zip(row.queries, row.sources, row.spans):
                assert row.ids[s] == row.ids[q + 1] and s in span and s < q
            assert sum(last - first + 1 for first, last in row.answers) == len(rl.predict_positions(row))


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    reference = {"logp": torch.log_softmax(out.logits[0].float(), -1), "attn": [a[0] for a in out.attentions]}
    rl.install_probe(model)
    return model, ids, reference


def test_probe_matches_eager_attention(tiny_llama):
    """The probe (SDPA, recorded rows, layer-by-layer forward, restart from a kept input) against transformers'
    eager attention; float32 on 40 tokens: SDPA and eager softmax differ only by rounding (rel. error < 1e-5)."""
    model, ids, ref = tiny_llama
    pos = torch.tensor([5, 17, 39])
    with rl.probing(rl.Probe(record=pos)) as probe:
        logp, inputs = rl.forward_row(model, ids, pos, keep_inputs=True)
    assert rel_err(logp, ref["logp"][pos]) < 1e-5
    for layer in range(3):
        assert rel_err(probe.records[layer], ref["attn"][layer][:, pos]) < 1e-5
    with rl.probing(rl.Probe()):
        again, _ = rl.forward_row(model, ids, pos, start=2, hidden=inputs[2])
    assert torch.equal(again, logp)


def test_probe_window_and_zeroed_heads(tiny_llama):
    """A windowed layer equals eager attention under the band mask (and changes the output); a zeroed head equals
    zeroing that head's slice of o_proj's input."""
    model, ids, ref = tiny_llama
    pos = torch.arange(40)
    band = rl.band_mask(40, 7, sinks=2)
    with rl.probing(rl.Probe(windows={1: 7}, sinks=2, record=pos)) as probe:
        windowed, _ = rl.forward_row(model, ids, pos)
    assert rel_err(windowed, ref["logp"]) > 1e-3
    assert (probe.records[1][:, ~band] == 0).all() and torch.equal(probe.records[0] > 0, ref["attn"][0] > 0)

    def reference(window_layer=None, zero=None):
        handles = []
        if zero is not None:
            layer, head = zero
            o_proj = model.model.layers[layer].self_attn.o_proj

            def drop(module, args):
                x = args[0].clone()
                x[..., head * 8:(head + 1) * 8] = 0
                return (x,)
            handles.append(o_proj.register_forward_pre_hook(drop))
        model.set_attn_implementation("eager")
        try:
            mask = torch.where(band, 0.0, float("-inf"))[None, None]
            full = torch.where(rl.band_mask(40, None), 0.0, float("-inf"))[None, None]
            with torch.no_grad():
                h = model.model.embed_tokens(ids)
                rope = model.model.rotary_emb(h, position_ids=pos[None])
                for i, layer in enumerate(model.model.layers):
                    h = layer(h, attention_mask=mask if i == window_layer else full, position_embeddings=rope,
                              position_ids=pos[None])
                return torch.log_softmax(model.lm_head(model.model.norm(h))[0].float(), -1)
        finally:
            rl.install_probe(model)
            for handle in handles:
                handle.remove()

    assert rel_err(windowed, reference(window_layer=1)) < 1e-5
    with rl.probing(rl.Probe(zero_heads={2: [3]})):
        zeroed, _ = rl.forward_row(model, ids, pos)
    assert rel_err(zeroed, reference(zero=(2, 3))) < 1e-5
    assert rel_err(zeroed, ref["logp"]) > 1e-4


def test_answer_metrics_counts_exact_matches():
    row = rl.Row(ids=[0, 1, 2, 3, 4, 5], answers=[(2, 3), (5, 5)])
    logp = torch.full((3, 6), -10.0)
    logp[0, 2] = logp[1, 3] = -0.1  # answer 0 greedy and right
    logp[2, 4], logp[2, 5] = -0.2, -1.0  # answer 1: the argmax is 4, not 5
    m = rl.answer_metrics(logp, row)
    assert (m["correct"], m["n"]) == (1, 2) and m["nll_sum"] == pytest.approx(0.1 + 1.0)
    assert rl.answer_metrics(logp, row, [1])["correct"] == 0
