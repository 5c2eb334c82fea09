"""Every `torch.cat` / `torch.stack` of one stage-1 distillation step, where it comes from and what it moves.

The H100 profile of the stage-1 step of the SmolLM2-135M GDN hybrid (32 x 1,024 tokens) spent 7.9 GPU-ms per step
in `aten::cat` (issue 16). This script finds the call sites on CPU: it builds the step as
`benchmarks/launch_count.py` does (the same model builder, our Triton kernels under Triton's interpreter, fla's
entry points replaced by stand-ins whose PyTorch reference is not looked at, bf16 autocast), with SmolLM2-135M's
layer structure (30 layers, train_bench's layout of attention / sliding-window layers, 3:1 grouped-query heads)
at small widths, and records each cat: forward or backward, the module (the autograd node in backward), the line
of code, its output's shape and dtype. (About 15 CPU-minutes on the 2-core box, nearly all of it the interpreter
running our kernels; SmolLM2-135M's own widths did not finish one step in 20 minutes.) Shapes are then restated at the benchmark's (`SMALL_TO_BENCH`: every small width
is chosen to map to one SmolLM2-135M width, e.g. hidden 96 -> 576, the q|k|v conv's 288 -> 1,728, and the small
B, T, B * T to 32, 1,024, 32,768), with the bytes one cat moves (it reads its inputs and writes its output: 2 x
the output's bytes) summed per step. A dim the map does not know is kept and the row marked `unmapped`.

The sliding-window layers take the same attention path as the benchmark only when T <= 2 * window (train_bench:
T = 1,024, window 512), so the window defaults to T / 2 here. Bytes are counted, not timed (no GPU needed).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/cat_sites.py --out cat_sites.json

(PYTHONPATH=. makes `jetnas` this checkout's: a script's own folder leads sys.path.)

The last stdout line is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import contextlib
import json
import re
import shutil
import sys
import tempfile
import traceback
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import launch_count as lc
import train_bench

BENCH_B, BENCH_T = 32, 1024
#: the small model: hidden 96 (6 heads of 16, 2 key-value heads), MLP 120, vocabulary 400
SMALL = {"vocab_size": 400, "hidden_size": 96, "intermediate_size": 120, "num_attention_heads": 6,
         "num_key_value_heads": 2, "head_dim": 16}
#: small width -> SmolLM2-135M's: hidden and each of q, k, v (9 heads of 64); q|k and q|k|v; the MLP and gate|up;
#: g|b|a padded to 8 columns (96 + 2 x 6 = 108 -> 112; 576 + 18 = 594 -> 600); head dim and its half; heads;
#: key-value heads; vocabulary
SMALL_TO_BENCH = {96: 576, 192: 1152, 288: 1728, 120: 1536, 240: 3072, 112: 600, 16: 64, 8: 32, 6: 9, 2: 3,
                  400: 49152}


def _caller() -> str:
    """The innermost line of jetnas or the training code that ran the cat; in backward, when no Python code of ours
    is on the stack (a built-in autograd node such as a split's backward), "(autograd)"."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if "/torch/" in f or "/triton/" in f or f.endswith(("launch_count.py", "cat_sites.py")):
            continue
        short = re.sub(r".*/(jetnas|benchmarks)/", r"\1/", f)
        if short.startswith("jetnas/train/") and torch._C._current_autograd_node() is not None:
            return "(autograd)"  # the training loop's backward() call: no Python of ours runs this node
        return f"{short}:{frame.lineno} ({frame.name})"
    return "?"


class _Cats(TorchDispatchMode):
    """Records every aten cat / stack below autograd (so a split's backward shows as the cat it runs)."""

    def __init__(self, counter: lc.Counter_, sites: dict):
        super().__init__()
        self.counter, self.sites = counter, sites

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = lc._op_name(func)
        c = self.counter
        if name in ("cat", "stack") and c.active and not c.suspended:
            phase, module = c.where()
            node = re.search(r"<(.*)>$", module)
            key = (phase, re.sub(r" <.*>$", "", module), node.group(1) if node else "", _caller(), name,
                   tuple(out.shape), str(out.dtype).replace("torch.", ""), len(args[0]))
            self.sites[key] = self.sites.get(key, 0) + 1
        return out


def bench_shape(shape: tuple, B: int, T: int) -> tuple[tuple, bool]:
    """`shape` restated at the benchmark's: B (first dim), T, T + 1 (a batch's tokens and the next-token target)
    and B * T at 32, 1,024, 1,025, 32,768 and the widths by SMALL_TO_BENCH; and whether every dim was known (1, the
    conv width W = 4 and W - 1 = 3 stay as they are)."""
    out, known = [], True
    for i, n in enumerate(shape):
        if n == B * T:
            out.append(BENCH_B * BENCH_T)
        elif n == T:
            out.append(BENCH_T)
        elif n == T + 1:
            out.append(BENCH_T + 1)
        elif n == B and i == 0:
            out.append(BENCH_B)
        elif n in SMALL_TO_BENCH:
            out.append(SMALL_TO_BENCH[n])
        else:
            known &= n in (1, 3, 4)
            out.append(n)
    return tuple(out), known


def small_teacher_dir(target: Path, max_positions: int) -> Path:
    """A Llama with SmolLM2-135M's fields but the SMALL widths, random weights, saved as a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fields = {**train_bench.SMOLLM2_135M, **SMALL, "max_position_embeddings": max_positions}
    theta = fields.pop("rope_theta")
    LlamaForCausalLM(LlamaConfig(**fields, rope_parameters={"rope_theta": theta, "rope_type": "default"})
                     ).save_pretrained(target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=56)
    ap.add_argument("--linear", default="gdn")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from jetnas.models.convert import as_jetnas
    from jetnas.models.hf_compat import load_pretrained
    from jetnas.ops.backend import Backend
    from jetnas.train.stages import StageTeacher

    # what launch_count.build reads from its own arguments
    run = argparse.Namespace(batch_size=args.batch_size, micro_batch_size=None, seq_len=args.seq_len,
                             precision="bf16", swa_window=args.seq_len // 2, linear=args.linear,
                             layers=train_bench.SMOLLM2_135M["num_hidden_layers"], vocab=SMALL["vocab_size"],
                             teacher_per_step=False)
    if {args.batch_size, args.seq_len, args.seq_len + 1, args.batch_size * args.seq_len} & set(SMALL_TO_BENCH):
        raise SystemExit("--batch-size / --seq-len: pick values that no small width equals")
    counter_ref: list = [None]
    lc._patch_triton(counter_ref)
    lc._install_fla(counter_ref)
    backend = Backend(name="triton", interpret=True)
    work = Path(tempfile.mkdtemp(prefix="cat_sites_"))
    run.teacher_dir = str(small_teacher_dir(work / "teacher", 4 * args.seq_len))
    teacher = StageTeacher(as_jetnas(load_pretrained(run.teacher_dir, dtype=torch.float32)).requires_grad_(False)
                           .eval(), None, None, None)
    lc.use_backend(teacher.model, backend)
    trainer, names = lc.build("stage1", run, teacher, work, backend)
    with contextlib.redirect_stdout(sys.stderr):
        trainer._train_step(0)  # warm-up: first calls, the optimizer's state

    sites: dict = {}
    with lc.module_tags(lc.Counter_(names), counter_ref) as counter:
        counter.active = True
        try:
            with _Cats(counter, sites):
                trainer._train_step(1)
        finally:
            counter.active = False

    B, T = args.batch_size, args.seq_len
    rows = []
    for (phase, module, node, caller, op, shape, dtype, n_in), count in sites.items():
        shape_b, known = bench_shape(shape, B, T)
        size = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        out_bytes = size * torch.Size(shape_b).numel()
        rows.append({"phase": phase, "module": module, "node": node, "caller": caller, "op": op, "inputs": n_in,
                     "shape_small": list(shape), "shape_bench": list(shape_b), "unmapped": not known, "dtype": dtype,
                     "calls": count,
                     "MB_per_call_bench": round(2 * out_bytes / 1e6, 3),
                     "MB_per_step_bench": round(2 * out_bytes * count / 1e6, 1)})
    rows.sort(key=lambda r: -r["MB_per_step_bench"])
    by_caller: dict = defaultdict(lambda: [0, 0.0])
    for r in rows:
        by_caller[(r["caller"], r["node"])][0] += r["calls"]
        by_caller[(r["caller"], r["node"])][1] += r["MB_per_step_bench"]
    out = sys.stderr
    print(f"\n{'calls':>5} {'MB/step@bench':>13} {'MB/call':>9}  {'phase':<8} {'dtype':<8} {'shape@bench':<24} "
          "module / node / caller", file=out)
    for r in rows:
        print(f"{r['calls']:>5} {r['MB_per_step_bench']:>13.1f} {r['MB_per_call_bench']:>9.2f}  {r['phase']:<8} "
              f"{r['dtype']:<8} {r['shape_bench']!s:<24} {'(unmapped) ' * r['unmapped']}{r['module']} "
              f"<{r['node']}> {r['caller']}", file=out)
    total = sum(r["MB_per_step_bench"] for r in rows)
    print(f"total: {sum(r['calls'] for r in rows)} cats, {total:.0f} MB read + written per step at "
          f"{BENCH_B} x {BENCH_T}", file=out)
    report = {"small": {"B": B, "T": T}, "bench": {"B": BENCH_B, "T": BENCH_T}, "rows": rows,
              "by_site": [{"caller": c, "node": n, "calls": v[0], "MB_per_step_bench": round(v[1], 1)}
                          for (c, n), v in sorted(by_caller.items(), key=lambda x: -x[1][1])]}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"cats": sum(r["calls"] for r in rows), "MB_per_step_bench": round(total)}))


if __name__ == "__main__":
    main()
