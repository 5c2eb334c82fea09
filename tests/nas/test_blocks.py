"""PostNAS steps 2-4 bookkeeping with fake runs (candidate syntax, JetBlock variants, placements, reuse of finished
candidates, ranking, shapes at a fixed state size, the tolerance rule), then `jetnas search blocks` and `jetnas
search hardware` end to end on CPU with a tiny teacher on disk and a fake decode-throughput function."""

import json
import sys
import types

import pytest

from jetnas.models.layer_types import BlockSpec as BlockCandidate
from jetnas.models.layer_types import parse_block as parse_candidate
from jetnas.models.layer_types import resolve_layer_types
from jetnas.nas.blocks import run_block_search
from jetnas.nas.candidates import parse_candidates, run_candidates
from jetnas.nas.hardware import (
    BlockShape,
    run_hardware_search,
    shape_candidates,
    shape_from_kwargs,
    shape_name,
    shape_options,
)
from jetnas.nas.placement import read_placement
from jetnas.nas.ranking import TaskMetric, candidate_scores, rank

# ---------------------------------------------------------------------------------------------------------------
# candidates


def test_candidates_plain_blocks_variants_and_options():
    cands = parse_candidates("gdn,gla,jet,jet-dyn-qk,jet:qk_conv=dynamic,v_conv=static,jet-static-qk:num_heads=4")
    assert [c.name for c in cands] == ["gdn", "gla", "jet", "jet-dyn-qk", "jet:qk_conv=dynamic+v_conv=static",
                                       "jet-static-qk:num_heads=4"]
    assert [c.block_type for c in cands] == ["gdn", "gla", "jet", "jet", "jet", "jet"]
    assert cands[0].block_config() == {} and cands[2].block_config() == {}
    assert cands[3].kwargs == cands[4].kwargs == {"qk_conv": "dynamic", "v_conv": "static"}
    assert cands[5].block_config() == {"jet": {"qk_conv": "static", "num_heads": 4}}
    assert cands[4].slug == "jet-qk_conv-dynamic-v_conv-static"
    gate = parse_candidate("jet:use_output_gate=false+use_decay=true+expand_v=1.5")
    assert gate.kwargs == {"use_output_gate": False, "use_decay": True, "expand_v": 1.5}
    assert parse_candidate("gla:gate_low_rank_dim=8").kwargs == {"gate_low_rank_dim": 8}
    assert parse_candidates(["gdn", "jet:qk_conv=static"])[1].kwargs == {"qk_conv": "static"}


@pytest.mark.parametrize("spec, match", [
    ("rwkv9", "unknown block candidate 'rwkv9'"),
    ("attn", "'attn' is softmax attention"),
    ("jet:heads=4", "jet has no option 'heads'"),
    ("gdn:qk_conv=dynamic", "gdn has no option 'qk_conv'"),
    ("jet:qk_conv=wavelet", r"qk_conv='wavelet' must be one of none, static, dynamic"),
    ("jet:use_decay=maybe", "use_decay='maybe' must be true or false"),
    ("jet:qk_conv", "option 'qk_conv' is not KEY=VALUE"),
    ("gdn,gdn", r"\['gdn'\] are listed twice"),
    ("v_conv=static,gdn", "follows no TYPE:OPTIONS entry"),
    ("", "no block candidates"),
], ids=["unknown", "attention", "jet-key", "gdn-key", "conv-kind", "bool", "no-value", "twice", "dangling", "empty"])
def test_bad_candidates_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_candidates(spec)


