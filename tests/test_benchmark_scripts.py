"""The GPU check scripts run on CPU too (reference paths): a smoke test before spending device time on them."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_divergence_finds_the_first_split_and_measures_up_to_it():
    from gpu_generate_check import divergence

    scores = [torch.tensor([[1.0, 0.9995, 0.0], [2.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])]
    a = SimpleNamespace(scores=scores, sequences=torch.tensor([[5, 0, 1], [5, 0, 0]]))
    nudged = [scores[0] + torch.tensor([[0.0, 0.001, 0.0], [0.0, 0.0, 0.0]]), scores[1] + 0.3]
    b = SimpleNamespace(scores=nudged, sequences=torch.tensor([[5, 1, 1], [5, 0, 0]]))
    split = divergence(a, b, prompt_len=1)
    assert split["first_differing_step"] == 0
    assert split["max_logit_diff_before"] == pytest.approx(1e-3, rel=1e-3)  # step 0 only, not step 1's 0.3
    assert split["margin_at_first_difference"] == pytest.approx(5e-4, rel=1e-2)
    assert split["scores_rel_err_before"] < 5e-3
    assert divergence(a, a, 1) == {"first_differing_step": None, "max_logit_diff_before": 0.0,
                                   "scores_rel_err_before": 0.0}


def run_script(args: list[str], tmp_path: Path) -> dict:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow(seconds=28)
def test_generate_check_runs_on_cpu(tmp_path):
    out = tmp_path / "generate.json"
    # --per-type for one linear type: each type's `attn, X, swa, X` runs the same section code (163 s for all seven on
    # one thread of the 2-core box), and the model of every type still runs every block type through it. An 80-token
    # prompt (two prefill chunks, the second partial) and 16 steps instead of the GPU's 288 and 32: the same code
    summary = run_script(["benchmarks/gpu_generate_check.py", "--sections", "generate,teacher_forced", "--dtypes",
                          "bfloat16", "--per-type", "--types", "jet", "--prompt-len", "80", "--new-tokens", "16",
                          "--out", str(out)], tmp_path)
    assert summary["passed"], summary["failures"]
    report = json.loads(out.read_text())
    assert report["generate"]["cached_equals_uncached"]
    assert {"bfloat16", "bfloat16:attn+swa", "bfloat16:attn+jet+swa+jet"} <= set(report["teacher_forced"])
    assert report["teacher_forced"]["bfloat16"]["full_vs_fp32"] > 0  # a real bf16 vs fp32 distance was measured


@pytest.mark.slow(seconds=21)
def test_decode_step_bench_logit_check_runs_on_cpu(tmp_path):
    out = tmp_path / "decode_step.json"
    # the logit check along an 80-token prompt (two prefill chunks) and 16 steps, not the GPU's 288 and 32
    summary = run_script(["benchmarks/decode_step_bench.py", "--device", "cpu", "--repeats", "0", "--blocks", "gdn",
                          "--prompt-len", "80", "--new-tokens", "16", "--out", str(out)], tmp_path)
    assert summary["gdn"]["logits_ok"]
    assert json.loads(out.read_text())["blocks"]["gdn"]["logits"]["after_vs_before"] == 0.0  # one path on CPU


def test_roofline_rw_recomputes_what_bench_reports(tmp_path):
    """benchmarks/roofline_rw.py on a results file: the same reads + writes bound `jetnas bench` now writes itself,
    from the shapes of the named model (a directory) or preset."""
    from roofline_rw import recompute

    from jetnas.bench.costs import decode_cost
    from jetnas.models import JetNemotronForCausalLM
    from jetnas.models.presets import preset_config
    from tests.utils import tiny_config

    model = JetNemotronForCausalLM(tiny_config(["attn", "jet", "swa", "gdn"])).eval()
    model.save_pretrained(tmp_path / "m")
    cost = decode_cost(model, 4, 64)
    bench = {"copy_bandwidth_bytes_per_s": 1e10, "dtype": "torch.float32", "rows": [
        {"system": "jetnas engine", "context_length": 64, "batch_size": 4, "decode_tokens_per_s": 1000.0,
         "bytes_per_step": cost.bytes_per_step, "roofline_fraction": 0.1},
        {"system": "transformers generate", "context_length": 64, "batch_size": 4}]}
    rows, skipped = recompute(bench, str(tmp_path / "m"))
    assert skipped == [] and len(rows) == 1
    assert rows[0]["bytes_moved_per_step"] == cost.bytes_moved_per_step
    assert rows[0]["roofline_rw_fraction"] == pytest.approx(1000.0 / cost.roofline_rw_tokens_per_s(1e10))
    # an engine.json names its presets; architectures built elsewhere are skipped, and said to be
    with torch.device("meta"):
        big = decode_cost(JetNemotronForCausalLM(preset_config("jet-nemotron-2b")), 8, 4096, torch.bfloat16)
    engine = {"copy_bandwidth_TBps": 3.0, "rows": [
        {"system": "jetnas engine: jet-nemotron-2b", "context_length": 4096, "batch_size": 8,
         "decode_tokens_per_s": 500.0, "bytes_per_step": big.bytes_per_step, "roofline_fraction": 0.2},
        {"system": "jetnas engine: qwen3-1.7b", "context_length": 4096, "batch_size": 8,
         "decode_tokens_per_s": 400.0, "bytes_per_step": 1, "roofline_fraction": 0.3}]}
    rows, skipped = recompute(engine)
    assert skipped == ["jetnas engine: qwen3-1.7b"]
    assert rows[0]["bytes_moved_per_step"] == big.bytes_moved_per_step


@pytest.mark.slow(seconds=20)
def test_train_bench_times_every_mode_and_compares_two_runs(tmp_path):
    """benchmarks/train_bench.py on a tiny Llama teacher on CPU: each mode's steps are timed, their FLOPs counted and
    losses logged, and `--compare` puts two runs side by side."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.utils import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    outs = []
    for label in ("a", "b"):
        outs.append(tmp_path / f"{label}.json")
        summary = run_script(["benchmarks/train_bench.py", "--teacher", str(tmp_path / "teacher"), "--device", "cpu",
                              "--linear", "gla", "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--warmup",
                              "1", "--swa-window", "8", "--label", label, "--out", str(outs[-1])], tmp_path)
        assert set(summary["modes"]) == {"supernet", "stage1", "stage2"}
        assert all(m["tokens_per_s"] > 0 for m in summary["modes"].values()), summary
    report = json.loads(outs[0].read_text())
    for mode in report["modes"].values():
        assert len(mode["losses"]) == 2 and mode["flops_per_token"] > 0
    table = run_script(["benchmarks/train_bench.py", "--compare", f"{outs[0]},{outs[1]}"], tmp_path)
    # same code, same seed: the same losses step by step
    assert table["stage1"]["b"]["max_abs_loss_diff_vs_a"] == 0.0
    assert table["supernet"]["b"]["speedup_vs_a"] > 0


