"""The bookkeeping of `benchmarks/elementwise_traffic.py` on toy graphs: bytes per op, the source line of forward
and backward ops, autograd's gradient-accumulation adds told apart from a node's own ops, the extrapolation and
the before / after comparison. (The full run, SmolLM2-135M's widths, takes ~25 min on the CPU box: its results are
benchmarks/results/2026-12-06_cpu_elementwise.)"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("triton")  # launch_count (imported by the script) patches Triton's launchers

import elementwise_traffic as et  # noqa: E402


def test_bytes_count_broadcast_dimensions_once():
    x = torch.randn(4, 8)
    assert et.tensor_bytes(x) == 4 * 8 * 4
    assert et.tensor_bytes(torch.randn(8).expand(4, 8)) == 8 * 4  # stride 0: one row in memory
    y = torch.empty(4, 8, dtype=torch.bfloat16)
    assert et.op_bytes("copy_", (y, x), {}, y) == (4 * 8 * 4, 4 * 8 * 2)  # reads the source, writes the destination
    assert et.op_bytes("add", (x, x), {}, x + x) == (4 * 8 * 4, 4 * 8 * 4)  # one tensor read twice counts once
    assert et.op_bytes("zeros_like", (x,), {}, torch.zeros_like(x)) == (0, 4 * 8 * 4)


def test_gradient_accumulation_is_told_apart_and_sited():
    """`silu(x) * x` (jetnas's naive_silu_mul with gate = up): x feeds two ops, so backward adds their gradients;
    that add is the engine's, sited at the forward line that made the node after which it runs."""
    from jetnas.ops.fused import naive_silu_mul

    x = torch.randn(3, 16, requires_grad=True)

    def run():
        h = x * 2.0  # (made here, outside jetnas: its backward node's site is "?")
        naive_silu_mul(h, h).sum().backward()

    rec = et.record(run, {}, [None])
    rows = {k: v for k, v in rec.traffic.items()}
    accumulate = [(k, v) for k, v in rows.items() if k[3] == "accumulate"]
    assert len(accumulate) == 1
    (phase, _, site, _, op, dtypes), (n, read, written) = accumulate[0]
    assert (phase, op, dtypes, n) == ("backward", "add", "float32", 1)
    assert "jetnas/ops/fused.py" in site and "(naive_silu_mul)" in site and "grad accumulation" in site
    assert (read, written) == (2 * 3 * 16 * 4, 3 * 16 * 4)
    forward_mul = [k for k in rows if k[0] == "forward" and k[4] == "mul" and "naive_silu_mul" in k[2]]
    assert forward_mul, rows.keys()
    # the node's own backward ops: sited at its forward line (the product in naive_silu_mul; the test's own `x * 2`)
    own = {k[2] for k in rows if k[0] == "backward" and k[3] == "elementwise/copy" and "MulBackward0" in k[2]}
    assert own == {"? <MulBackward0>", next(s for s in own if "jetnas/ops/fused.py" in s)}


def test_fit_extrapolates_linearly_and_compare_lists_the_changes(tmp_path):
    key = ("forward", "(top level)", "jetnas/x.py:3 (f)", "elementwise/copy", "mul", "bfloat16")
    gone = ("backward", "(top level)", "jetnas/y.py:9 (g) <grad accumulation after X>", "accumulate", "add", "float32")
    runs = [{"tokens": 64, "rows": {key: [2, 100, 60], gone: [1, 80, 40]}},
            {"tokens": 128, "rows": {key: [2, 200, 120], gone: [1, 160, 80]}}]
    rows = et.fit(runs, 1024)
    by_op = {r["op"]: r for r in rows}
    assert by_op["mul"]["bytes_at_target"] == pytest.approx(160 * 16)  # 160 bytes per 64 tokens
    assert by_op["mul"]["launches"] == 2
    import json

    def report(rows_):
        return {"args": {"target_tokens": 1024}, "rows": rows_,
                "by_kind": et.group(rows_, ("phase", "kind"), 3e12)}

    after = [dict(by_op["mul"], site="jetnas/x.py:7 (f)")]  # the same site on another line; the add removed
    (tmp_path / "b.json").write_text(json.dumps(report(rows)))
    (tmp_path / "a.json").write_text(json.dumps(report(after)))
    summary = et.compare(str(tmp_path / "b.json"), str(tmp_path / "a.json"), 3e12, 10)
    assert [c["op"] for c in summary["changes"]] == ["add"]
    assert summary["non_gemm"]["saved"]["launches"] == 1
    assert summary["non_gemm"]["saved"]["GB"] == pytest.approx(120 * 16 / 1e9, abs=1e-3)


def test_shapes_are_written_at_the_targets_size():
    x, cos = torch.randn(2, 72, 9, 64, dtype=torch.bfloat16), torch.randn(2, 72, 64)
    sig = et.signature((x, cos), x)
    assert sig == "bf16[2,72,9,64] f32[2,72,64] -> bf16[2,72,9,64]"
    assert et.at_target_shapes(sig, 2, 72, 32, 1024) == "bf16[32,1024,9,64] f32[32,1024,64] -> bf16[32,1024,9,64]"
    # the flattened token dim (B*T = 144) anywhere; other widths untouched
    assert et.at_target_shapes("f32[144,576] -> f32[576,144]", 2, 72, 32, 1024) == "f32[32768,576] -> f32[576,32768]"
