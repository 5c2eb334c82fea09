"""`jetnas run` bookkeeping with fake stages: recipe validation, wiring between stages, reuse and reruns, report."""

import dataclasses
import json
from pathlib import Path

import pytest

from jetnas import pipeline
from jetnas.pipeline import Pipeline, Recipe, RecipeError
from jetnas.runner import results

CALLS: list[str] = []

# The fakes stand in for the runner functions (`jetnas.runner`): each takes its stage's typed recipe (built from
# what the pipeline wired in, so the asserts check the wiring) and returns a typed result with the fields the test
# reads; the other fields are None.


def make(cls, **given):
    return cls(**{**{f.name: None for f in dataclasses.fields(cls)}, **given})


def fake_supernet(r):
    CALLS.append("supernet")
    return results.SupernetResult(r.out_dir, r.teacher, r.linear, {"steps": r.steps})


def fake_placement(r):
    CALLS.append("placement")
    assert r.supernet.endswith("supernet")
    return make(results.PlacementResult, placement={"attn": [2]}, layer_types="linear,linear,attn,linear",
                outputs={"placements": f"{r.out_dir}/placements.json"})


def fake_blocks(r):
    CALLS.append("blocks")
    assert r.placement.endswith("placements.json")
    return make(results.BlockSearchResult, best="gdn", block_type="gdn", options={}, outputs={})


def fake_hardware(r):
    CALLS.append("hardware")
    return make(results.ShapeSearchResult, chosen=[4, 32, 64], block_config={"gdn": {"num_heads": 4}}, block=r.block)


def test_the_hardware_search_starts_from_the_block_selected_with_its_options(tmp_path, monkeypatch):
    # block selection trains its candidates at the teacher's matched shape under their plain names: the hardware
    # search must get those options too, or it starts from the block's default shape
    def jet_blocks(r):
        CALLS.append("blocks")
        return make(results.BlockSearchResult, best="jet", block_type="jet", options={"expand_v": 1.0}, outputs={})

    seen = []

    def hardware(r):
        seen.append(r.block)
        return fake_hardware(r)

    specs = dict(pipeline.SPECS)  # the fakes (the autouse fixture's), with these two in place
    specs["blocks"] = dataclasses.replace(specs["blocks"], run=jet_blocks)
    specs["hardware"] = dataclasses.replace(specs["hardware"], run=hardware)
    monkeypatch.setattr(pipeline, "SPECS", specs)
    Pipeline(recipe(tmp_path, stage1="skip", stage2="skip", eval="skip", bench="skip")).run()
    assert seen == ["jet:expand_v=1.0"]


def fake_train(r):
    CALLS.append(f"stage{r.stage}")
    if r.stage == 1 and r.block_config is None:
        assert r.layer_types == "jet,jet,attn,jet" and r.swa_window == 512  # the default block, the supernet's window
    elif r.stage == 1:
        assert r.layer_types == "gdn,gdn,attn,gdn" and r.block_config == {"gdn": {"num_heads": 4}}
    else:
        assert r.model.endswith("stage1/model")
    model_dir = Path(r.out_dir) / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.safetensors").write_bytes(b"weights")
    return make(results.TrainResult, model_dir=str(model_dir), steps=r.steps, final_loss=1.0 / r.stage)


def fake_eval(r):
    CALLS.append(f"eval:{r.model}")
    return make(results.EvalResult, model=r.model,
                results={r.tasks: {"ppl": 10.0 if r.model == "tiny-teacher" else 12.0}})


def fake_bench(r):
    CALLS.append(f"bench:{r.model}")
    return make(results.BenchResult, summary={"decode_tokens_per_s": 100.0 if r.model == "tiny-teacher" else 300.0})


FAKES = {"supernet": fake_supernet, "placement": fake_placement, "blocks": fake_blocks, "hardware": fake_hardware,
         "stage1": fake_train, "stage2": fake_train, "eval": fake_eval, "bench": fake_bench}


@pytest.fixture(autouse=True)
def fake_stages(monkeypatch):
    specs = {stage: dataclasses.replace(spec, run=FAKES[stage]) for stage, spec in pipeline.SPECS.items()}
    monkeypatch.setattr(pipeline, "SPECS", specs)
    CALLS.clear()