def test_train_bench_compare_puts_a_captured_step_beside_the_base(tmp_path):
    """`--compare old,new` with `new` run under `--cuda-graph`: the new run's `stage1-graph` mode becomes its own
    column against the old run's `stage1` (speed-up and loss agreement), as the GPU session's stage-1 step reads it."""
    def run(label, modes):
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps({"label": label, "modes": {
            mode: {"tokens_per_s": tps, "mfu": 0.1, "losses": [{"step": i, "loss": loss} for i, loss in enumerate(ls)]}
            for mode, (tps, ls) in modes.items()}}))
        return path
    old = run("old", {"stage1": (100.0, [3.0, 2.0])})
    new = run("new", {"stage1": (250.0, [3.0, 2.5]), "stage1-graph": (300.0, [3.5, 2.0])})
    table = run_script(["benchmarks/train_bench.py", "--compare", f"{old},{new}"], tmp_path)
    row = table["stage1"]
    assert row["new"]["speedup_vs_old"] == 2.5 and row["new-graph"]["speedup_vs_old"] == 3.0
    assert row["new"]["max_abs_loss_diff_vs_old"] == 0.5 and row["new-graph"]["mean_abs_loss_diff_vs_old"] == 0.25
    assert "speedup_vs_old" not in row["old"]