def test_layer_types_with_variants():
    types, config = resolve_layer_types("attn,jet-dyn-qk*2,swa", 4)
    assert types == ["attn", "jet", "jet", "swa"] and config == {"jet": {"qk_conv": "dynamic", "v_conv": "static"}}
    types, config = resolve_layer_types("attn,jet:qk_conv=dynamic,v_conv=static,gdn,jet:v_conv=static+qk_conv=dynamic",
                                        4)
    assert types == ["attn", "jet", "gdn", "jet"] and config["jet"] == {"qk_conv": "dynamic", "v_conv": "static"}
    assert resolve_layer_types("jet-nemotron-2b", 28)[0].count("attn") == 2
    with pytest.raises(ValueError, match="mix two variants of 'jet'"):
        resolve_layer_types("jet,jet-dyn-qk", 2)
    with pytest.raises(ValueError, match="give 3 layers but the model has 4"):
        resolve_layer_types("attn,jet*2", 4)


def test_design_options_reach_the_jetblock_and_its_config():
    """The variants are real: a config with the options builds JetBlocks with those convolutions."""
    from jetnas.layers.jet import JetBlock
    from jetnas.models import JetNemotronForCausalLM
    from tests.utils import tiny_config

    types, config = resolve_layer_types("attn,jet-dyn-qk", 2)
    cfg = tiny_config(types, efficient_attention_config={"jet": {"num_heads": 2, "head_dim": 8, **config["jet"]}})
    block = JetNemotronForCausalLM(cfg).model.layers[1].self_attn
    assert isinstance(block, JetBlock) and (block.qk_conv, block.v_conv) == ("dynamic", "static")
    assert hasattr(block, "q_dynamic_conv1d") and hasattr(block, "v_conv1d") and not hasattr(block, "dynamic_conv1d")


# ---------------------------------------------------------------------------------------------------------------
# placements


def write_placements(tmp_path, window=16):
    """A placements.json laid out as `jetnas search placement` writes it, inside its super-network directory."""
    (tmp_path / "supernet.json").write_text(json.dumps({"spec": {"teacher": "t", "swa_window": window}}))
    path = tmp_path / "search-1attn-1swa" / "placements.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"budget": "attn=1,swa=1", "ranked": [
        {"rank": 1, "attn": [2], "swa": [0], "objective": [0.9], "layer_types": "swa,gla,attn,gla"},
        {"rank": 2, "attn": [1], "swa": [0], "objective": [0.5], "layer_types": "swa,attn,gla,gla"}]}))
    return path


