"""benchmarks/launch_count.py on a 2-layer model (16 tokens: the counts do not depend on the length): it runs, and its counts hold what the step is known to launch."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_launch_count_stage1(tmp_path):
    out = tmp_path / "counts.json"
    # layers 0-1 of the layout are gdn (its attn / swa layers are 10, 11, 23, 28)
    proc = subprocess.run([sys.executable, "benchmarks/launch_count.py", "--modes", "stage1", "--layers", "2",
                           "--seq-len", "16", "--batch-size", "1", "--swa-window", "8", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])["stage1"]
    stage1 = json.loads(out.read_text())["modes"]["stage1"]
    ops = stage1["by_op"]
    # two gdn layers: fla's gated delta rule is 7 launches forward and 9 backward each (FLA_LAUNCHES)
    assert ops["fla: chunk_gated_delta_rule (fwd)"] == 2 * 7 and ops["fla: chunk_gated_delta_rule (bwd)"] == 2 * 9
    # the gates are one kernel each way per layer; the optimizer one fused AdamW per parameter group
    assert ops["triton: _gdn_gates_fwd_kernel"] == 2 and ops["triton: _gdn_gates_bwd_kernel"] == 2
    assert 1 <= ops["aten: _fused_adamw_"] <= 2
    # one host read per step (the trainer's metrics), views and dtype queries not counted as launches
    assert last["sync"] == 1 and "aten: view" not in ops and "aten: promote_types" not in ops
    assert stage1["by_phase"]["forward"] > 0 and stage1["by_phase"]["backward"] > 0
    assert last["launches"] == last["aten"] + last["triton"] + last["fla"]
    backward_modules = {r["module"].split(" <")[0] for r in stage1["rows"] if r["phase"] == "backward"}
    assert "model.layers[gdn].self_attn" in backward_modules  # backward ops are attributed to their modules