@pytest.mark.slow
def test_prefill_bench_runs_on_cpu(tmp_path):
    """benchmarks/prefill_bench.py --device cpu --tiny: every section's rows measured (tokens/s, MFU, the chunk rule),
    the captured-path checks passed (on CPU the static passes run eagerly: exactly the forward's numbers), and the
    issue's headline keys in the last line."""
    out = tmp_path / "prefill.json"
    summary = run_script(["benchmarks/prefill_bench.py", "--device", "cpu", "--tiny", "--repeats", "1",
                          "--segment-state-pass", "4", "--out", str(out)], tmp_path)
    for key in ("hybrid_prefill_vs_teacher_8k", "hybrid_prefill_vs_teacher_32k", "jet2b_prefill_64k_tok_s",
                "jet2b_vs_qwen3_prefill_256k"):
        assert summary[key] > 0 and summary["targets"][key]["target"] > 0
    assert summary["checks_passed"] and summary["default_prefill_mode"] == "forward"
    report = json.loads(out.read_text())
    rows = {(r["row"], r["context_length"]): r for r in report["rows"]}
    assert all("error" not in r for r in rows.values()), [r.get("error") for r in rows.values()]
    # 13 rows, plus the hybrid's segment-pass row at each of the two SmolLM2 contexts (on CPU the PyTorch path)
    assert len(rows) == 15 and all(r["mfu"] > 0 and r["flops"] > 0 for r in rows.values())
    assert {("smollm2-hybrid:static:segments4", 16), ("smollm2-hybrid:static:segments4", 64)} <= set(rows)
    # the old bench default chunk is scaled with the contexts (8192 / 512 = 16); "auto" takes the whole prompt
    assert rows[("jet-nemotron-2b:chunk-8192:forward", 128)]["chunk_size"] == 16
    assert rows[("jet-nemotron-2b:bench-defaults", 128)]["chunk_size"] == 128
    assert {"bfloat16", "float32", "smollm2-hybrid@16", "smollm2-teacher@64", "smollm2-hybrid@16:segments4"} <= set(
        report["checks"])
    assert report["checks"]["smollm2-hybrid@64:segments4"]["passed"]
    assert report["checks"]["bfloat16"]["static_vs_forward"] == 0.0


def test_segment_pass_bench_checks_on_cpu(tmp_path):
    """benchmarks/gdn_segment_pass_bench.py --device cpu: the segment-parallel reference's checks at small shapes
    (T not a multiple of the segments' tokens, batch 2, K != V); the GPU run compares fla's kernels the same way."""
    out = tmp_path / "seg.json"
    proc = subprocess.run([sys.executable, "benchmarks/gdn_segment_pass_bench.py", "--device", "cpu", "--shapes",
                           "1x2x16x16,2x1x8x24", "--lengths", "200", "--segments", "2,3,8", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["checks_passed"] and len(report["checks"]) == 6
    assert "checks passed" in proc.stdout.splitlines()[-1]


def _run_interpreted(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)")
def test_gated_norm_tiles_bench_checks_every_launch_on_cpu(tmp_path):
    """benchmarks/gated_norm_tiles_bench.py --tiny under Triton's interpreter: every forward tile and backward
    launch it would time on a GPU is run and checked against the float32 reference."""
    out = tmp_path / "gn.json"
    _run_interpreted(["benchmarks/gated_norm_tiles_bench.py", "--tiny", "--shapes", "prefill-8k", "--out", str(out)])
    entry = json.loads(out.read_text())["shapes"]["prefill-8k"]
    assert len(entry["forward"]) == 7 and len(entry["backward"]) == 9  # --tiny: a sixth of each grid, its ends
    assert all(r["passed"] for r in entry["forward"] + entry["backward"])
    assert {"rows", "auto"} <= {r["tile"] for r in entry["backward"] if isinstance(r["tile"], str)}
    # the default launches at the model's gate strides, checked too
    assert [r["stride"] for r in entry["gate_strides"]] == [594, 600, 608]
    assert all(r["passed"] for r in entry["gate_strides"])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)")
def test_short_conv_forward_sweep_runs_on_cpu(tmp_path):
    """benchmarks/short_conv_bench.py --fwd-sweep under Triton's interpreter: the old forward's default row, the
    per-tap forward's default and its 37 tiles; every per-tap tile gives its default's output bit for bit, and
    every row is within one bf16 rounding of the old forward's."""
    out = tmp_path / "sc.json"
    proc = _run_interpreted(["benchmarks/short_conv_bench.py", "--device", "cpu", "--fwd-sweep", "1x16x48",
                             "--iters", "1", "--out", str(out)])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["configs"] == 39 and summary["differ_from_default"] == [] and summary["outside_tol_of_old"] == []
    sweep = json.loads(out.read_text())["fwd_sweep"]
    assert sweep["shape"] == [1, 16, 48, 4]
    assert [(r["path"], r["tile"]) for r in sweep["rows"][:3]] == [("old", "default"), ("per_tap", "default"),
                                                                  ("per_tap", [4, 64, 2])]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)")