def test_read_placement_from_a_search_result_or_layer_types(tmp_path):
    path = write_placements(tmp_path)
    placement = read_placement(str(path), 4)
    assert placement.choices == ["swa", "linear", "attn", "linear"] and placement.swa_window == 16
    assert placement.layer_types("gdn") == ["swa", "gdn", "attn", "gdn"]
    assert placement.describe()["budget"] == "attn=1,swa=1"
    assert read_placement(str(path), 4, swa_window=32).swa_window == 32
    plain = read_placement("attn,jet,jet,attn", 4)
    assert plain.choices == ["attn", "linear", "linear", "attn"] and plain.swa_window is None
    with pytest.raises(ValueError, match="but no window size"):
        read_placement("attn,swa,jet,jet", 4)
    # the caller's documented default (the teacher's) fills a window no one gave, and says it did; it never
    # overrides one given or found in the file
    filled = read_placement("attn,swa,jet,jet", 4, default_window=256)
    assert filled.swa_window == 256 and filled.describe()["swa_window_is_default"] is True
    assert read_placement("attn,swa,jet,jet", 4, swa_window=64, default_window=256).swa_window == 64
    assert read_placement(str(path), 4, default_window=256).swa_window == 16
    assert "swa_window_is_default" not in read_placement("attn,jet,jet,attn", 4, default_window=256).describe()
    with pytest.raises(ValueError, match="has 4 layers but the teacher has 6"):
        read_placement(str(path), 6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_placement(str(tmp_path / "missing.json"), 4)


# ---------------------------------------------------------------------------------------------------------------
# running candidates, ranking


METRICS = [TaskMetric("lm", "nll", False), TaskMetric("retrieval", "acc", True)]


def fake_record(nll, acc, decode=1000.0, train=500.0):
    return {"tasks": {"lm": {"nll": nll}, "retrieval": {"acc": acc}}, "decode_tokens_per_s": decode,
            "train_tokens_per_s": train, "params": 1_000_000, "trainable_params": 400_000,
            "cache_bytes_per_sequence": 2_000_000}


def test_scores_and_ranking():
    records = {"a": fake_record(3.0, 0.2), "b": fake_record(2.0, 0.4), "c": fake_record(2.5, 0.4, decode=2000)}
    scores = candidate_scores(records, METRICS)
    assert scores == {"a": 0.0, "b": 1.0, "c": 0.75}
    assert rank(records, scores) == ["b", "c", "a"]
    # a task on which every candidate ties cannot rank; equal scores go to the faster decoder
    tied = {"a": fake_record(2.0, 0.5, decode=900), "b": fake_record(2.0, 0.5, decode=1100)}
    assert candidate_scores(tied, METRICS) == {"a": 0.0, "b": 0.0}
    assert rank(tied, candidate_scores(tied, METRICS)) == ["b", "a"]


def test_finished_candidates_are_reused_and_stale_ones_rerun(tmp_path):
    calls = []

    def run(cand, cdir):
        calls.append(cand.name)
        assert cdir == tmp_path / "candidates" / cand.slug and cdir.is_dir()
        (cdir / "marker").write_text("trained")
        return fake_record(2.0 + len(cand.name), 0.5)

    cands = parse_candidates("gdn,jet-dyn-qk")
    first = run_candidates(cands, run, tmp_path, {"steps": 10})
    assert calls == ["gdn", "jet-dyn-qk"]
    assert first["jet-dyn-qk"]["options"] == {"qk_conv": "dynamic", "v_conv": "static"}
    again = run_candidates(cands, run, tmp_path, {"steps": 10})
    assert calls == ["gdn", "jet-dyn-qk"] and again == first  # nothing ran
    run_candidates(cands + parse_candidates("gla"), run, tmp_path, {"steps": 10})
    assert calls[-1] == "gla" and len(calls) == 3  # only the new one ran
    run_candidates(cands[:1], run, tmp_path, {"steps": 20})  # a different recipe: the old result is stale
    assert calls[-1] == "gdn" and len(calls) == 4


def test_an_interrupted_candidate_resumes_in_its_directory(tmp_path):
    cand = parse_candidate("gdn")

    def crash(c, cdir):
        (cdir / "partial-work").write_text("half trained")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_candidates([cand], crash, tmp_path, {"steps": 10})

    def resume(c, cdir):
        assert (cdir / "partial-work").exists()  # left for the trainer to resume from
        return fake_record(2.0, 0.5)

    run_candidates([cand], resume, tmp_path, {"steps": 10})

    def fresh(c, cdir):
        assert not (cdir / "partial-work").exists()
        return fake_record(2.0, 0.5)

    (tmp_path / "candidates" / "gdn" / "result.json").unlink()
    (tmp_path / "candidates" / "gdn" / "partial-work").write_text("half trained")
    run_candidates([cand], fresh, tmp_path, {"steps": 99})  # another recipe's unfinished run is cleared


def test_block_search_writes_table_json_and_figure(tmp_path):
    results = {"gdn": fake_record(2.2, 0.3, decode=1500), "jet": fake_record(2.0, 0.5, decode=1400),
               "retnet": fake_record(2.6, 0.1, decode=1600)}
    summary = run_block_search(parse_candidates("gdn,jet,retnet"), lambda c, d: results[c.name], METRICS, tmp_path,
                               {"steps": 1}, reference=lambda d: fake_record(1.8, 0.9, decode=300),
                               context_length=4096)
    assert summary["best"] == "jet" and summary["ranked"] == ["jet", "gdn", "retnet"]
    assert summary["block_type"] == "jet" and summary["options"] == {}
    table = (tmp_path / "blocks.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[2].strip() for r in rows] == ["`jet`", "`gdn`", "`retnet`", "teacher (full attention)"]
    assert "decode tok/s @ 4096" in table and "lm nll ↓" in table
    saved = json.loads((tmp_path / "blocks.json").read_text())
    assert saved["ranked"] == summary["ranked"] and saved["teacher"]["decode_tokens_per_s"] == 300
    assert (tmp_path / "blocks.png").stat().st_size > 0
    assert (tmp_path / "teacher" / "result.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# hardware-aware search


def test_shapes_at_the_original_state_size():
    original = BlockShape(12, 96, 256)  # Jet-Nemotron-2B
    shapes = shape_candidates(original)
    assert original in shapes and len(shapes) > 3
    assert {s.state_numbers for s in shapes} == {12 * 96 * 256}
    assert all(s.head_v_dim % 16 == 0 for s in shapes)
    capped = shape_candidates(original, max_candidates=4)
    assert len(capped) == 4 and original in capped and set(capped) <= set(shapes)
    assert shape_candidates(original, max_candidates=1) == [original]
    # another budget: the shapes are at that size, and the original comes along as the throughput reference
    other = shape_candidates(original, state_numbers=8 * 64 * 256, heads=[4, 8], key_dims=[64, 128])
    assert original in other and {s.state_numbers for s in other if s != original} == {8 * 64 * 256}
    # a tiny teacher: the original's own head count, key dim and small value dim are searched too
    tiny = shape_candidates(BlockShape(4, 8, 16), heads=[1, 2], key_dims=[4, 8])
    assert BlockShape(4, 8, 16) in tiny and BlockShape(2, 8, 32) in tiny and BlockShape(4, 4, 32) in tiny
    with pytest.raises(ValueError, match="max_candidates must be >= 1"):
        shape_candidates(original, max_candidates=0)


@pytest.mark.parametrize("block_type, kwargs", [
    ("jet", dict(num_heads=12, head_k_dim=96, head_v_dim=256)),
    ("gdn", dict(num_heads=8, head_k_dim=64, head_v_dim=128)),
    ("mamba2", dict(num_heads=16, head_dim=64, state_size=128)),
])
def test_shape_options_build_that_shape(block_type, kwargs):
    from jetnas.models import JetNemotronConfig

    shape = shape_from_kwargs(block_type, kwargs, hidden_size=1536)
    types = ["attn", block_type]
    config = JetNemotronConfig(hidden_size=1536, num_hidden_layers=2, block_types=types,
                               efficient_attention_config={block_type: shape_options(block_type, shape)})
    assert shape_from_kwargs(block_type, config.block_kwargs(block_type), 1536) == shape


def hardware_fakes(speeds: dict, accs: dict):
    """A fake `run`: per shape name, decode throughput and retrieval accuracy (lm loss fixed)."""
    def run(cand, cdir):
        return {**fake_record(2.0, accs[cand.name], decode=speeds[cand.name]), "params": 100 * len(cand.name)}
    return run


def test_the_tolerance_rule_picks_the_most_accurate_fast_enough_shape(tmp_path):
    original, fast, slow, good = BlockShape(12, 96, 256), BlockShape(8, 96, 384), BlockShape(16, 96, 192), \
        BlockShape(6, 128, 384)
    shapes = [original, fast, slow, good]
    assert len({s.state_numbers for s in shapes}) == 1
    speeds = {"H12-K96-V256": 1000.0, "H8-K96-V384": 1020.0, "H16-K96-V192": 980.0, "H6-K128-V384": 995.0}
    accs = {"H12-K96-V256": 0.50, "H8-K96-V384": 0.40, "H16-K96-V192": 0.70, "H6-K128-V384": 0.60}
    summary = run_hardware_search(parse_candidate("jet"), shapes, original, hardware_fakes(speeds, accs),
                                  [TaskMetric("retrieval", "acc")], tmp_path, {"steps": 1}, tolerance=0.01)
    # the most accurate shape is 2% slower than the original: outside 1%; the next one is within it
    assert summary["chosen"] == vars(good) and summary["chosen_name"] == "H6-K128-V384"
    assert summary["options"] == {"num_heads": 6, "head_dim": 128, "expand_v": 3.0}
    table = (tmp_path / "hardware.md").read_text()
    assert "| 128 | 384 | 6 |" in table and "**chosen**" in table and "below floor" in table
    saved = json.loads((tmp_path / "hardware.json").read_text())
    assert saved["floor_tokens_per_s"] == pytest.approx(990.0)
    assert [r["name"] for r in saved["rows"] if r["chosen"]] == ["H6-K128-V384"]
    assert (tmp_path / "hardware.png").stat().st_size > 0
    # with a looser tolerance the most accurate shape qualifies (its finished runs are reused)
    loose = run_hardware_search(parse_candidate("jet"), shapes, original, hardware_fakes(speeds, accs),
                                [TaskMetric("retrieval", "acc")], tmp_path, {"steps": 1}, tolerance=0.05)
    assert loose["chosen"] == vars(slow)


def test_the_floor_the_text_states_is_the_floor_the_rule_applied(tmp_path):
    """The quickstart's case: three decode measurements per shape spread 6% while the tolerance is 1%. A shape 2.7%
    slower is within the noise, so the floor widens to the spread; the chosen shape is never below the floor that
    hardware.md states, and every shape the table marks below it is slower than it."""
    import re

    original, other = BlockShape(9, 64, 64), BlockShape(6, 96, 64)
    runs = {"H9-K64-V64": [40.2, 42.6, 42.8], "H6-K96-V64": [39.9, 41.5, 42.4]}

    def run(cand, cdir):
        middle = sorted(runs[cand.name])[1]
        record = fake_record(10.7 if cand.name == "H6-K96-V64" else 11.7, 0.0, decode=middle)
        return {**record, "decode": {"decode_tokens_per_s_runs": runs[cand.name]}}

    summary = run_hardware_search(parse_candidate("gdn"), [original, other], original, run, METRICS, tmp_path,
                                  {"steps": 1}, tolerance=0.01)
    text = (tmp_path / "hardware.md").read_text()
    floor = float(re.search(r"at least ([\d,.]+) tok/s", text).group(1).replace(",", ""))
    saved = json.loads((tmp_path / "hardware.json").read_text())
    assert saved["margin"] == pytest.approx((42.8 - 40.2) / 42.6)
    assert floor == pytest.approx(saved["floor_tokens_per_s"], rel=1e-3)
    assert "widened to the measurements' largest spread, 6.1%: a smaller difference is noise" in text
    chosen = next(r for r in saved["rows"] if r["chosen"])
    assert summary["chosen_name"] == "H6-K96-V64" and chosen["decode_tokens_per_s"] >= floor
    assert "below floor" not in text
    # measured once, the tolerance alone decides, and the text says the noise is unknown
    single = run_hardware_search(parse_candidate("gdn"), [original, other], original,
                                 lambda c, d: fake_record(1.0, 0.0, decode=sorted(runs[c.name])[1]), METRICS,
                                 tmp_path / "single", {"steps": 1}, tolerance=0.01)
    text = (tmp_path / "single" / "hardware.md").read_text()
    assert single["chosen_name"] == "H9-K64-V64" and "one measurement per shape" in text and "below floor" in text


def test_a_budget_other_than_the_originals(tmp_path):
    original, a, b = BlockShape(4, 8, 16), BlockShape(2, 8, 64), BlockShape(4, 8, 32)
    speeds = {"H4-K8-V16": 1000.0, "H2-K8-V64": 999.0, "H4-K8-V32": 1000.0}
    accs = {"H4-K8-V16": 0.9, "H2-K8-V64": 0.3, "H4-K8-V32": 0.5}
    summary = run_hardware_search(parse_candidate("jet"), [original, a, b], original, hardware_fakes(speeds, accs),
                                  [TaskMetric("retrieval", "acc")], tmp_path, {"steps": 1}, state_numbers=1024)
    # the original is the most accurate but not at the budget: only the throughput reference
    assert summary["chosen"] == vars(b) and summary["state_numbers"] == 1024
    with pytest.raises(ValueError, match="must be among the shapes searched"):
        run_hardware_search(parse_candidate("jet"), [a, b], original, hardware_fakes(speeds, accs),
                            [TaskMetric("retrieval", "acc")], tmp_path, {"steps": 1})


# ---------------------------------------------------------------------------------------------------------------
# end to end through the CLI


def fake_decode_throughput(model, batch_size, context_length, new_tokens=32, chunk_size=None, device=None):
    """Stands in for jetnas.bench.measure.replicated_decode_throughput (same arguments): a deterministic function of the
    model's size, so tests do not depend on timing."""
    params = sum(p.numel() for p in model.parameters())
    return {"decode_tokens_per_s": 1e9 / params, "prefill_tokens_per_s": 4e9 / params,
            "cache_bytes_per_sequence": model.cache_bytes(context_length), "batch_size": batch_size}


def test_matched_shapes_give_jet_and_mamba2_the_attention_shape_unless_the_candidate_sets_one():
    from jetnas.nas.candidates import matched_shape, parse_candidates

    jet, mamba2, gdn, own = [matched_shape(c) for c in parse_candidates("jet-static-qk,mamba2,gdn,jet:expand_v=2")]
    assert jet.kwargs == {"qk_conv": "static", "expand_v": 1.0} and jet.name == "jet-static-qk"
    assert mamba2.kwargs == {"expand": 1}
    assert gdn.kwargs == {} and own.kwargs == {"expand_v": 2}
    # written out, each reads back as the block it is, the matched shape included (its name alone would not)
    for c in (jet, mamba2, gdn, own, parse_candidate("jet:use_decay=false+num_heads=4+qk_conv=dynamic")):
        again = parse_candidate(c.written())
        assert (again.block_type, again.kwargs) == (c.block_type, c.kwargs), c.written()
    assert jet.written() == "jet-static-qk:qk_conv=static+expand_v=1.0" and gdn.written() == "gdn"


def test_decode_throughput_is_the_median_of_repeated_measurements():
    from jetnas.runner.candidates import median_run

    runs = [{"decode_tokens_per_s": v, "i": i} for i, v in enumerate([300.0, 100.0, 200.0, 250.0])]
    assert median_run(runs) == {"decode_tokens_per_s": 200.0, "i": 2,
                                "decode_tokens_per_s_runs": [300.0, 100.0, 200.0, 250.0]}
    assert median_run(runs[:1])["i"] == 0


def test_repeated_measurements_warm_up_before_the_first_only():
    from jetnas.runner.candidates import repeated_measurements

    calls = []

    def with_warmup(model, batch_size, warmup=True):
        calls.append(warmup)
        return {"decode_tokens_per_s": float(len(calls))}

    runs = repeated_measurements(with_warmup, None, 3, batch_size=2)
    assert calls == [True, False, False] and [r["decode_tokens_per_s"] for r in runs] == [1.0, 2.0, 3.0]
    # a plugin's measurement without the argument is called as before
    def plugin(model, batch_size):
        calls.append(batch_size)
        return {"decode_tokens_per_s": 1.0}

    calls.clear()
    assert len(repeated_measurements(plugin, None, 2, batch_size=5)) == 2 and calls == [5, 5]


def fake_plugin() -> dict:
    """The `jetnas.measures` entry points of an installed plugin whose `fake` is `fake_decode_throughput`."""
    from importlib.metadata import EntryPoint

    return {"fake": EntryPoint("fake", "tests.nas.test_blocks:fake_decode_throughput", "jetnas.measures")}


def test_measures_are_named_never_imported_from_a_path(monkeypatch):
    from jetnas.runner import measures

    fake = types.ModuleType("jetnas.bench.measure")
    fake.replicated_decode_throughput = fake_decode_throughput
    monkeypatch.setitem(sys.modules, "jetnas.bench.measure", fake)
    assert measures.resolve_measure("replicated", required=True) is fake_decode_throughput
    assert measures.resolve_measure("none", required=False) is None
    with pytest.raises(ValueError, match="--measure none is not allowed"):
        measures.resolve_measure("none", required=True)
    # an import path is not a name: a recipe cannot make jetnas import and call a module of its choosing
    with pytest.raises(ValueError, match="'tests.nas.test_blocks:fake_decode_throughput' is not a known decode "
                                         "measurement; known: replicated, none"):
        measures.resolve_measure("tests.nas.test_blocks:fake_decode_throughput", required=False)
    # a plugin's measurement, through the jetnas.measures entry-point group; one registered in-process
    monkeypatch.setattr(measures, "_entry_points", fake_plugin)
    assert measures.measure_names() == ["replicated", "none", "fake"]
    assert measures.resolve_measure("fake", required=True) is fake_decode_throughput
    monkeypatch.setattr(measures, "_REGISTERED", {})
    measures.register_measure("mine", len)
    assert measures.resolve_measure("mine", required=True) is len and measures.measure_name(len) == "builtins:len"
    with pytest.raises(ValueError, match="'none' is built in"):
        measures.register_measure("none", len)
    # the recipes check the name before anything loads
    from jetnas.commands.stages import search_blocks

    with pytest.raises(ValueError, match="'os:system' is not a known decode measurement"):
        search_blocks("teacher", "attn,jet", measure="os:system")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.utils import _CORPUS, save_tiny_llama

    root = tmp_path_factory.mktemp("blocks")
    save_tiny_llama(root / "teacher")
    (root / "train.txt").write_text(_CORPUS * 12)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JETNAS_CACHE", str(root / "cache"))
        # the searches measure with a plugin's function (deterministic, no timing): `--measure fake`
        from jetnas.runner import measures

        mp.setattr(measures, "_entry_points", fake_plugin)
        yield root


def run_cli(args, capsys) -> dict:
    from jetnas.cli import main

    assert main(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def common_args(workspace):
    return ["--teacher", str(workspace / "teacher"), "--data", str(workspace / "train.txt"), "--steps", "3",
            "--batch-size", "2", "--seq-len", "32", "--heldout-tokens", "300", "--rows", "2", "--lm-tokens", "128",
            "--retrieval-length", "96", "--eval-batch-size", "2", "--decode-context", "64",
            "--measure", "fake", "--device", "cpu"]


@pytest.mark.slow
def test_search_blocks_from_the_cli(workspace, tmp_path, capsys):
    placements = write_placements(tmp_path, window=8)
    out = tmp_path / "blocks"
    args = ["search", "blocks", "--placement", str(placements), "--blocks", "gdn,jet:qk_conv=dynamic,v_conv=static",
            "--out-dir", str(out), *common_args(workspace)]
    result = run_cli(args, capsys)
    assert result["placement"]["attn"] == [2] and result["placement"]["swa"] == [0]
    assert result["placement"]["swa_window"] == 8  # found in the super-network next to the placements file
    assert set(result["ranked"]) == {"gdn", "jet:qk_conv=dynamic+v_conv=static"}
    assert result["best"] == result["ranked"][0]
    assert result["layer_types"] == f"swa,{result['block_type']},attn,{result['block_type']}"
    assert result["block_config"]["swa"] == {"window_size": 8}
    saved = json.loads((out / "blocks.json").read_text())
    for name, record in saved["records"].items():
        assert set(record["tasks"]) == {"lm", "retrieval:needle@96"}
        assert record["train_tokens_per_s"] > 0 and record["decode_tokens_per_s"] == pytest.approx(
            1e9 / record["params"])
        assert 0 < record["trainable_params"] < record["params"]
    jet = saved["records"]["jet:qk_conv=dynamic+v_conv=static"]
    # at the teacher's attention shape by default (--matched-shapes): value dim = head dim, like gdn's
    assert jet["block_config"]["jet"] == {"qk_conv": "dynamic", "v_conv": "static", "expand_v": 1.0}
    assert jet["cache_bytes_per_sequence"] == saved["records"]["gdn"]["cache_bytes_per_sequence"]
    assert saved["teacher"]["tasks"]["lm"]["nll"] > 0
    for name in ("blocks.md", "blocks.png", "heldout.bin"):
        assert (out / name).stat().st_size > 0
    assert not (out / "candidates" / "gdn" / "train" / "checkpoints").exists()
    # again: every candidate (and the teacher row) is reused, nothing trains
    stamp = (out / "candidates" / "gdn" / "result.json").stat().st_mtime_ns
    again = run_cli(args, capsys)
    assert again["ranked"] == result["ranked"]
    assert (out / "candidates" / "gdn" / "result.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_search_hardware_from_the_cli(workspace, tmp_path, capsys):
    out = tmp_path / "hardware"
    result = run_cli(["search", "hardware", "--placement", "attn,jet,jet,attn", "--block", "jet",
                      "--heads", "1,2", "--key-dims", "4,8", "--max-candidates", "3", "--tolerance", "0.05",
                      "--out-dir", str(out), *common_args(workspace)], capsys)
    # the tiny teacher's default JetBlock: 4 heads (its attention's), key dim 8 (its head dim), value dim 16
    assert result["original"] == {"num_heads": 4, "head_k_dim": 8, "head_v_dim": 16}
    assert result["state_numbers"] == 512 and result["state_bytes"] == 2048
    rows = json.loads((out / "hardware.json").read_text())["rows"]
    assert len(rows) == 3 and {r["state_numbers"] for r in rows} == {512}
    assert all(len(r["decode"]["decode_tokens_per_s_runs"]) == 3 for r in rows)  # --decode-repeats' default
    assert "median of 3 measurements; largest spread 0.0%" in (out / "hardware.md").read_text()
    assert sum(r["original"] for r in rows) == 1 and sum(r["chosen"] for r in rows) == 1
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["shape"] == result["chosen"]
    floor = 0.95 * next(r for r in rows if r["original"])["decode_tokens_per_s"]
    assert chosen["decode_tokens_per_s"] >= floor
    assert result["block_config"] == {"jet": shape_options("jet", BlockShape(**result["chosen"]))}
    assert result["layer_types"] == "attn,jet,jet,attn"
    table = (out / "hardware.md").read_text()
    assert "**chosen**" in table and shape_name(BlockShape(**result["chosen"])) in json.dumps(result)


def test_search_hardware_rejects_bad_budgets(workspace):
    from jetnas.commands.stages import search_hardware

    with pytest.raises(ValueError, match="--state-bytes=1001 must be a positive multiple of 4"):
        search_hardware(str(workspace / "teacher"), "attn,jet,jet,attn", state_bytes=1001)
    with pytest.raises(ValueError, match="unknown block candidate"):
        search_hardware(str(workspace / "teacher"), "attn,jet,jet,attn", block="rwkv9")


def test_block_candidates_are_hashable_and_renamable():
    cand = parse_candidate("jet-dyn-qk")
    shaped = cand.with_options("H2-K8-V32", num_heads=2, head_dim=8, expand_v=4.0)
    assert shaped.kwargs == {"qk_conv": "dynamic", "v_conv": "static", "num_heads": 2, "head_dim": 8, "expand_v": 4.0}
    assert len({cand, parse_candidate("jet-dyn-qk"), shaped}) == 2
    with pytest.raises(ValueError, match="'attn' is not a linear block"):
        BlockCandidate("x", "attn")


def test_the_block_search_recipe_defaults_to_every_default_candidate():
    # the recipe spells the default out (reading a recipe imports no torch): it must stay the library's
    from jetnas.nas.candidates import DEFAULT_BLOCKS
    from jetnas.runner.recipes import BlockSearchRecipe

    assert BlockSearchRecipe.__dataclass_fields__["blocks"].default == DEFAULT_BLOCKS
    assert "rwkv7" in DEFAULT_BLOCKS.split(",")  # the paper's Table 1 has it
