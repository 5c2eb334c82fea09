"""benchmarks/loss_bench.py on CPU at tiny sizes: a smoke test before spending device time on it, and a check that
its correctness gate can fail."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_loss_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "loss_bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/loss_bench.py", "--device", "cpu", "--tiny", "--steps", "torch",
                           "--repeats", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["passed"], summary["failures"]
    report = json.loads(out.read_text())
    methods = {(r["task"], r["method"]) for r in report["rows"]}
    for task in ("kl", "ce", "kl+ce"):
        assert {(task, "naive"), (task, "torch/64"), (task, "torch/auto")} <= methods
    assert ("kl", "torch+teacher-logits/auto") in methods and ("ce", "torch+teacher-logits/auto") not in methods
    for row in report["rows"]:
        assert row["ok"] and row["median_ms"] > 0 and row["peak_mib"] is None  # no allocator statistics on CPU
        # a real distance from the float32 reference was measured (bf16 inputs: not zero, not large)
        assert 0 < row["errors_vs_fp32"]["grad_h"] < 0.05
        assert ("grad_w" in row["errors_vs_fp32"]) == (row["task"] != "kl")  # the head trains in stage 2 only
    assert set(summary["best"]) == {"kl", "ce", "kl+ce"}


def test_loss_bench_flags_a_wrong_gradient(tmp_path, monkeypatch, capsys):
    """A chunked path whose gradient is 10% off fails the gate (and is still reported, not dropped)."""
    import loss_bench

    from jetnas.ops.losses import chunked_linear_kl_ce

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.1 * g

    def wrong(*args, **kwargs):
        out = chunked_linear_kl_ce(*args, **kwargs)
        return out._replace(loss=Scaled.apply(out.loss))

    monkeypatch.setattr(loss_bench, "chunked_linear_kl_ce", wrong)
    out = tmp_path / "wrong.json"
    monkeypatch.setattr(sys, "argv", ["loss_bench.py", "--device", "cpu", "--tiny", "--steps", "torch", "--tasks", "ce",
                                      "--chunks", "auto", "--repeats", "1", "--out", str(out)])
    loss_bench.main()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not summary["passed"] and any("ce:torch/auto" in f for f in summary["failures"])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["naive"]["ok"] and not rows["torch/auto"]["ok"] and rows["torch/auto"]["median_ms"] > 0
    assert rows["torch/auto"]["errors_vs_fp32"]["grad_h"] == pytest.approx(0.1, abs=0.02)
