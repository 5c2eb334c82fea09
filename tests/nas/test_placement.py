"""Placement search end to end on a tiny super-network with tiny tasks: outputs, budgets, baselines."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jetnas.models.convert import convert_model
from jetnas.nas.objectives import CandidateEvaluator, NormalizedObjective, SearchTask, build_search_tasks
from jetnas.nas.placement import run_placement_search
from jetnas.nas.sampling import Budget
from jetnas.nas.supernet import SuperNet, SuperNetSpec
from tests.utils import tiny_tokenizer


def tiny_search(tmp_path):
    """A 4-layer super-network (GLA linear paths), its tokenizer, and tiny lm + retrieval search tasks."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=512)).eval()
    base, _ = convert_model(teacher, ["attn"] * 4)
    supernet = SuperNet(base, SuperNetSpec("tiny", "gla", swa_window=16))
    text = tmp_path / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    tasks = build_search_tasks(["lm", "retrieval"], rows=2, lm_data=str(text), lm_tokens=256, retrieval_length=128)
    return supernet, tok, tasks


def test_placement_search_writes_heatmap_tables_and_ranked_placements(tmp_path):
    supernet, tok, tasks = tiny_search(tmp_path)
    evaluator = CandidateEvaluator(supernet, tok, tasks, batch_size=4, max_length=512)
    summary = run_placement_search(evaluator, Budget(attn=1, swa=1), beam_width=2, out_dir=tmp_path / "out")
    assert len(summary["placement"]["attn"]) == 1 and len(summary["placement"]["swa"]) == 1
    assert summary["layer_types"].count("gla") == 2
    png = (tmp_path / "out" / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    ranked = json.loads((tmp_path / "out" / "placements.json").read_text())["ranked"]
    objectives = [r["objective"] for r in ranked]
    assert objectives == sorted(objectives, reverse=True) and ranked[0]["attn"] == summary["placement"]["attn"]
    table = (tmp_path / "out" / "comparison.md").read_text()
    for row in ("searched (beam)", "uniform", "one-layer ranking", "all linear", "teacher (all attention)"):
        assert f"| {row} |" in table
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    # the references close 0 and 1 of the gap by construction
    assert comparison["all linear"]["combined"] == 0.0 and abs(comparison["teacher (all attention)"]["combined"] - 1) < 1e-9


def test_prefix_reuse_gives_the_same_scores_with_fewer_layers(tmp_path):
    # sub-networks that agree on their first layers start from the kept layer inputs: bit-identical task results
    supernet, tok, tasks = tiny_search(tmp_path)
    candidates = [("linear",) * 4, ("attn", "linear", "linear", "linear"), ("attn", "linear", "swa", "linear"),
                  ("attn", "linear", "swa", "attn"), ("linear", "swa", "linear", "linear")]
    reused = CandidateEvaluator(supernet, tok, tasks, batch_size=4, max_length=512)
    fresh = CandidateEvaluator(supernet, tok, tasks, batch_size=4, max_length=512, prefix_bytes=0)
    for cand in candidates:
        assert reused.results(cand) == fresh.results(cand)
    assert reused.layers_run < fresh.layers_run
    # per input batch, the first differing layer onwards: 4 + 4 + 2 + 1 + 4 layers instead of 5 x 4
    assert reused.layers_run * 20 == fresh.layers_run * 15
    # the texts are built and encoded once, not once per candidate
    calls = reused.tokenizer.calls
    reused.results(("swa", "linear", "linear", "linear"))
    assert calls > 0 and reused.tokenizer.calls == calls


def test_scoring_reads_the_logits_of_the_scored_positions_only(tmp_path):
    # the retrieval task scores its answers through `logits_at` (the LM head on those positions alone): the same
    # scores as from every position's logits, to float32 rounding (a product over fewer rows)
    import dataclasses

    supernet, tok, tasks = tiny_search(tmp_path)
    evaluator = CandidateEvaluator(supernet, tok, tasks, batch_size=4, max_length=512, prefix_bytes=0)
    retrieval = next(t.task for t in tasks if t.name != "lm")
    for cand in [("linear",) * 4, ("attn", "linear", "swa", "linear")]:
        lm = evaluator.language_model(cand)
        assert lm.logits_at is not None
        fast, full = retrieval.evaluate(lm), retrieval.evaluate(dataclasses.replace(lm, logits_at=None))
        assert fast.keys() == full.keys() and fast["acc"] == full["acc"]
        assert fast["target_nll"] == pytest.approx(full["target_nll"], rel=1e-6)


class _FakeEvaluator:
    """Fixed metrics per candidate (lower is better on both tasks), for the objective's arithmetic alone."""

    def __init__(self, table):
        self.table = table
        self.supernet = type("S", (), {"num_layers": 2})()
        self.tasks = [SearchTask(name, None, "nll", False) for name in ("lm", "mc")]

    def results(self, candidate):
        return {name: {"nll": value} for name, value in zip(("lm", "mc"), self.table[candidate])}


def test_a_task_counts_at_most_as_much_as_the_teacher_in_the_combined_objective():
    fake = _FakeEvaluator({("linear", "linear"): (5.0, 6.0), ("attn", "attn"): (3.0, 5.5),
                           ("attn", "linear"): (4.0, 5.5),   # half the lm gap, the mc gap closed
                           ("linear", "attn"): (4.8, 4.5)})  # 0.1 of the lm gap, "3x" the mc gap: noise
    objective = NormalizedObjective(fake)
    assert objective.per_task(("linear", "attn")) == pytest.approx({"lm": 0.1, "mc": 3.0})  # tables keep it raw
    assert objective(("attn", "linear"))[0] == pytest.approx(0.75)
    assert objective(("linear", "attn"))[0] == pytest.approx(0.55)
    assert objective(("attn", "attn"))[0] == pytest.approx(1.0)


class _FakeRetrievalEvaluator:
    """A retrieval task whose accuracy no one-layer network moves from all-linear's, and whose answer NLL does."""

    def __init__(self):
        self.supernet = type("S", (), {"num_layers": 2})()
        self.tasks = [SearchTask("retrieval", None, "acc", True, "target_nll", False)]
        self.table = {("linear", "linear"): (0.0, 6.0), ("attn", "attn"): (1.0, 0.1),
                      ("attn", "linear"): (0.0, 3.0), ("linear", "attn"): (0.0, 5.0)}

    def results(self, candidate):
        acc, nll = self.table[candidate]
        return {"retrieval": {"acc": acc, "target_nll": nll}}


def test_a_task_no_candidate_moves_ranks_by_its_secondary_metric():
    fake = _FakeRetrievalEvaluator()
    objective = NormalizedObjective(fake)
    one_layer = [("attn", "linear"), ("linear", "attn")]
    assert objective(("attn", "linear"))[0] == objective(("linear", "attn"))[0] == 0.0  # accuracy: no signal
    assert objective.fall_back_where_flat(one_layer) == ["retrieval"]
    task = fake.tasks[0]
    assert (task.metric, task.higher_is_better, task.secondary) == ("target_nll", False, "acc")
    assert objective.per_task(("attn", "linear"))["retrieval"] == pytest.approx(3.0 / 5.9)
    assert objective(("attn", "linear"))[0] > objective(("linear", "attn"))[0] > 0
    # a task some candidate moves keeps its metric
    fake.table[("linear", "attn")] = (0.5, 5.0)
    task.metric, task.secondary, task.higher_is_better, task.secondary_higher_is_better = "acc", "target_nll", True, False
    assert NormalizedObjective(fake).fall_back_where_flat(one_layer) == []