def recipe(tmp_path, **stages):
    base = {"supernet": {"steps": 3}, "placement": {"budget": "attn=1"}, "blocks": {}, "hardware": {},
            "stage1": {"steps": 2}, "stage2": {"steps": 2}, "eval": {"tasks": "ppl"}, "bench": {}}
    base.update(stages)
    return Recipe.from_dict({"name": "t", "teacher": "tiny-teacher", "out_dir": str(tmp_path / "run"),
                             "data": "data.bin", "stages": base}, source="test.yaml")


def test_full_pipeline_wires_stages_and_writes_a_report(tmp_path):
    result = Pipeline(recipe(tmp_path)).run()
    # everything that needs the trained weights first, the teacher's side (which needs nothing earlier) last
    assert CALLS == ["supernet", "placement", "blocks", "hardware", "stage1", "stage2", f"eval:{tmp_path}/run/stage2/model",
                     f"bench:{tmp_path}/run/stage2/model", "eval:tiny-teacher", "bench:tiny-teacher"]
    assert result["model"] == f"{tmp_path}/run/stage2/model"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| ppl ppl | 12 | 10 | 1.2 |" in report and "| decode_tokens_per_s | 300 | 100 | 3 |" in report
    assert json.loads((tmp_path / "run" / "report.json").read_text())["results"]["stage1"]["final_loss"] == 1.0


def test_finished_stages_are_reused_and_a_changed_stage_reruns_with_everything_after_it(tmp_path):
    Pipeline(recipe(tmp_path)).run()
    CALLS.clear()
    Pipeline(recipe(tmp_path)).run()
    assert CALLS == []
    Pipeline(recipe(tmp_path, stage2={"steps": 3})).run()
    # the teacher's evaluation and benchmark depend on nothing upstream: reused
    assert CALLS == ["stage2", f"eval:{tmp_path}/run/stage2/model", f"bench:{tmp_path}/run/stage2/model"]
    CALLS.clear()
    Pipeline(recipe(tmp_path, stage2={"steps": 3}), redo=("hardware",)).run()
    assert CALLS[:3] == ["hardware", "stage1", "stage2"]


def test_a_stage_rerun_under_other_arguments_starts_afresh_and_an_interrupted_one_resumes(tmp_path, monkeypatch):
    # a changed stage's folder holds the earlier run: continuing it would train the old run on (the trainer refuses
    # that as a changed identity), so the pipeline asks for a fresh run (the trainer moves the old one aside)
    resumes = []

    def recording_train(r):
        resumes.append((f"stage{r.stage}", r.resume))
        return fake_train(r)

    specs = {**pipeline.SPECS, "stage1": dataclasses.replace(pipeline.SPECS["stage1"], run=recording_train),
             "stage2": dataclasses.replace(pipeline.SPECS["stage2"], run=recording_train)}
    monkeypatch.setattr(pipeline, "SPECS", specs)
    Pipeline(recipe(tmp_path)).run()
    assert resumes == [("stage1", True), ("stage2", True)]
    resumes.clear()
    Pipeline(recipe(tmp_path, stage2={"steps": 3})).run()
    assert resumes == [("stage2", False)]
    resumes.clear()
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    del state["stages"]["stage2"]  # as if killed during stage 2: no record, its checkpoints in place
    (tmp_path / "run" / "pipeline.json").write_text(json.dumps(state))
    Pipeline(recipe(tmp_path, stage2={"steps": 3})).run()
    assert resumes == [("stage2", True)]
    # killed again, then --redo: the user asks for a fresh start even without a record (the folder may hold a run
    # cut short under other arguments, e.g. stage 1's alignment phase, which would refuse to resume)
    resumes.clear()
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    del state["stages"]["stage2"]
    (tmp_path / "run" / "pipeline.json").write_text(json.dumps(state))
    Pipeline(recipe(tmp_path, stage2={"steps": 4}), redo=("stage2",)).run()
    assert resumes == [("stage2", False)]


def test_a_finished_stage_whose_model_weights_are_gone_runs_again(tmp_path):
    # a run continued on another machine from a copy of its small outputs: the records, not the weights
    Pipeline(recipe(tmp_path)).run()
    CALLS.clear()
    (tmp_path / "run" / "stage1" / "model" / "model.safetensors").unlink()
    Pipeline(recipe(tmp_path)).run()
    assert CALLS == ["stage1", "stage2", f"eval:{tmp_path}/run/stage2/model", f"bench:{tmp_path}/run/stage2/model"]


