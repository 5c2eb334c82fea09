"""Inventory of the memory copies in a model's captured (static) prefill pass, on CPU: every copy, where it comes
from, and the bytes it moves at the prompt length given (issue 16: an H100 profile of the SmolLM2-135M GDN hybrid's
8K prefill spent 1.59 of 17.7 GPU-ms in `direct_copy_kernel_cuda` and 0.32 in `CatArrayBatchedCopy`).

What runs: the model (default: the SmolLM2 hybrid's architecture, `results/h200_postnas_smollm2_135m/stage2/model/
config.json`, random weights, bf16) with a "triton" backend, through `jetnas.engine.prefill.StaticPrefill.run` with
`use_graph=False`: exactly the passes a CUDA graph captures, batch 1, one pass of the whole prompt (what
`auto_chunk_size` picks at 8K on an H100). It runs on CPU tensors, so three things stand in for the GPU's kernels,
none of which copies anything on the GPU either:

- **our Triton kernels** do not run (their launches are counted and skipped: their outputs are left as allocated),
  so a prompt of 8K tokens takes seconds; what the wrappers around them do (casts, `.contiguous()`) runs and counts;
- **fla's** `chunk_gated_delta_rule` is a stand-in that does what fla's `input_guard` does to its arguments (a
  contiguous copy of each non-contiguous tensor: counted, under "fla input_guard") and returns fla's outputs'
  layouts (o contiguous `[B, T, H, V]`, the final state `[N, H, K, V]` float32) without computing them;
- attention runs PyTorch's CPU kernels, whose outputs have the layouts CUDA's give (`[B, H, T, D]` strided as
  `[B, T, H, D]`).

A copy is any of the aten ops that move bytes without arithmetic: `copy_`, `_to_copy` (casts, `.to`), `clone`
(`.contiguous()`), `cat`, `index` / `index_put_` (gathers and scatters), `constant_pad_nd`, `repeat_interleave`;
fills (`fill_`, `zero_`) are listed apart. Bytes moved = bytes read + bytes written. Each copy is attributed to the
module running it (layer indices folded into the block type: `model.layers[gdn].self_attn`) and to the innermost
line of jetnas code that asked for it.

    python benchmarks/prefill_copies.py --length 8192 --out copies.json

Prints a table by site; the last stdout line is one JSON object (the totals: count and bytes, by module kind).
"""

from __future__ import annotations

import os

# our Triton kernels' wrappers check for Triton's interpreter on CPU tensors; it must be on before triton imports
os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import json
import re
import sys
import traceback
import types
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jetnas, not an installed one
HYBRID_CONFIG = ROOT / "results/h200_postnas_smollm2_135m/stage2/model/config.json"

COPY_OPS = {"copy_", "_to_copy", "clone", "cat", "index", "index_put_", "_index_put_impl_", "constant_pad_nd",
            "repeat_interleave", "_unsafe_index", "index_select", "gather", "scatter", "index_copy_", "stack"}