def test_swa_bench_checks_every_row_on_cpu(tmp_path):
    """benchmarks/swa_bench.py --tiny --sweep under Triton's interpreter: the kernel's default launch and each swept
    tile checked against the old path, the kernel without a window against causal SDPA, the table and JSON written."""
    out = tmp_path / "swa.json"
    proc = _run_interpreted(["benchmarks/swa_bench.py", "--tiny", "--sweep", "--shapes", "tiny-w8,tiny-short-w32",
                             "--out", str(out)])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["passed"] and set(summary["old_over_triton"]) == {"tiny-w8", "tiny-short-w32"}
    report = json.loads(out.read_text())["shapes"]
    assert report["tiny-w8"]["path_old"] == "query blocks of 2W"
    assert report["tiny-short-w32"]["path_old"] == "one SDPA with a mask"
    for entry in report.values():
        assert set(entry["rows"]) == {"old", "triton", "causal_sdpa", "triton_causal"}
        assert len(entry["sweep"]) == 2 and all(s["passed"] for s in entry["sweep"])
        assert entry["rows"]["triton"]["rel_vs_fp32"] < 1e-2
    assert "old ms" in proc.stdout


def test_attention_locality_splits_a_known_attention_into_window_sink_and_rest():
    from attention_locality import window_shares

    # T = 6, one head: each query puts 0.5 on the first token, 0.3 on itself, 0.2 spread evenly over the keys between
    T = 6
    a = torch.zeros(1, 1, T, T)
    for q in range(T):
        a[0, 0, q, 0] += 0.5
        a[0, 0, q, q] += 0.3 if q else 0.5
        for k in range(1, q):
            a[0, 0, q, k] += 0.2 / (q - 1)
        if q == 1:
            a[0, 0, q, 1] += 0.2
    assert torch.allclose(a.sum(-1), torch.ones(1, 1, T))
    inside, sink, rest = window_shares([a], [2])
    # W = 2, queries 2..5: the window holds the query (0.3) and the key before it (0.2 / (q - 1))
    want = sum(0.3 + 0.2 / (q - 1) for q in range(2, T)) / 4
    assert inside[0, 0] == pytest.approx(want) and sink[0, 0] == pytest.approx(0.5)
    assert rest[0, 0] == pytest.approx(want / 0.5)


def test_attention_locality_window_cost_is_zero_without_windows_and_not_with_them():
    from attention_locality import window_damage
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=2)).eval()
    rows = torch.randint(0, 64, (2, 24))
    none, narrow = window_damage(teacher, rows, 4, [[]]), window_damage(teacher, rows, 4, [[1], [0, 2]])
    assert abs(none[0]) < 1e-5  # converted with every layer full attention: the teacher's own loss
    assert all(abs(cost) > 1e-4 for cost in narrow)  # a 4-token window changes every later position's loss


