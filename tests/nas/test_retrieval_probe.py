"""The windowed-teacher retrieval probe of the placement search: what each layer runs, its rows, its evaluator, the
recipe fields that switch it on, and that only retrieval tasks go through it. Tiny random models on CPU."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jetnas.evaluation.tasks import RetrievalTask
from jetnas.models.convert import convert_model
from jetnas.nas.objectives import CandidateEvaluator, ProbedEvaluator, build_search_tasks
from jetnas.nas.placement import run_placement_search
from jetnas.nas.probe import PROBE_SEED, ProbeRetrievalTask, WindowedTeacher, fact_distance, probe_task
from jetnas.nas.sampling import Budget
from jetnas.nas.supernet import SuperNet, SuperNetSpec
from jetnas.runner.recipes import PlacementRecipe
from tests.ops.test_attention_sinks import sink_reference
from tests.utils import tiny_tokenizer


def tiny_supernet(layers=4, swa_window=6):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=512)).eval()
    base, _ = convert_model(teacher, ["attn"] * layers)
    return SuperNet(base, SuperNetSpec("tiny", "gla", swa_window=swa_window)).eval(), tok


def tiny_tasks(tmp_path, rows=2, length=128):
    text = tmp_path / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    return build_search_tasks(["lm", "retrieval"], rows=rows, lm_data=str(text), lm_tokens=256,
                              retrieval_length=length)


def test_layers_outside_the_set_run_windowed_teacher_attention_with_sinks_and_the_set_full():
    net, _ = tiny_supernet()
    probe = WindowedTeacher(net.base, window=4, sinks=2, swa_window=net.spec.swa_window)
    choice = ("linear", "attn", "swa", "linear")
    T = 20
    ids = torch.randint(0, 200, (2, T))
    inputs, outputs = {}, {}
    hooks = []
    for i, layer in enumerate(net.base.model.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, o)))
        hooks.append(layer.self_attn.o_proj.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, a[0])))
    with torch.no_grad():
        probe.run_layers(ids, choice)
    for h in hooks:
        h.remove()
    model = net.base.model
    cos, sin = model.rotary_emb(inputs[0], torch.arange(T).expand(2, T))
    # layer -> (window, sinks) it must have run with: linear -> the probe's window; swa -> max(probe's, supernet's)
    expected = {0: (4, 2), 1: (T, 0), 2: (6, 2), 3: (4, 2)}
    for i, (window, sinks) in expected.items():
        attn = model.layers[i].self_attn
        q, k, v = (x.double() for x in attn.project(inputs[i], cos, sin))
        got = outputs[i].view(2, T, 4, 8).double()
        # float32 forward against a float64 brute force: 1e-5 is float32 rounding over 8-wide dot products
        assert (got - sink_reference(q, k, v, window, sinks)).abs().max() < 1e-5, f"layer {i}"
        other = (T, 0) if window != T else (4, 2)
        assert (got - sink_reference(q, k, v, *other)).abs().max() > 1e-3, f"layer {i} ran {other} too"


def test_all_full_is_the_teacher_and_the_linear_paths_are_never_used():
    net, _ = tiny_supernet()
    probe = WindowedTeacher(net.base, window=4, sinks=2)
    ids = torch.randint(0, 200, (2, 24))
    with torch.no_grad():
        assert torch.equal(probe.run_layers(ids, ("attn",) * 4)[0], net.run_layers(ids, ("attn",) * 4)[0])
        before = probe.run_layers(ids, ("linear",) * 4)[0]
        for p in net.linear.parameters():
            p.add_(1.0)
        assert torch.equal(probe.run_layers(ids, ("linear",) * 4)[0], before)
    # prefix restart: layers 2.. from the all-windowed states give the one-shot forward's logits
    with torch.no_grad():
        _, states = probe.run_layers(ids, ("linear",) * 4)
        cand = ("linear", "linear", "attn", "linear")
        assert torch.equal(probe.run_layers(ids, cand, start=2, hidden=states[2])[0], probe.run_layers(ids, cand)[0])


@pytest.mark.parametrize("window,sinks", [(0, 4), (8, -1), (True, 4)], ids=["window0", "negative-sinks", "bool"])
def test_bad_probe_arguments_named(window, sinks):
    net, _ = tiny_supernet()
    with pytest.raises(ValueError, match="the probe's"):
        WindowedTeacher(net.base, window, sinks)


def test_probe_rows_are_not_the_evaluations_and_their_facts_lie_beyond_the_window():
    from jetnas.evaluation.scoring import LanguageModel

    tok = tiny_tokenizer()
    lm = LanguageModel(lambda ids, mask: None, tok, 512, 4)
    evaluation = RetrievalTask("needle", 256, n=12)  # what `parse_task("retrieval:needle@256")` builds: seed 0
    assert evaluation.seed == 0 and PROBE_SEED != 0
    probe = probe_task(evaluation, window=64)
    assert isinstance(probe, ProbeRetrievalTask) and probe.seed == PROBE_SEED and probe.far == 64 + 8
    eval_rows, probe_rows = evaluation.make_rows(lm), probe.make_rows(lm)
    assert len(probe_rows) == 12
    assert not {r[-1][0] for r in eval_rows} & {r[-1][0] for r in probe_rows}  # no needle value in common
    assert all(fact_distance(r, lm) > 72 for r in probe_rows)
    assert any(fact_distance(r, lm) <= 72 for r in eval_rows)  # the filter has something to remove
    assert probe.make_rows(lm) is probe_rows  # built once
    with pytest.raises(ValueError, match="probe rows have their fact more than"):
        ProbeRetrievalTask("needle", 256, n=2, seed=PROBE_SEED, far=10_000, max_draws=5).make_rows(lm)


def test_probed_evaluator_scores_retrieval_on_the_probe_and_the_rest_on_the_supernet(tmp_path):
    net, tok = tiny_supernet()
    tasks = tiny_tasks(tmp_path)
    probed = ProbedEvaluator(net, tok, tasks, window=16, sinks=2, batch_size=4, max_length=512)
    names = [t.name for t in probed.tasks]
    assert names == ["lm", "retrieval:needle@128 (probe w16+2)"]
    assert isinstance(probed.probed[0].task, ProbeRetrievalTask) and probed.probed[0].task.seed == PROBE_SEED
    plain = CandidateEvaluator(net, tok, tiny_tasks(tmp_path), batch_size=4, max_length=512)
    direct = CandidateEvaluator(WindowedTeacher(net.base, 16, 2, net.spec.swa_window), tok,
                                [probed.probed[0]], batch_size=4, max_length=512, prefix_bytes=0)
    for cand in [("linear",) * 4, ("attn", "linear", "linear", "linear"), ("linear", "swa", "attn", "linear")]:
        res = probed.results(cand)
        assert res["lm"] == plain.results(cand)["lm"]  # the super-network's task, as without the probe
        assert res[names[1]] == direct.results(cand)[names[1]]
    # retrieval ignores the linear paths; the lm task reads them
    with torch.no_grad():
        for p in net.linear.parameters():
            p.mul_(0.5)
    again = ProbedEvaluator(net, tok, tiny_tasks(tmp_path), window=16, sinks=2, batch_size=4, max_length=512)
    res = again.results(("linear",) * 4)
    assert res[names[1]] == probed.results(("linear",) * 4)[names[1]]
    assert res["lm"] != probed.results(("linear",) * 4)["lm"]
    with pytest.raises(ValueError, match="the retrieval probe scores retrieval tasks; none among"):
        ProbedEvaluator(net, tok, [t for t in tiny_tasks(tmp_path) if t.name == "lm"], window=16)


def test_the_probe_reuses_layer_prefixes_with_identical_results(tmp_path):
    net, tok = tiny_supernet()
    reused = ProbedEvaluator(net, tok, tiny_tasks(tmp_path), window=16, sinks=2, batch_size=4, max_length=512)
    fresh = ProbedEvaluator(net, tok, tiny_tasks(tmp_path), window=16, sinks=2, batch_size=4, max_length=512,
                            prefix_bytes=0)
    one_layer = [("linear",) * 4] + [tuple("attn" if j == i else "linear" for j in range(4)) for i in range(4)]
    for cand in one_layer:
        assert reused.results(cand) == fresh.results(cand)
    batches = fresh.probe.layers_run // 20  # 5 candidates x 4 layers per input batch
    # {i} after {i - 1} starts at layer i - 1, where they differ: 4 + 4 + 4 + 3 + 2 layers per batch
    assert reused.probe.layers_run == batches * (4 + 4 + 4 + 3 + 2)


def test_the_search_writes_the_probe_into_its_outputs_and_ranks_its_row(tmp_path):
    net, tok = tiny_supernet()
    evaluator = ProbedEvaluator(net, tok, tiny_tasks(tmp_path, length=160), window=16, sinks=2, batch_size=4,
                                max_length=512)
    summary = run_placement_search(evaluator, Budget(attn=1, swa=0), beam_width=1, out_dir=tmp_path / "out")
    placements = json.loads((tmp_path / "out" / "placements.json").read_text())
    assert placements["retrieval_probe"]["window"] == 16 and placements["retrieval_probe"]["seed"] == PROBE_SEED
    assert placements["tasks"] == ["lm", "retrieval:needle@160 (probe w16+2)"]
    assert "scored by the windowed-teacher probe" in (tmp_path / "out" / "comparison.md").read_text()
    assert summary["evaluations"] == evaluator.evaluations == 4 + 2  # one-layer networks and the two references


def _recipe(**kw):
    return PlacementRecipe(supernet="runs/x", **kw)


def test_recipe_probe_fields():
    assert (_recipe().retrieval_probe, _recipe().probe_window, _recipe().probe_sinks) == ("none", None, None)
    on = _recipe(retrieval_probe="windowed")
    assert (on.probe_window, on.probe_sinks) == (512, 4)
    assert _recipe(retrieval_probe="windowed", probe_window=256, probe_sinks=0).probe_window == 256
    with pytest.raises(ValueError, match="--retrieval-probe must be one of none, windowed"):
        _recipe(retrieval_probe="teacher")
    with pytest.raises(ValueError, match="--probe-window must be >= 1"):
        _recipe(retrieval_probe="windowed", probe_window=0)
    with pytest.raises(ValueError, match="--probe-sinks must be >= 0"):
        _recipe(retrieval_probe="windowed", probe_sinks=-1)
    with pytest.raises(ValueError, match="--probe-window 256 given without --retrieval-probe windowed"):
        _recipe(probe_window=256)
    with pytest.raises(ValueError, match="scores retrieval tasks, and --tasks 'lm' has none"):
        _recipe(retrieval_probe="windowed", tasks="lm")


@pytest.mark.parametrize("probe", ["none", "windowed"])
def test_run_placement_uses_the_probe_only_when_asked(probe, tmp_path, monkeypatch):
    import jetnas.nas.placement
    import jetnas.nas.supernet
    from jetnas.runner.supernet import run_placement

    net, tok = tiny_supernet()
    text = tmp_path / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    monkeypatch.setattr(jetnas.nas.supernet, "load_supernet", lambda *a, **k: (net, tok, {"heldout": str(text)}))
    seen = {}

    def fake_search(evaluator, budget, beam_width, out, linear_type):
        seen["evaluator"] = evaluator
        return {"placement": {"attn": [0], "swa": []}, "layer_types": "attn,gla,gla,gla", "objective": 0.0,
                "uniform_objective": 0.0, "one_layer_objective": 0.0, "evaluations": 0, "layer_passes": 0,
                "outputs": {}}

    monkeypatch.setattr(jetnas.nas.placement, "run_placement_search", fake_search)
    kw = {"probe_window": 32} if probe == "windowed" else {}
    run_placement(PlacementRecipe(supernet=str(tmp_path), budget="attn=1,swa=0", tasks="lm,retrieval:needle@128",
                                  out_dir=str(tmp_path / "out"), device="cpu", retrieval_probe=probe, **kw))
    evaluator = seen["evaluator"]
    if probe == "none":
        assert type(evaluator) is CandidateEvaluator
        assert [t.name for t in evaluator.tasks] == ["lm", "retrieval:needle@128"]
    else:
        assert isinstance(evaluator, ProbedEvaluator)
        assert [t.name for t in evaluator.network.tasks] == ["lm"]
        assert [t.name for t in evaluator.probed] == ["retrieval:needle@128 (probe w32+4)"]
        assert (evaluator.probe_net.window, evaluator.probe_net.sinks) == (32, 4)