def token_file(target, tokens: int) -> results.DataResult:
    """What the fake data builders write: `tokens` zero ids at `target`."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_bytes(b"\0\0" * tokens)
    return results.DataResult(target, tokens)


def test_lost_generated_data_is_remade_without_rerunning_the_stages_that_used_it(tmp_path, monkeypatch):
    made = []

    def fake_generate(target, device, teacher, tokens, seed):
        made.append(target)
        return token_file(target, tokens)

    monkeypatch.setattr(pipeline, "generate_data", fake_generate)
    r = Recipe.from_dict({"name": "t", "teacher": "tiny-teacher", "out_dir": str(tmp_path / "run"),
                          "data": {"generate": 8}, "stages": {"supernet": {"steps": 3}}}, source="test.yaml")
    Pipeline(r).run()
    data = tmp_path / "run" / "data" / "train.bin"
    data.unlink()
    CALLS.clear()
    Pipeline(r).run()
    assert len(made) == 2 and data.exists() and CALLS == []


def test_recall_documents_are_reused_when_the_generated_text_changes_and_later_stages_still_rerun(tmp_path,
                                                                                                  monkeypatch):
    # the recall documents are built from the corpus alone: another teacher-generated text (a rerun data stage)
    # must not rebuild them, but the stages that read the mixture must rerun
    built, made = [], []

    def fake_build(target, teacher, corpus, documents, seed, **options):
        built.append(documents)
        return token_file(target, 64)

    def fake_generate(target, device, teacher, tokens, seed):
        made.append(tokens)
        return token_file(target, tokens)

    monkeypatch.setattr(pipeline, "build_recall_data", fake_build)
    monkeypatch.setattr(pipeline, "generate_data", fake_generate)

    def raw(tokens):
        return {"name": "t", "teacher": "tiny-teacher", "out_dir": str(tmp_path / "run"),
                "data": {"path": "web.bin", "generate": {"tokens": tokens, "weight": 0.2},
                         "recall": {"corpus": "wiki.jsonl.gz", "documents": 8, "weight": 0.25}},
                "stages": {"supernet": {"steps": 3}}}

    Pipeline(Recipe.from_dict(raw(8), source="test.yaml")).run()
    CALLS.clear()
    Pipeline(Recipe.from_dict(raw(16), source="test.yaml")).run()
    assert made == [8, 16] and built == [8] and CALLS == ["supernet"]
    # a changed recall section still rebuilds its documents, and what follows
    CALLS.clear()
    Pipeline(Recipe.from_dict({**raw(16), "data": {**raw(16)["data"], "recall": {
        "corpus": "wiki.jsonl.gz", "documents": 9, "weight": 0.25}}}, source="test.yaml")).run()
    assert made == [8, 16] and built == [8, 9] and CALLS == ["supernet"]


def test_recall_documents_are_built_once_and_mixed_into_every_stages_data(tmp_path, monkeypatch):
    built = []

    def fake_build(target, teacher, corpus, documents, seed, **options):
        built.append((corpus, documents, options))
        return token_file(target, 64)

    seen = []
    monkeypatch.setattr(pipeline, "build_recall_data", fake_build)
    monkeypatch.setattr(pipeline, "SPECS", {**pipeline.SPECS, "supernet": dataclasses.replace(
        pipeline.SPECS["supernet"], run=lambda r: seen.append(r.data) or fake_supernet(r))})
    raw = {"name": "t", "teacher": "tiny-teacher", "out_dir": str(tmp_path / "run"),
           "data": {"path": "web.bin", "recall": {"corpus": "wiki.jsonl.gz", "documents": 8, "doc_tokens": 256,
                                                  "weight": 0.25}},
           "stages": {"supernet": {"steps": 3}}}
    Pipeline(Recipe.from_dict(raw, source="test.yaml")).run()
    Pipeline(Recipe.from_dict(raw, source="test.yaml")).run()
    assert built == [("wiki.jsonl.gz", 8, {"doc_tokens": 256})]
    assert seen == [f"web.bin:0.75,{tmp_path}/run/data/recall.bin:0.25"]
    for bad in ({"path": "web.bin", "generate": 8}, {"path": "web.bin", "recall": {"corpus": "w.jsonl"}},
                {"path": "web.bin", "recall": {"corpus": "w", "documents": 8, "weight": 1.5}},
                {"path": "web.bin", "recall": {"corpus": "w", "documents": 8, "colour": 1}}):
        with pytest.raises(RecipeError, match="data"):
            Recipe.from_dict({**raw, "data": bad}, source="test.yaml")

    # several recall sources (long documents for needle-like recall, short dense ones for associative recall): each
    # built once into its own file, all mixed in with their weights; the text keeps the rest
    built.clear()
    seen.clear()
    two = {**raw, "out_dir": str(tmp_path / "run2"), "data": {"path": "web.bin", "recall": [
        {"corpus": "wiki.jsonl.gz", "documents": 8, "doc_tokens": 256, "weight": 0.1},
        {"corpus": "wiki.jsonl.gz", "documents": 16, "doc_tokens": 64, "entries": 12, "weight": 0.15}]}}
    Pipeline(Recipe.from_dict(two, source="test.yaml")).run()
    Pipeline(Recipe.from_dict(two, source="test.yaml")).run()
    assert built == [("wiki.jsonl.gz", 8, {"doc_tokens": 256}), ("wiki.jsonl.gz", 16, {"doc_tokens": 64,
                                                                                         "entries": 12})]
    assert seen == [f"web.bin:0.75,{tmp_path}/run2/data/recall.bin:0.1,{tmp_path}/run2/data/recall2.bin:0.15"]
    for bad, match in (([], "1 to 4"), ([{"corpus": "w", "documents": 8, "weight": 0.6}] * 2, "add up to 1.2"),
                       ([{"corpus": "w", "documents": 8}, {"corpus": "w"}], r"data.recall\[1\] needs corpus")):
        with pytest.raises(RecipeError, match=match):
            Recipe.from_dict({**raw, "data": {"path": "web.bin", "recall": bad}}, source="test.yaml")


def test_generated_text_is_made_once_and_mixed_with_the_corpus_and_the_recall_documents(tmp_path, monkeypatch):
    made, built, seen = [], [], []

    def fake_generate(target, device, teacher, tokens, seed, **options):
        made.append((Path(target).name, tokens, *options.items()))
        return token_file(target, tokens)

    def fake_build(target, teacher, corpus, documents, seed, **options):
        built.append(Path(target).name)
        return token_file(target, 64)

    monkeypatch.setattr(pipeline, "generate_data", fake_generate)
    monkeypatch.setattr(pipeline, "build_recall_data", fake_build)
    monkeypatch.setattr(pipeline, "SPECS", {**pipeline.SPECS, "supernet": dataclasses.replace(
        pipeline.SPECS["supernet"], run=lambda r: seen.append(r.data) or fake_supernet(r))})
    run = tmp_path / "run"
    raw = {"name": "t", "teacher": "tiny-teacher", "out_dir": str(run), "stages": {"supernet": {"steps": 3}},
           "data": {"path": "web.bin", "generate": {"tokens": 8, "weight": 0.2},
                    "recall": [{"corpus": "wiki.jsonl.gz", "documents": 8, "weight": 0.15},
                               {"corpus": "wiki.jsonl.gz", "documents": 16, "weight": 0.15}]}}
    Pipeline(Recipe.from_dict(raw, source="test.yaml")).run()
    Pipeline(Recipe.from_dict(raw, source="test.yaml")).run()
    # each source made once (the second run reuses them); the corpus keeps 1 - 0.2 - 0.15 - 0.15; every source has
    # its own file name, so the training stages report a held-out KL per source, heldout/kl/generated.bin included
    assert made == [("generated.bin", 8)] and built == ["recall.bin", "recall2.bin"]
    assert seen == [f"web.bin:0.5,{run}/data/generated.bin:0.2,{run}/data/recall.bin:0.15,"
                    f"{run}/data/recall2.bin:0.15"]
    from jetnas.train.mixture import parse_mixture

    assert [w for _, w in parse_mixture(seen[0])] == pytest.approx([0.5, 0.2, 0.15, 0.15])
    # the sampler is part of the data stage's identity: text sampled another way is never reused as this one's
    state = json.loads((run / "pipeline.json").read_text())
    assert state["stages"]["data"]["arguments"] == {"teacher": "tiny-teacher", "tokens": 8, "seed": 0,
                                                    "sampler": "engine"}

    # without recall documents, and the older forms: generated text alone, the corpus alone
    seen.clear()
    Pipeline(Recipe.from_dict({**raw, "out_dir": str(tmp_path / "two"), "data": {
        "path": "web.bin", "generate": {"tokens": 8, "weight": 0.25}}}, source="test.yaml")).run()
    Pipeline(Recipe.from_dict({**raw, "out_dir": str(tmp_path / "alone"), "data": {"generate": 8}},
                              source="test.yaml")).run()
    Pipeline(Recipe.from_dict({**raw, "out_dir": str(tmp_path / "path"), "data": {"path": "web.bin"}},
                              source="test.yaml")).run()
    assert seen == [f"web.bin:0.75,{tmp_path}/two/data/generated.bin:0.25", f"{tmp_path}/alone/data/train.bin",
                    "web.bin"]

    # the sampler's options, given, reach the sampler and name the data stage (a recipe without them keeps its
    # arguments, so its finished data stage is reused); changed, they make the text again
    made.clear()
    options = {"tokens": 8, "weight": 0.2, "length": 4096, "special": False}
    gen = {**raw, "out_dir": str(tmp_path / "gen"), "data": {"path": "web.bin", "generate": options}}
    Pipeline(Recipe.from_dict(gen, source="test.yaml")).run()
    Pipeline(Recipe.from_dict(gen, source="test.yaml")).run()
    assert made == [("generated.bin", 8, ("length", 4096), ("special", False))]
    state = json.loads((tmp_path / "gen" / "pipeline.json").read_text())
    assert state["stages"]["data"]["arguments"] == {"teacher": "tiny-teacher", "tokens": 8, "seed": 0,
                                                    "sampler": "engine", "length": 4096, "special": False}
    Pipeline(Recipe.from_dict({**gen, "data": {"path": "web.bin", "generate": {**options, "length": 2048}}},
                              source="test.yaml")).run()
    assert made[-1] == ("generated.bin", 8, ("length", 2048), ("special", False))


@pytest.mark.parametrize("data, message", [
    ({"path": "web.bin", "generate": 8}, r"data.generate=8 beside data.path: give generate: \{tokens: N, weight: W\}"),
    ({"generate": {"tokens": 8, "weight": 0.2}}, r"data has no path; for generated text alone give generate: TOKENS"),
    ({"path": "web.bin", "generate": {"tokens": 8}}, r"data.generate takes tokens and weight .*got keys \['tokens'\]"),
    ({"path": "web.bin", "generate": {"tokens": 8, "weight": 0.2, "seed": 1}}, r"got keys \['seed', 'tokens'"),
    ({"path": "web.bin", "generate": {"tokens": 0, "weight": 0.2}}, r"data.generate.tokens=0 must be a positive"),
    ({"path": "web.bin", "generate": {"tokens": "10M", "weight": 0.2}}, r"data.generate.tokens='10M' must be a posi"),
    ({"path": "web.bin", "generate": {"tokens": True, "weight": 0.2}}, r"data.generate.tokens=True must be a posi"),
    ({"path": "web.bin", "generate": {"tokens": 8, "weight": 1.0}},
     r"data.generate.weight=1.0 must be a fraction in \(0, 1\)"),
    ({"path": "web.bin", "generate": {"tokens": 8, "weight": 0}}, r"data.generate.weight=0 must be a fraction"),
    ({"path": "web.bin", "generate": {"tokens": 8, "weight": "0.2"}}, r"data.generate.weight='0.2' must be a frac"),
    ({"path": "web.bin", "generate": {"tokens": 8, "weight": 0.5},
      "recall": {"corpus": "w", "documents": 8, "weight": 0.5}},
     r"the generated text's and recall sources' weights add up to 1: they must leave the text a share"),
    ({"generate": 0}, r"data.generate=0 must be a positive integer"),
    ({"generate": 2.5}, r"data.generate=2.5 must be a positive integer"),
    ({"recall": {"corpus": "w", "documents": 8}}, r"data must be a path / hf: spec, or a mapping with generate"),
    ({"path": "web.bin", "generate": {"tokens": 8, "weight": 0.2, "length": 0}},
     r"data.generate.length=0 must be a positive integer \(new tokens a sample\)"),
    ({"path": "web.bin", "generate": {"tokens": 8, "weight": 0.2, "special": "no"}},
     r"data.generate.special='no' must be true or false"),
], ids=["int-beside-path", "mapping-without-path", "no-weight", "unknown-key", "zero-tokens", "text-tokens",
        "bool-tokens", "weight-one", "weight-zero", "text-weight", "weights-sum-to-one", "zero-alone", "float-alone",
        "neither", "zero-length", "text-special"])
def test_bad_data_sections_name_the_bad_value(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"name": "t", "teacher": "tiny-teacher", "data": data}, source="test.yaml")


def test_without_block_and_shape_searches_stage1_gets_the_jetblock_and_the_supernets_window(tmp_path):
    Pipeline(recipe(tmp_path, blocks="skip", hardware="skip", stage2="skip")).run()
    assert CALLS[:3] == ["supernet", "placement", "stage1"]


def test_skipped_stages_and_what_replaces_them(tmp_path):
    r = recipe(tmp_path, supernet="skip", placement="skip", blocks="skip", hardware="skip", stage2="skip",
               stage1={"layer_types": "gdn,gdn,attn,gdn", "block_config": {"gdn": {"num_heads": 4}}})
    Pipeline(r).run()
    assert CALLS[0] == "stage1" and "stage2" not in CALLS
    bad = recipe(tmp_path / "b", supernet="skip", placement="skip", blocks="skip", hardware="skip")
    with pytest.raises(RecipeError, match="stage1 needs layer_types"):
        Pipeline(bad).run()


@pytest.mark.parametrize("raw, message", [
    ({"name": "x", "teacher": "t", "stages": {"supernet": {"stepz": 3}}}, r"stages.supernet.stepz is not an argument"),
    ({"name": "x", "teacher": "t", "stages": {"supernet": {"out_dir": "a"}}}, "set by the pipeline"),
    ({"name": "x", "teacher": "t", "stages": {"stage3": {}}}, r"unknown stage\(s\) \['stage3'\]"),
    ({"name": "x", "teacher": "t", "stagez": {}}, r"unknown top-level key\(s\) \['stagez'\]"),
    ({"name": "x", "stages": {}}, "'teacher' is required"),
    ({"name": "x", "teacher": "t", "stages": {"eval": 3}}, "must be a mapping of arguments or 'skip'"),
], ids=["unknown-arg", "wired-arg", "unknown-stage", "unknown-top", "no-teacher", "not-a-mapping"])
def test_bad_recipes_name_the_bad_key(raw, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(raw, source="bad.yaml")


def test_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nteacher: t\nstages:\n  supernet: {steps: 3}\n  eval: skip\n")
    r = Recipe.load(path, ["stages.supernet.steps=7", "stages.eval.tasks=ppl,mc", "seed=3"])
    assert r.stages["supernet"]["steps"] == 7 and r.stages["eval"] == {"tasks": "ppl,mc"} and r.seed == 3
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        Recipe.load(path, ["stages.supernet.steps"])


def test_report_only_rewrites_the_report_from_the_records(tmp_path):
    Pipeline(recipe(tmp_path)).run()
    report = tmp_path / "run" / "report.md"
    first = report.read_text()
    report.unlink()
    CALLS.clear()
    Pipeline(recipe(tmp_path)).write_report()
    assert CALLS == [] and report.read_text() == first
    with pytest.raises(RecipeError, match="no finished stage recorded"):
        Pipeline(recipe(tmp_path / "empty")).write_report()


@pytest.mark.parametrize("extra", [{"redo": ["eval"]}, {"check": True}])
def test_report_only_refuses_options_it_would_ignore(tmp_path, extra):
    from jetnas.commands.run import run

    with pytest.raises(ValueError, match="--report-only runs nothing"):
        run("quickstart", out_dir=str(tmp_path), report_only=True, **extra)
    assert list(tmp_path.iterdir()) == []


def test_compare_placements_trains_the_search_baselines_into_final_hybrids(tmp_path, monkeypatch):
    # issue 19: the searched placement must win on final models, not only on super-network scores: each baseline
    # of the search's comparison (uniform, one-layer ranking) goes through the same stage 1, stage 2 and evaluation
    def placement_with_comparison(r):
        out = Path(r.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        comparison = {"searched (beam)": {"attn": [2], "swa": [], "layer_types": ["linear", "linear", "attn", "linear"]},
                      "uniform": {"attn": [1], "swa": [], "layer_types": ["linear", "attn", "linear", "linear"]},
                      "one-layer ranking": {"attn": [0], "swa": [], "layer_types": ["attn", "linear", "linear",
                                                                                    "linear"]}}
        (out / "comparison.json").write_text(json.dumps(comparison))
        result = fake_placement(r)
        return dataclasses.replace(result, outputs={**result.outputs, "comparison": str(out / "comparison.json")})

    trained = []

    def recording_train(r):
        trained.append((r.out_dir.split("/run/")[1], r.layer_types))
        # fake_train checks the searched placement's wiring; the baselines have other layer types
        return fake_train(dataclasses.replace(r, layer_types="gdn,gdn,attn,gdn"))

    monkeypatch.setattr(pipeline, "SPECS", {
        **pipeline.SPECS, "placement": dataclasses.replace(pipeline.SPECS["placement"], run=placement_with_comparison),
        "stage1": dataclasses.replace(pipeline.SPECS["stage1"], run=recording_train)})
    raw = {"name": "t", "teacher": "tiny-teacher", "out_dir": str(tmp_path / "run"), "data": "data.bin",
           "compare_placements": True,
           "stages": {"supernet": {"steps": 3}, "placement": {"budget": "attn=1"}, "blocks": {}, "hardware": {},
                      "stage1": {"steps": 2}, "stage2": {"steps": 2}, "eval": {"tasks": "ppl"}}}
    Pipeline(Recipe.from_dict(raw, source="test.yaml")).run()
    # the chosen block fills the linear layers of every placement
    assert trained == [("stage1", "gdn,gdn,attn,gdn"), ("compare/uniform/stage1", "gdn,attn,gdn,gdn"),
                       ("compare/one-layer-ranking/stage1", "attn,gdn,gdn,gdn")]
    assert f"eval:{tmp_path}/run/compare/uniform/stage2/model" in CALLS
    rows = json.loads((tmp_path / "run" / "compare" / "placements.json").read_text())
    assert list(rows) == ["searched", "uniform", "one-layer ranking", "teacher"]
    assert "| uniform | 1 |  | 12 |" in (tmp_path / "run" / "compare" / "placements.md").read_text()
    CALLS.clear()
    Pipeline(Recipe.from_dict(raw, source="test.yaml")).run()
    assert CALLS == []  # every comparison reused
    with pytest.raises(RecipeError, match="compare_placements"):
        Recipe.from_dict({**raw, "stages": {**raw["stages"], "eval": "skip"}}, source="test.yaml")


def test_compare_placements_named_in_the_recipe_train_beside_stage1s_placement(tmp_path, monkeypatch):
    # a search that ran elsewhere (its placement committed as stage 1's layer_types): the baselines are named in the
    # recipe, each trained by the same stage 1 / stage 2 and evaluated the same way; no placement stage needed
    trained = []

    def recording_train(r):
        trained.append((r.out_dir.split("/run/")[1], r.stage, r.layer_types if r.stage == 1 else None))
        return fake_train(dataclasses.replace(r, layer_types="gdn,gdn,attn,gdn"))

    monkeypatch.setattr(pipeline, "SPECS", {
        **pipeline.SPECS, "stage1": dataclasses.replace(pipeline.SPECS["stage1"], run=recording_train),
        "stage2": dataclasses.replace(pipeline.SPECS["stage2"], run=recording_train)})
    raw = {"name": "t", "teacher": "tiny-teacher", "out_dir": str(tmp_path / "run"), "data": "data.bin",
           "compare_placements": {"uniform": "gdn,attn,gdn,swa", "one-layer ranking": "attn,gdn*2,gdn"},
           "stages": {"stage1": {"steps": 2, "layer_types": "gdn*2,attn,gdn", "block_config": {"gdn": {"num_heads": 4}}},
                      "stage2": {"steps": 2}, "eval": {"tasks": "ppl"}}}
    Pipeline(Recipe.from_dict(raw, source="test.yaml")).run()
    assert [t for t in trained if t[1] == 1] == [("stage1", 1, "gdn*2,attn,gdn"),
                                                 ("compare/uniform/stage1", 1, "gdn,attn,gdn,swa"),
                                                 ("compare/one-layer-ranking/stage1", 1, "attn,gdn*2,gdn")]
    assert ("compare/uniform/stage2", 2, None) in trained
    rows = json.loads((tmp_path / "run" / "compare" / "placements.json").read_text())
    assert list(rows) == ["searched", "uniform", "one-layer ranking", "teacher"]
    assert (rows["searched"]["attn"], rows["uniform"]["attn"], rows["uniform"]["swa"]) == ([2], [1], [3])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Placements compared on final models" in report and "| uniform | 1 | 3 |  |" in report
    CALLS.clear()
    Pipeline(Recipe.from_dict(raw, source="test.yaml")).run()
    assert CALLS == []  # every comparison reused
    for bad, match in [({"uniform": "gdn,attn"}, "different layer counts"), ({}, "empty mapping"),
                       ({"uniform": "gla:num_heads=2,head_k_dim=8*3,attn"}, None),  # options, then a repeat: 4 layers
                       ({"a b": "gdn*3,attn", "a-b": "attn,gdn*3"}, "distinct folder names"),
                       ({"uniform": 3}, "layer-types string")]:
        if match is None:
            Recipe.from_dict({**raw, "compare_placements": bad}, source="test.yaml")
            continue
        with pytest.raises(RecipeError, match=match):
            Recipe.from_dict({**raw, "compare_placements": bad}, source="test.yaml")
    # a type the registry does not know: refused when the pipeline starts, before anything trains
    CALLS.clear()
    with pytest.raises(RecipeError, match="compare_placements.uniform: unknown layer type"):
        Pipeline(Recipe.from_dict({**raw, "compare_placements": {"uniform": "gdn,attn,bogus,gdn"}},
                                  source="test.yaml")).run()
    assert CALLS == []
    with pytest.raises(RecipeError, match="stage1 and eval must run"):
        Recipe.from_dict({**raw, "stages": {**raw["stages"], "eval": "skip"}}, source="test.yaml")
    no_types = {**raw["stages"], "stage1": {"steps": 2}}
    with pytest.raises(RecipeError, match="needs stages.stage1.layer_types"):
        Recipe.from_dict({**raw, "stages": no_types}, source="test.yaml")


def test_without_keep_checkpoints_a_training_stage_loses_its_checkpoints_when_it_finishes(tmp_path, monkeypatch):
    # the peak disk use of a run stays one stage's checkpoints: stage 1's are gone before stage 2 trains
    seen = {}

    def train_with_checkpoints(r):
        step = Path(r.out_dir) / "checkpoints" / "step-00000002"
        step.mkdir(parents=True)
        (step / "optimizer.safetensors").write_bytes(b"\0" * 1000)
        result = fake_train(r)
        (Path(result.model_dir) / "config.json").write_text("{}")
        (Path(result.model_dir) / "jetnas_stage.json").write_text("{}")
        seen[r.stage] = sorted(p.name for p in (tmp_path / "run" / "stage1" / "checkpoints").iterdir())
        return result

    monkeypatch.setattr(pipeline, "SPECS", {
        **pipeline.SPECS, "stage1": dataclasses.replace(pipeline.SPECS["stage1"], run=train_with_checkpoints),
        "stage2": dataclasses.replace(pipeline.SPECS["stage2"], run=train_with_checkpoints)})
    run = Pipeline(recipe(tmp_path), keep_checkpoints=False)
    run.run()
    assert seen == {1: ["step-00000002"], 2: []}
    assert set(run.checkpoints_deleted) == {"stage1", "stage2"}
    assert not list((tmp_path / "run" / "stage2" / "checkpoints").iterdir())
    assert (tmp_path / "run" / "stage1" / "model" / "model.safetensors").exists()  # the model stays