def test_layer_ablation_knocks_out_one_mixer_exactly_and_restores_it(tmp_path):
    from layer_ablation import ablate, knocked_out

    from jetnas.evaluation.tasks import parse_task
    from tests.utils import randomize_zero_init, tiny_lm

    lm, model = tiny_lm(("attn", "gdn", "swa"))
    randomize_zero_init(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        intact = model(ids).logits
        with knocked_out(model, 0):
            knocked = model(ids).logits
        assert torch.equal(model(ids).logits, intact)  # the hook is gone after the block
        # an attention layer's mixer output is its o_proj's: zeroing that projection is the same knock-out
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        assert torch.allclose(model(ids).logits, knocked, atol=1e-6)
    tasks = [parse_task("retrieval:kv@96?n=2&keys=2"), parse_task("mc:" + str(_tiny_mc(tmp_path)))]
    saved = []
    result = ablate(model, lm, tasks, [1, 2], on_layer=lambda r: saved.append(len(r["layers"])))
    assert saved == [1, 2] and [e["type"] for e in result["layers"]] == ["gdn", "swa"]
    for entry in result["layers"]:
        for task in tasks:
            metric = task.primary_metric
            assert entry["delta"][task.name] == pytest.approx(
                entry["tasks"][task.name][metric] - result["baseline"][task.name][metric])
        assert "retrieval:kv@96?n=2&keys=2:target_nll" in entry["delta"]
    # the gdn layer's knock-out moves the answers' loss (the model's output depends on every mixer)
    assert result["layers"][0]["delta"]["retrieval:kv@96?n=2&keys=2:target_nll"] != 0
    # a time budget already spent starts no layer and says which it left out
    cut = ablate(model, lm, tasks, [1, 2], max_seconds=0)
    assert cut["layers"] == [] and cut["left_out"] == [1, 2]


def _tiny_mc(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [{"id": i, "task": "t", "question": "The quick brown fox", "choices": [" jumps", " sleeps"], "label": i % 2}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_layer_ablation_script_runs_on_a_saved_model_and_refuses_a_layer_it_lacks(tmp_path):
    from jetnas.models import JetNemotronForCausalLM
    from tests.utils import tiny_config, tiny_tokenizer

    model_dir = tmp_path / "model"
    JetNemotronForCausalLM(tiny_config(["attn", "gdn"], vocab_size=len(tiny_tokenizer()))).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    script = ROOT / "benchmarks" / "layer_ablation.py"
    common = [sys.executable, str(script), "--model", str(model_dir), "--device", "cpu", "--dtype", "float32",
              "--tasks", f"retrieval:kv@96?n=2&keys=2,ppl:{tmp_path / 'text.txt'}", "--out", str(tmp_path / "out")]
    proc = subprocess.run(common, check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "layer_ablation.json").read_text())
    assert [e["layer"] for e in report["layers"]] == [0, 1] and (tmp_path / "out" / "layer_ablation.png").exists()
    assert "| intact |" in proc.stdout
    bad = subprocess.run(common + ["--layers", "0,5"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "[5] outside the model's 2 layers" in bad.stderr
    bad = subprocess.run(common + ["--autotune-configs", "0"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--autotune-configs=0 must be >= 1" in bad.stderr


def test_position_kl_rows_start_at_documents_and_a_model_against_itself_is_zero():
    import numpy as np
    from position_kl import buckets, document_rows, per_position, summarise
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = np.array([5, 6, 0, 7, 8, 9, 0, 10, 11, 12, 13, 0, 14], dtype=np.uint16)
    rows = document_rows(tokens, eos=0, rows=3, length=3)
    assert rows.tolist() == [[5, 6, 0], [7, 8, 9], [10, 11, 12]]  # the file's start, then after each EOS, 3 to follow
    with pytest.raises(ValueError, match="3 document starts have 3 tokens after them; asked for 4 rows"):
        document_rows(tokens, eos=0, rows=4, length=3)
    assert buckets(40) == [(0, 16), (16, 32), (32, 40)]

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    teacher, other = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 40))
    same = summarise(per_position(teacher, teacher, ids))
    assert [b["n"] for b in same] == [32, 32, 14]  # 39 predicted positions a row
    assert all(abs(b["kl"]) < 1e-6 and b["teacher_nll"] == b["student_nll"] for b in same)
    values = per_position(teacher, other, ids)
    assert (values["kl"] >= -1e-6).all() and values["kl"].mean() > 1e-3
    # the bucket means are the positions' means
    table = summarise(values)
    assert table[1]["kl"] == pytest.approx(values["kl"][:, 16:32].mean().item())


def test_position_kl_compare_pairs_two_students_row_by_row(tmp_path):
    """`--compare`: B - A per bucket is the mean of the rows' differences, with its standard error over rows; files
    of other rows are refused."""
    import numpy as np
    from position_kl import compare

    def report(kl_rows, nll_rows, rows=3):
        return {"data": "val.bin", "rows": rows, "length": 32, "teacher": "t",
                "buckets": [{"positions": [0, 16], "kl": float(np.mean(kl_rows)), "student_nll": float(np.mean(nll_rows)),
                             "row_kl": kl_rows, "row_student_nll": nll_rows}]}

    a = report([0.10, 0.30, 0.50], [2.0, 3.0, 4.0])
    b = report([0.08, 0.27, 0.49], [2.0, 2.9, 4.1])
    (row,) = compare(a, b)
    d = np.array([-0.02, -0.03, -0.01])
    assert row["kl_diff"] == pytest.approx(d.mean()) and row["kl_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert row["student_nll_diff"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="not the same rows"):
        compare(a, report([0.1] * 4, [1.0] * 4, rows=4))
    for name, r in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(r))
    proc = subprocess.run([sys.executable, "benchmarks/position_kl.py", "--compare", str(tmp_path / "a.json"),
                           str(tmp_path / "b.json"), "--out", str(tmp_path / "cmp")],
                          check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 0-15 | 0.3000 | 0.2800 | -0.0200 (0.0058) |" in proc.stdout
    assert (tmp_path / "cmp" / "position_kl_compare.json").exists()