#: composite ops that copy only sometimes (dispatched whole under inference mode): recorded when the result does not
#: share the input's storage
MAYBE_COPY_OPS = {"contiguous", "reshape", "to", "flatten", "unflatten", "type_as", "repeat", "expand_as", "view_as"}
GEMM_OPS = {"linear", "mm", "addmm", "matmul", "bmm", "baddbmm"}
FILL_OPS = {"fill_", "zero_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros",
            "new_ones", "new_full"}


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in `obj` (nested lists, tuples, dicts), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _site() -> str:
    """The innermost line of jetnas code on the stack (or of the fla stand-in below), as `path:line (function)`."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        f = frame.filename
        if "/jetnas/" in f or frame.name.startswith("fla_"):
            short = re.sub(r".*/(jetnas/)", r"\1", f) if "/jetnas/" in f else "fla stand-in"
            return f"{short}:{frame.lineno} ({frame.name})"
    return "(outside jetnas)"


class Recorder(TorchDispatchMode):
    """Records every copy and fill (see the module docstring) with its module, site, shapes and bytes."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.rows: list[dict] = []
        self.triton: dict[str, int] = defaultdict(int)
        self.paused = 0
        self.gemms: list[dict] = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if self.paused:
            return out
        ins, outs = _tensors(args), _tensors(out)
        if name in GEMM_OPS:
            self.gemm(name, ins, outs)
            return out
        if name in MAYBE_COPY_OPS:
            # composite ops (inference mode dispatches them whole): a copy only when the result has its own storage
            if not (ins and outs) or outs[0].untyped_storage().data_ptr() == ins[0].untyped_storage().data_ptr():
                return out
        elif name not in COPY_OPS and name not in FILL_OPS:
            return out
        if name in ("copy_", "index_put_", "_index_put_impl_", "index_copy_"):
            # in place: the destination's written part is the source's size (index_put_ writes `values`)
            src = args[1] if name == "copy_" else args[2] if name in ("index_put_", "_index_put_impl_") else args[3]
            written = _nbytes(src) if name != "copy_" else _nbytes(args[0])
            read = _nbytes(src)
        else:
            written = sum(_nbytes(t) for t in outs)
            read = 0 if name in FILL_OPS else sum(_nbytes(t) for t in ins if t.is_floating_point())
            if name in ("index", "_unsafe_index", "index_select", "gather"):
                read = written  # a gather reads what it writes (plus indices)
        # what was read: copy_'s source, else the first input
        first = args[1] if name == "copy_" else ins[0] if ins else None
        self.rows.append({
            "op": name, "kind": "fill" if name in FILL_OPS else "copy",
            "module": self.stack[-1] if self.stack else "(top level)", "site": _site(),
            "shape": list(outs[0].shape) if outs else None, "dtype": str(outs[0].dtype) if outs else None,
            "src": None if first is None else {"shape": list(first.shape), "stride": list(first.stride()),
                                               "dtype": str(first.dtype)},
            "read": read, "written": written})
        return out

    def gemm(self, name: str, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """A matrix product's operands: shapes, strides and whether each is 16-byte aligned (address and every
        stride but the unit one), which cuBLAS / CUTLASS need for their vectorized (align8 in bf16) kernels."""
        def desc(t):
            strides = [s for s in t.stride() if s != 1]
            aligned = (t.data_ptr() % 16 == 0) and all((s * t.element_size()) % 16 == 0 for s in strides)
            return {"shape": list(t.shape), "stride": list(t.stride()), "offset": t.storage_offset(),
                    "aligned16": aligned}

        operands = [desc(t) for t in ins[:2]] + [desc(t) for t in outs[:1]]
        self.gemms.append({"op": name, "module": self.stack[-1] if self.stack else "(top level)", "site": _site(),
                           "operands": operands, "aligned": all(o["aligned16"] for o in operands)})


def install_fla_stand_in() -> None:
    """A stand-in `fla` package (see the module docstring) and `Backend.runs_fla` true on CPU."""
    from jetnas.ops.backend import Backend

    def fla_input_guard(*tensors):
        return [t.contiguous() if isinstance(t, torch.Tensor) else t for t in tensors]

    def fla_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                   use_qk_l2norm_in_kernel=False, cu_seqlens=None, **_):
        q, k, v, g, beta, initial_state = fla_input_guard(q, k, v, g, beta, initial_state)
        B, T, H, K = q.shape
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        o = torch.empty(B, T, H, v.shape[-1], dtype=v.dtype, device=v.device)
        final = torch.empty(N, H, K, v.shape[-1], dtype=torch.float32, device=v.device) if output_final_state else None
        return o, final

    def fla_fused_recurrent_gated_delta_rule(q, k, v, g=None, beta=None, **kwargs):
        return fla_chunk_gated_delta_rule(q, k, v, g, beta, **kwargs)

    fla = types.ModuleType("fla")
    ops = types.ModuleType("fla.ops")
    gdn = types.ModuleType("fla.ops.gated_delta_rule")
    gdn.chunk_gated_delta_rule = fla_chunk_gated_delta_rule
    gdn.fused_recurrent_gated_delta_rule = fla_fused_recurrent_gated_delta_rule
    fla.ops, ops.gated_delta_rule = ops, gdn
    sys.modules.update({"fla": fla, "fla.ops": ops, "fla.ops.gated_delta_rule": gdn})
    Backend.runs_fla = lambda self, x: self.name == "triton"


def skip_triton(recorder: Recorder) -> None:
    """Every Triton launch is counted and skipped (see the module docstring)."""
    from triton.runtime import autotuner, interpreter, jit

    def wrap(cls):
        def run(self, *args, **kwargs):
            fn = self
            while hasattr(fn, "fn") and not hasattr(fn, "__name__"):
                fn = fn.fn
            recorder.triton[getattr(fn, "__name__", type(fn).__name__)] += 1

        cls.run = run

    for cls in (jit.JITFunction, interpreter.InterpretedFunction, autotuner.Autotuner, autotuner.Heuristics):
        wrap(cls)


def build_model(args):
    from jetnas.models import JetNemotronConfig, JetNemotronForCausalLM
    from jetnas.ops.backend import Backend

    config = JetNemotronConfig.from_pretrained(Path(args.config).parent)
    if args.teacher:
        config.block_types = ["attn"] * config.num_hidden_layers
    config.max_position_embeddings = max(config.max_position_embeddings, args.length + 64)
    torch.manual_seed(0)
    model = JetNemotronForCausalLM(config, backend=Backend("triton", interpret=True))
    return model.to(torch.bfloat16).eval()


