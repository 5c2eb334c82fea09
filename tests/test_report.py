"""The pipeline report's throughput section: both benchmarks side by side per context, found even when the run
directory was moved after the records were written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jetnas.report import _bench_comparison, _local


def _bench(tmp_path, name, decode, cache):
    rows = [{"system": "jetnas engine", "context_length": c, "decode_tokens_per_s": decode * f,
             "prefill_tokens_per_s": 1000.0 * f, "batch_size": 8, "cache_bytes_per_sequence": cache * c,
             "roofline_fraction": 0.5} for c, f in ((256, 1.0), (512, 0.5))]
    rows.append({"system": "transformers generate", "context_length": 256, "decode_tokens_per_s": 1.0})
    path = tmp_path / "run" / name / "bench.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"device": "cpu", "rows": rows}))
    # as recorded on the machine that wrote it: another root
    return {"outputs": {"json": f"/root/elsewhere/run/{name}/bench.json"}}


def test_local_finds_moved_outputs(tmp_path):
    (tmp_path / "run" / "a").mkdir(parents=True)
    (tmp_path / "run" / "a" / "f.json").write_text("{}")
    assert _local("/root/x/run/a/f.json", tmp_path / "run") == tmp_path / "run" / "a" / "f.json"
    assert _local("/root/x/run/a/missing.json", tmp_path / "run") is None
    assert _local(None, tmp_path) is None


def test_bench_comparison_table_and_figure(tmp_path):
    hybrid = _bench(tmp_path, "bench", 300.0, 10)
    teacher = _bench(tmp_path, "bench_teacher", 100.0, 100)
    lines = _bench_comparison(hybrid, teacher, tmp_path / "run")
    table = "\n".join(lines)
    # decode 300 vs 100 (3x), prefill equal (1x), cache per sequence in MB
    assert "| 256 | 300 | 100 | 3.00x | 1,000 | 1,000 | 1.00x | 8 | 8 | 0.00256 | 0.0256 | 0.5 | 0.5 |" in table
    assert "| 512 | 150 | 50 | 3.00x |" in table
    assert (tmp_path / "run" / "bench_vs_teacher.png").stat().st_size > 0
    # a benchmark without its file: no comparison (the caller falls back to the summaries)
    assert _bench_comparison({"outputs": {}}, teacher, tmp_path / "run") == []


def quickstart_like(tmp_path):
    """A recipe, records and state shaped like the CPU quickstart's: tiny budgets, two block candidates, one
    context length."""
    from jetnas.pipeline import Recipe

    recipe = Recipe.from_dict({"name": "q", "teacher": "t", "out_dir": str(tmp_path / "run"), "stages": {
        "supernet": {"steps": 8}, "placement": {"budget": "attn=1"}, "blocks": {"blocks": "gdn,jet"},
        "hardware": "skip", "stage1": {"steps": 4}, "stage2": {"steps": 2}, "eval": {"tasks": "ppl"},
        "bench": {}}}, source="q.yaml")
    hybrid = _bench(tmp_path, "bench", 42.0, 10)
    teacher = _bench(tmp_path, "bench_teacher", 53.0, 100)
    for name in ("bench", "bench_teacher"):  # one context length, as the quickstart measures
        path = tmp_path / "run" / name / "bench.json"
        saved = json.loads(path.read_text())
        saved["rows"] = [r for r in saved["rows"] if r["context_length"] == 256]
        path.write_text(json.dumps(saved))
    layer_types = ",".join(["gdn"] * 24 + ["attn"] + ["gdn"] * 5)
    results = {
        "placement": {"placement": {"attn": [24], "swa": []}, "layer_types": layer_types.replace("gdn", "gla")},
        "stage1": {"steps": 4, "tokens": 2048, "final_loss": 10.5712, "layer_types": layer_types},
        "stage2": {"steps": 2, "tokens": 1024, "final_loss": 9.34217},
        "eval": {"hybrid": {"results": {"retrieval:needle@256?n=4": {"acc": 0.0, "target_nll": 7.91123, "n": 4}}},
                 "teacher": {"results": {"retrieval:needle@256?n=4": {"acc": 1.0, "target_nll": 0.0713, "n": 4}}}},
        "bench": {"hybrid": hybrid, "teacher": teacher},
    }
    done = {"seconds": 1.0, "finished": "2026-12-06 04:41:03"}
    state = {"stages": {s: done for s in ("data", "supernet", "placement", "blocks", "stage1", "stage2", "eval",
                                          "eval_teacher", "bench", "bench_teacher")}}
    return recipe, results, state


def test_a_smoke_test_says_so_first_and_every_step_says_whether_it_ran(tmp_path):
    from jetnas.report import write_pipeline_report

    recipe, results, state = quickstart_like(tmp_path)
    out = tmp_path / "run"
    paths = write_pipeline_report(recipe, results, state, out)
    report = Path(paths["report"]).read_text()
    lines = report.splitlines()
    assert lines[2].startswith("> **A smoke test, not a result.** Stages 1 and 2 trained on 3,072 tokens")
    assert json.loads(Path(paths["report_json"]).read_text())["smoke_test"] is True
    # step 3 is named and why it did not run; a skipped stage says so
    assert ("| | step 3: JetBlock design ablation | not run: the block search's candidates (gdn, jet) hold no JetBlock "
            "design variant") in report
    assert "| hardware | step 4: hardware-aware shape search | skipped by the recipe | |" in report
    # rounded, compact, readable
    assert "- final_loss: 10.6" in report and "- layer_types: `gdn*24,attn,gdn*5`" in report
    assert "- placement: attn 24; swa none" in report
    # the evaluation: row counts in the label, not a row of their own; the sampling error of 4 rows
    assert "| retrieval:needle@256?n=4 (4 rows) acc | 0 | 1 | 0 |" in report
    assert "| n |" not in report and " n | 4 | 4 | 1 |" not in report
    assert "an accuracy from 4 rows is known to about ±49 points (95%)" in report
    # one context length: a table, no one-point line chart, and a sentence saying why
    assert "No figure: one context length was measured (256 tokens)" in report
    assert "bench_vs_teacher.png" not in report and "![figure](bench/bench.png)" not in report


def test_a_run_with_enough_training_is_not_called_a_smoke_test(tmp_path):
    from jetnas.report import write_pipeline_report

    recipe, results, state = quickstart_like(tmp_path)
    results["stage2"]["tokens"] = 18_000_000
    report = Path(write_pipeline_report(recipe, results, state, tmp_path / "run")["report"]).read_text()
    assert "smoke test" not in report


def test_step3_runs_inside_the_block_search_with_jetblock_variants(tmp_path):
    from jetnas.pipeline import Recipe
    from jetnas.report import _step3_status

    recipe = Recipe.from_dict({"name": "x", "teacher": "t", "stages": {
        "blocks": {"blocks": "gdn,jet,jet-static-qk,jet:qk_conv=dynamic"}}})
    assert _step3_status(recipe) == ("ran inside step 2: JetBlock variants jet-static-qk, jet:qk_conv=dynamic "
                                     "against `jet`")
    assert _step3_status(Recipe.from_dict({"name": "x", "teacher": "t", "stages": {}})).startswith("skipped")


def test_retention_summary_shares_of_the_teachers_margin():
    """retention.json's numbers: (hybrid - chance) / (teacher - chance) per task, the held-out nll gap, the cache
    ratio at 8K; tasks the teacher does not have, or at chance, are handled."""
    from jetnas.report import retention, retention_table, task_name

    assert task_name("mc:../shared/data/bench/arc_easy_test.jsonl") == "arc_easy"
    assert task_name("cloze:../shared/data/bench/lambada_openai_test.jsonl.gz") == "lambada"
    assert task_name("mc:x/hellaswag_val.jsonl.gz") == "hellaswag"
    assert task_name("retrieval:needle@4096") == "needle@4096"
    assert task_name("retrieval:needle@4096?n=100&seed=3") == "needle@4096"  # more rows of the same task
    assert task_name("retrieval:kv@2048?n=50&keys=4") == "kv@2048?keys=4"
    hybrid = {"mc:b/arc_easy_test.jsonl": {"acc": 0.45, "acc_norm": 0.4, "n": 100}, "mc:b/piqa_val.jsonl": {"acc": 0.6, "n": 10},
              "mc:b/mmlu_test.jsonl.gz": {"acc": 0.24}, "retrieval:needle@4096": {"acc": 0.5},
              "ppl:c/val.bin": {"nll": 3.1}, "mc:b/only_hybrid.jsonl": {"acc": 0.9}}
    teacher = {"mc:b/arc_easy_test.jsonl": {"acc": 0.5, "acc_norm": 0.45}, "mc:b/piqa_val.jsonl": {"acc": 0.7},
               "mc:b/mmlu_test.jsonl.gz": {"acc": 0.23}, "retrieval:needle@4096": {"acc": 1.0},
               "ppl:c/val.bin": {"nll": 3.0}}
    rows = lambda cache: {"rows": [{"context_length": 8192, "cache_bytes_per_sequence": cache},  # noqa: E731
                                   {"context_length": 4096, "cache_bytes_per_sequence": 1}]}
    r = retention(hybrid, teacher, rows(10), rows(150))
    assert set(r["tasks"]) == {"arc_easy", "piqa", "mmlu", "needle@4096"}
    assert r["tasks"]["arc_easy"]["kept"] == pytest.approx(0.8)       # (0.45 - 0.25) / (0.5 - 0.25)
    assert r["tasks"]["piqa"]["kept"] == pytest.approx(0.5)           # (0.6 - 0.5) / (0.7 - 0.5)
    # the same share by acc_norm where both sides have it: (0.4 - 0.25) / (0.45 - 0.25); acc stays the headline
    assert r["tasks"]["arc_easy"]["acc_norm"] == pytest.approx({"teacher": 0.45, "hybrid": 0.4, "kept": 0.75})
    assert "acc_norm" not in r["tasks"]["piqa"]                        # the teacher's row has no acc_norm
    assert r["tasks"]["mmlu"]["kept"] is None                         # the teacher is below chance: no margin
    assert r["tasks"]["needle@4096"] == {"teacher": 1.0, "hybrid": 0.5, "chance": 0.0, "kept": 0.5, "n": None}
    assert r["heldout_nll_gap"] == pytest.approx(0.1)
    assert r["cache_ratio_8k"] == pytest.approx(15.0)
    # a multiple-choice file without a standard figure: its own chance (1 / choices), e.g. the HellaSwag-form proxy;
    # a shipped benchmark keeps its standard one even when the task reports another (ARC's few 3- and 5-way rows)
    own = retention({"mc:d/continuation_wiki_val.jsonl": {"acc": 0.30, "chance": 0.25},
                     "mc:b/arc_easy_test.jsonl": {"acc": 0.45, "chance": 0.2502}},
                    {"mc:d/continuation_wiki_val.jsonl": {"acc": 0.35, "chance": 0.25},
                     "mc:b/arc_easy_test.jsonl": {"acc": 0.5, "chance": 0.2502}})["tasks"]
    assert own["continuation_wiki"]["chance"] == 0.25 and own["continuation_wiki"]["kept"] == pytest.approx(0.5)
    assert own["arc_easy"]["chance"] == 0.25
    assert retention(hybrid, teacher)["cache_ratio_8k"] is None       # no throughput run: no ratio
    table = "\n".join(retention_table(r))
    assert "| arc_easy | 0.450 | 0.500 | 0.25 | 80% | 75% |" in table and "15.0x smaller" in table
    assert "| piqa | 0.600 | 0.700 | 0.5 | 50% |  |" in table
    # with both evaluations' per-item outcomes, each share gets a paired interval over the rows
    h_rows = {"mc:b/arc_easy_test.jsonl": {"acc": [1] * 45 + [0] * 55, "acc_norm": [1] * 40 + [0] * 60}}
    t_rows = {"mc:b/arc_easy_test.jsonl": {"acc": [1] * 50 + [0] * 50, "acc_norm": [1] * 45 + [0] * 55}}
    r = retention(hybrid, teacher, hybrid_outcomes=h_rows, teacher_outcomes=t_rows)
    row = r["tasks"]["arc_easy"]
    assert row["kept_ci95"][0] < 0.8 < row["kept_ci95"][1] and row["disagree"] == pytest.approx(0.05)
    assert row["acc_norm"]["kept_ci95"][0] < 0.75 < row["acc_norm"]["kept_ci95"][1]
    assert "kept_ci95" not in r["tasks"]["piqa"]                       # no outcomes for it
    assert "agree" not in row                                          # no choice scores in these outcomes
    lo, hi = (round(100 * x) for x in row["kept_ci95"])
    assert f"| arc_easy | 0.450 | 0.500 | 0.25 | 80% ({lo}-{hi}%) |" in "\n".join(retention_table(r))
    # with each choice's log-likelihood: how often the hybrid's top choice is the teacher's
    h_rows["mc:b/arc_easy_test.jsonl"]["ll"] = [[-1.0, -2.0]] * 100
    t_rows["mc:b/arc_easy_test.jsonl"]["ll"] = [[-1.0, -2.0]] * 90 + [[-2.0, -1.0]] * 10
    row = retention(hybrid, teacher, hybrid_outcomes=h_rows, teacher_outcomes=t_rows)["tasks"]["arc_easy"]
    assert row["agree"] == pytest.approx(0.9) and row["choice_kl"] > 0


def test_the_placements_table_gives_each_placements_accuracy_and_share_of_the_teachers_margin():
    from jetnas.report import placements_retention_table

    results = lambda acc, nll: {"mc:b/piqa_val.jsonl": {"acc": acc, "n": 10}, "retrieval:needle@4096?n=100":
                                {"acc": acc - 0.1}, "ppl:val.bin": {"nll": nll}}  # noqa: E731
    rows = {"searched": {"attn": [7, 18], "swa": [17, 23], "results": results(0.7, 3.1)},
            "uniform": {"attn": [7, 22], "swa": [17, 23], "results": results(0.6, 3.3)},
            "teacher": {"attn": None, "swa": None, "results": results(0.8, 3.0)}}
    table = placements_retention_table(rows)
    assert table[0] == "| placement | attn | swa | piqa | needle@4096 | held-out nll gap |"
    # piqa: chance 0.5, so (0.7 - 0.5) / (0.8 - 0.5) = 67% kept; the needle's chance is 0: 0.6 / 0.7 = 86%
    assert table[2] == "| searched | 7, 18 | 17, 23 | 70.0 (67%) | 60.0 (86%) | +0.100 |"
    assert table[3] == "| uniform | 7, 22 | 17, 23 | 60.0 (33%) | 50.0 (71%) | +0.300 |"
    assert table[4] == "| teacher |  |  | 80.0 | 70.0 |  |"


def test_an_evaluations_outcomes_are_found_in_a_run_copied_from_another_machine(tmp_path):
    """The run's records keep the device's paths (/root/run/eval); the report finds outcomes.json under the copy."""
    from jetnas.report import _outcomes

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "outcomes.json").write_text(json.dumps({"tasks": {"mc:x": {"acc": [1, 0]}}}))
    # the device's path, under a root that is surely absent here (a developer's machine may have a /root/run of
    # its own: dev/stage_wheels.sh builds the recall documents there)
    device = tmp_path / "device" / "root" / "run"
    assert _outcomes({"out_dir": str(device / "eval")}, tmp_path) == {"mc:x": {"acc": [1, 0]}}
    assert _outcomes({"out_dir": str(device / "eval_teacher")}, tmp_path) == {}   # an evaluation without outcomes
    assert _outcomes({}, tmp_path) == {}