def folded(model) -> dict[int, str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from launch_count import folded_names

    return folded_names(model, "")


def inventory(args) -> dict:
    from jetnas.engine.cache import StaticCache
    from jetnas.engine.prefill import StaticPrefill

    recorder = Recorder()
    install_fla_stand_in()
    skip_triton(recorder)
    model = build_model(args)
    names = folded(model)

    def pre(module, _args):
        if id(module) in names:
            recorder.stack.append(names[id(module)])

    def post(module, _args, _out):
        if id(module) in names and recorder.stack and recorder.stack[-1] == names[id(module)]:
            recorder.stack.pop()

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post, always_call=True)
    T = args.length
    cache = StaticCache(model, 1, T)
    prefill = StaticPrefill(model, cache, 1, T, args.chunk, use_graph=False)
    ids = torch.randint(1, model.config.vocab_size, (1, T))
    prefill.prepare()  # the one-token call that allocates the states, and one eager prefill: not recorded
    recorder.rows.clear()
    recorder.triton.clear()
    with recorder:
        prefill.run(ids)
    h1.remove()
    h2.remove()
    return summarize(recorder, args)


def summarize(recorder: Recorder, args) -> dict:
    sites: dict[tuple, dict] = {}
    for r in recorder.rows:
        key = (r["kind"], r["module"], r["site"], r["op"], str(r["shape"]), r["dtype"])
        s = sites.setdefault(key, {"kind": r["kind"], "module": r["module"], "site": r["site"], "op": r["op"],
                                   "shape": r["shape"], "dtype": r["dtype"], "src": r["src"], "count": 0,
                                   "bytes_moved": 0})
        s["count"] += 1
        s["bytes_moved"] += r["read"] + r["written"]
    rows = sorted(sites.values(), key=lambda s: -s["bytes_moved"])
    totals: dict[str, dict] = {}
    for s in rows:
        group = "copy" if s["kind"] == "copy" else "fill"
        where = re.sub(r"\.(self_attn|mlp|input_layernorm|post_attention_layernorm).*", r".\1", s["module"])
        for key in (group, f"{group} {where}"):
            t = totals.setdefault(key, {"count": 0, "bytes_moved": 0})
            t["count"] += s["count"]
            t["bytes_moved"] += s["bytes_moved"]
    gemms: dict[tuple, dict] = {}
    for g in recorder.gemms:
        key = (g["module"], g["site"], json.dumps([(o["shape"], o["stride"]) for o in g["operands"]]), g["aligned"])
        gemms.setdefault(key, {**g, "count": 0})["count"] += 1
    return {"length": args.length, "chunk": args.chunk, "model": "teacher" if args.teacher else "hybrid",
            "totals": totals, "misaligned_gemms": sum(g["count"] for g in gemms.values() if not g["aligned"]),
            "triton_launches": dict(recorder.triton), "sites": rows, "gemms": list(gemms.values())}


def print_table(report: dict) -> None:
    out = sys.stderr
    print(f"\n=== copies in one static prefill pass of {report['length']} tokens ({report['model']})", file=out)
    for key, t in sorted(report["totals"].items(), key=lambda x: -x[1]["bytes_moved"]):
        print(f"  {t['count']:>5} ops {t['bytes_moved'] / 1e6:>10.1f} MB  {key}", file=out)
    print("--- by site", file=out)
    for s in report["sites"]:
        src = s["src"] or {}
        print(f"  {s['count']:>4} x {s['op']:<16} {s['bytes_moved'] / 1e6:>9.2f} MB  {s['module']:<40} "
              f"{s['site']}  -> {s['shape']} {s['dtype']}  from {src.get('shape')} stride {src.get('stride')}",
              file=out)
    print("--- matrix products (operands: input, weight, output; * = not 16-byte aligned)", file=out)
    for g in report["gemms"]:
        cells = "  ".join(f"{o['shape']}/{o['stride']}{'' if o['aligned16'] else '*'}" for o in g["operands"])
        print(f"  {g['count']:>4} x {g['op']:<7} {'ok ' if g['aligned'] else 'MIS'} {g['module']:<40} {cells}",
              file=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=8192, help="prompt tokens (batch 1)")
    ap.add_argument("--chunk", type=int, default=None, help="tokens per pass (default: the whole prompt)")
    ap.add_argument("--config", default=str(HYBRID_CONFIG))
    ap.add_argument("--teacher", action="store_true", help="every layer full attention (the teacher's shapes)")
    ap.add_argument("--out", default=None, help="write the whole report (every site) here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    report = inventory(args)
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("length", "chunk", "model", "totals", "misaligned_gemms")}))


if __name__ == "__main__":
    main()
