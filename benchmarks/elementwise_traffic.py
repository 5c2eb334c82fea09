"""Memory traffic of the elementwise, copy and cast work of one stage-1 distillation step, op by op with its source
line, counted on CPU and extrapolated to the benchmark's shapes (issue 16).

`benchmarks/train_bench.py --modes stage1` times the SmolLM2-135M GDN hybrid's stage-1 step (32 x 1,024 tokens,
bf16 autocast) on a GPU; its profile says how many GPU-ms go to `aten::mul`, `aten::add`, `aten::cat`, copies and
casts, but not which line of jetnas launched them. This script runs the same step on CPU, built as
`benchmarks/launch_count.py` builds it (whose machinery it reuses: our Triton kernels under Triton's interpreter,
fla's kernels as stand-ins that count fla's launches and hide its reference's ops, AdamW `fused=True`, module
attribution), at SmolLM2-135M's real widths (hidden 576, 30 layers, MLP 1,536, vocabulary 49,152; GDN 9 heads of
64) and a few tokens, and records for every aten op below autograd and every launch of our Triton kernels:

- the phase (forward / backward) and the module (layer indices folded into their type, `teacher:` for the teacher);
- the source line: in forward the innermost jetnas frame; in backward, for a PyTorch formula, the forward line
  that made its autograd node (anomaly mode's traceback, NaN checks off), and for our autograd Functions the line
  in their `backward`;
- whether it is autograd's own **gradient accumulation**: the add the engine runs where a tensor fed several
  consumers and their gradients meet (told apart by node pre/post hooks: an op after a node's post-hook and before
  the next node's pre-hook is the engine's, not the node's);
- the bytes it moves: every tensor it reads plus every tensor it writes (`copy_` reads its source and writes its
  destination; broadcast dimensions, stride 0, count once). For a Triton launch every tensor argument counts once
  (an upper bound where a kernel reads a slice).

The step runs at two token counts (`--batch-size` x `--seq-lens`); per (phase, module, site, op, dtypes) the bytes
are fitted as `a + b * tokens` and extrapolated to `--target-tokens` (32 x 1,024), and the time an H100 would need
at `--bandwidth` (3 TB/s, about what its elementwise kernels reach) is bytes / bandwidth: an estimate of a
bandwidth-bound kernel's floor, not a measurement. Launch counts are the counted step's (the loss's chunk loop runs
more chunks at 32K tokens: the fit keeps its bytes right, the count is the small run's).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/elementwise_traffic.py --out after.json
    PYTHONPATH=/path/to/older/checkout OMP_NUM_THREADS=1 python benchmarks/elementwise_traffic.py --out before.json
    python benchmarks/elementwise_traffic.py --compare before.json,after.json --out summary.json

(PYTHONPATH decides which jetnas is measured: without it an installed one would be; the jetnas path is printed
first and kept in the JSON.) About 25 min per run on the 2-core CPU box, most of it Triton's interpreter.

The last stdout line is one JSON object (totals by category); `--out` writes every row. `--compare` lists what
changed per site (line numbers dropped, since they move) as a markdown table, and writes the summary JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import contextlib
import json
import math
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import launch_count as lc  # noqa: E402
import train_bench  # noqa: E402

sys.path.pop(0)

#: matrix products and attention: compute-bound work, reported apart from the elementwise traffic
GEMM = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addmv", "mv", "matmul", "linear", "convolution",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward",
        "scaled_dot_product_attention", "_fused_adam_", "_fused_adamw_"}
#: ops that only write their output
WRITE_ONLY = {"fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros",
              "new_ones", "new_full", "arange", "scalar_tensor"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements `t` addresses (a broadcast dimension, stride 0, counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in `obj` (nested lists, tuples, dicts), in argument order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def op_bytes(name: str, args, kwargs, out) -> tuple[int, int]:
    """(read, written) bytes of one aten op."""
    ins = _tensors(args) + _tensors(kwargs or {})
    outs = _tensors(out)
    if name == "copy_":  # copy_(self, src): writes self, reads src
        return tensor_bytes(ins[1]) if len(ins) > 1 else 0, tensor_bytes(ins[0])
    if name in WRITE_ONLY:
        return 0, sum(tensor_bytes(t) for t in outs)
    seen, read = set(), 0
    for t in ins:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            read += tensor_bytes(t)
    return read, sum(tensor_bytes(t) for t in outs)


_DTYPE_SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64",
                torch.int64: "i64", torch.int32: "i32", torch.bool: "bool", torch.uint8: "u8"}


def signature(args, out) -> str:
    """`bf16[2,72,9,64] f32[2,72,64] -> bf16[2,72,9,64]`: the tensors an op reads (arguments) and writes."""
    def one(t: torch.Tensor) -> str:
        return f"{_DTYPE_SHORT.get(t.dtype, str(t.dtype))}[{','.join(map(str, t.shape))}]"

    ins = " ".join(one(t) for t in _tensors(args))
    outs = " ".join(one(t) for t in _tensors(out))
    return f"{ins} -> {outs}" if outs else ins


def at_target_shapes(sig: str, batch: int, seq_len: int, target_batch: int, target_seq: int) -> str:
    """A small run's signature with the batch and sequence dims written at the target's: `[B,T,...` leading
    dims, and the flattened token dim B*T anywhere (where it is unambiguous: choose --seq-lens unlike any model
    width)."""
    sig = re.sub(rf"\[{batch},{seq_len}([,\]])", rf"[{target_batch},{target_seq}\1", sig)
    return re.sub(rf"([\[,]){batch * seq_len}([,\]])", rf"\g<1>{target_batch * target_seq}\2", sig)


def _short(filename: str) -> str:
    return re.sub(r".*/(jetnas|benchmarks)/", r"\1/", filename)


def _is_ours(filename: str) -> bool:
    return ("/jetnas/" in filename or "/benchmarks/" in filename) and not filename.endswith(
        ("elementwise_traffic.py", "launch_count.py"))


def python_site() -> str | None:
    """The innermost jetnas frame of the running Python stack (None outside jetnas)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if _is_ours(frame.filename):
            return f"{_short(frame.filename)}:{frame.lineno} ({frame.name})"
    return None


def node_site(node) -> str:
    """Where the forward made `node` (anomaly mode's traceback), as `file:line (function)`."""
    lines = node.metadata.get("traceback_") or []
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', "".join(lines))
    for filename, lineno, fn in reversed(frames):
        if _is_ours(filename):
            return f"{_short(filename)}:{lineno} ({fn})"
    return "?"


class Recorder(lc.Counter_):
    """launch_count's counter (module stack, node tags, suspension inside Triton launches and fla stand-ins), plus
    `traffic`: (phase, module, site, kind, op, dtypes) -> [launches, bytes read, bytes written], and `shapes`: the
    same key -> the distinct shape signatures of its calls (`signature`; at most `MAX_SHAPES` kept)."""

    MAX_SHAPES = 4

    def __init__(self, names: dict[int, str]):
        super().__init__(names)
        self.traffic: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
        self.shapes: dict[tuple, list[str]] = defaultdict(list)
        # the autograd node whose post-hook ran last and whose successor's pre-hook has not: the engine's own work
        self.accumulating = False

    def site(self) -> tuple[str, str, bool]:
        """(phase, site, is_gradient_accumulation) of the op running now."""
        node = torch._C._current_autograd_node()
        if node is None:
            return "forward", python_site() or "(outside jetnas)", False
        if self.accumulating:
            return "backward", f"{node_site(node)} <grad accumulation after {node.name()}>", True
        here = python_site()
        # inside a Python autograd Function's backward the Python stack says where; else the node's forward line
        if here is not None and "(backward)" in here:
            return "backward", here, False
        return "backward", f"{node_site(node)} <{node.name()}>", False

    def record(self, func, args, kwargs, out) -> None:
        if self.suspended or not self.active:
            return
        name = lc._op_name(func)
        if name in lc.METADATA or func.is_view or name in lc.ALLOC:
            return
        phase, site, accumulation = self.site()
        _, module = self.where()
        module = re.sub(r" <.*>$", "", module)
        kind = "gemm/attention/optimizer" if name in GEMM else "accumulate" if accumulation else "elementwise/copy"
        dtypes = ",".join(sorted({str(t.dtype).replace("torch.", "") for t in _tensors(args) + _tensors(out)}))
        read, written = op_bytes(name, args, kwargs, out)
        key = (phase, module, site, kind, name, dtypes)
        row = self.traffic[key]
        row[0] += 1
        row[1] += read
        row[2] += written
        self._shape(key, signature(args, out))

    def _shape(self, key: tuple, sig: str) -> None:
        seen = self.shapes[key]
        if sig not in seen and len(seen) < self.MAX_SHAPES:
            seen.append(sig)

    def launch(self, kernel: str, args) -> None:
        if not self.active:
            return
        phase, _, _ = self.site()
        _, module = self.where()
        module = re.sub(r" <.*>$", "", module)
        here = python_site() or "?"
        seen, nbytes = set(), 0
        for t in _tensors(args):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                nbytes += tensor_bytes(t)
        key = (phase, module, here, "triton", kernel, "")
        row = self.traffic[key]
        row[0] += 1
        row[1] += nbytes
        self._shape(key, signature(args, ()))


class _Dispatch(TorchDispatchMode):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.recorder.record(func, args, kwargs, out)
        return out


def _patch_triton(ref: list) -> None:
    """Every outermost Triton launch reports its kernel and tensor arguments; nothing inside it is counted."""
    lc._patch_triton(ref, report=lambda rec, name, args, kwargs: rec.launch(name, (args, kwargs)),
                     marker="_traffic")


def _graph_nodes(roots) -> list:
    seen, todo, out = set(), [t.grad_fn for t in roots if t.grad_fn is not None], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        out.append(node)
        todo.extend(n for n, _ in node.next_functions if n is not None)
    return out


def record(run, names: dict[int, str], ref: list) -> Recorder:
    """Run `run()` under a new recorder (put in `ref[0]` for the Triton and fla wrappers), its forward under anomaly
    mode (for the autograd nodes' tracebacks), every `Tensor.backward` with node hooks that tell autograd's own
    gradient accumulation apart; returns the recorder."""
    rec = Recorder(names)
    ref[0] = rec
    pre = torch.nn.modules.module.register_module_forward_pre_hook(rec.pre_hook)
    post = torch.nn.modules.module.register_module_forward_hook(rec.post_hook, always_call=True)
    original_backward = torch.Tensor.backward
    handles = []

    def before(*_):
        rec.accumulating = False

    def after(*_):
        rec.accumulating = True

    def backward(self, *a, **k):
        rec.tag_graph([self], "(loss, outside modules)")
        for node in _graph_nodes([self]):
            handles.append(node.register_prehook(before))
            handles.append(node.register_hook(after))
        rec.accumulating = False
        try:
            return original_backward(self, *a, **k)
        finally:
            rec.accumulating = False

    torch.Tensor.backward = backward
    rec.active = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anomaly mode's warning
            with torch.autograd.detect_anomaly(check_nan=False), _Dispatch(rec):
                run()
    finally:
        rec.active = False
        torch.Tensor.backward = original_backward
        for h in handles:
            h.remove()
        pre.remove()
        post.remove()
        ref[0] = None
    return rec


def record_step(trainer, names: dict[int, str], step: int, ref: list) -> Recorder:
    """`record` of `trainer._train_step(step)`, the loss function's own ops attributed to "(loss, outside
    modules)"."""
    original_loss = trainer.loss_fn

    def loss_fn(*a, **k):
        ref[0].stack.append("(loss, outside modules)")
        try:
            return original_loss(*a, **k)
        finally:
            ref[0].stack.pop()

    trainer.loss_fn = loss_fn
    try:
        return record(lambda: trainer._train_step(step), names, ref)
    finally:
        trainer.loss_fn = original_loss


def teacher_dir(target: Path, vocab: int) -> Path:
    """A Llama of SmolLM2-135M's shape (train_bench's `SMOLLM2_135M`), random weights; `vocab` may shrink the
    vocabulary (the LM head's traffic then scales down with it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(train_bench.SMOLLM2_135M, vocab_size=vocab)
    theta = fields.pop("rope_theta")
    torch.manual_seed(0)
    config = LlamaConfig(**fields, rope_parameters={"rope_theta": theta, "rope_type": "default"})
    LlamaForCausalLM(config).save_pretrained(target)
    return target


def run_once(args, batch: int, seq_len: int, teacher, work: Path, backend, ref: list) -> dict:
    ns = argparse.Namespace(vocab=args.vocab, batch_size=batch, micro_batch_size=None, seq_len=seq_len,
                            precision="bf16", teacher_dir=args.teacher_dir, swa_window=args.swa_window,
                            linear="gdn", teacher_per_step=False, layers=30, supernet_kl=0.0)
    trainer, names = lc.build("stage1", ns, teacher, work / f"T{seq_len}", backend)
    trainer.optimizer = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in trainer.optimizer.param_groups],
        lr=trainer.config.lr, betas=trainer.config.betas, fused=True)
    with contextlib.redirect_stdout(sys.stderr):
        trainer._train_step(0)  # warm-up: first calls, the optimizer's state
    rec = record_step(trainer, names, 1, ref)
    return {"tokens": batch * seq_len, "batch": batch, "seq_len": seq_len, "rows": dict(rec.traffic),
            "shapes": dict(rec.shapes)}


def fit(runs: list[dict], target: int, target_batch: int = 32) -> list[dict]:
    """Per row key: launches and bytes at each run, bytes fitted as a + b * tokens and taken to `target` tokens;
    the second run's shape signatures, as they are and (`shapes_at_target`) at `target_batch` x `target /
    target_batch` tokens."""
    keys = set().union(*(r["rows"] for r in runs))
    big = runs[1]
    shapes = big.get("shapes", {})
    (n0, r0), (n1, r1) = [(r["tokens"], r["rows"]) for r in runs[:2]]
    out = []
    for key in keys:
        a = r0.get(key, [0, 0, 0])
        b = r1.get(key, [0, 0, 0])
        moved0, moved1 = a[1] + a[2], b[1] + b[2]
        slope = (moved1 - moved0) / (n1 - n0)
        at_target = max(0.0, moved0 + slope * (target - n0))
        phase, module, site, kind, op, dtypes = key
        out.append({"phase": phase, "module": module, "site": site, "kind": kind, "op": op, "dtypes": dtypes,
                    "launches": b[0], "launches_small": a[0], "bytes_small": [moved0, moved1],
                    "bytes_at_target": at_target, "shapes": shapes.get(key, []),
                    "shapes_at_target": [at_target_shapes(sig, big.get("batch", 0), big.get("seq_len", 0),
                                                          target_batch, target // target_batch)
                                         for sig in shapes.get(key, [])]})
    out.sort(key=lambda r: -r["bytes_at_target"])
    return out


def group(rows: list[dict], by: tuple[str, ...], bandwidth: float, shapes: bool = False) -> list[dict]:
    """Rows summed by the fields `by`: launches, GB and the time at `bandwidth`; with `shapes`, the first few
    distinct shape signatures at the target's size too."""
    acc: dict[tuple, list] = defaultdict(lambda: [0, 0.0, []])
    for r in rows:
        k = tuple(r[f] for f in by)
        acc[k][0] += r["launches"]
        acc[k][1] += r["bytes_at_target"]
        acc[k][2].extend(sig for sig in r.get("shapes_at_target", []) if sig not in acc[k][2])
    return [{**dict(zip(by, k)), "launches": n, "GB": round(b / 1e9, 3), "est_ms": round(b / bandwidth * 1e3, 3),
             **({"shapes": sigs[:3]} if shapes else {})}
            for k, (n, b, sigs) in sorted(acc.items(), key=lambda x: -x[1][1])]


def _site_key(row: dict) -> tuple:
    """A row's identity across code versions: the site without its line number (lines move as files change)."""
    site = re.sub(r":\d+ ", " ", row["site"])
    return row["phase"], row["kind"], row["op"], row["dtypes"], site


def compare(before_path: str, after_path: str, bandwidth: float, top: int) -> dict:
    """What changed between two runs' rows: per site (line numbers dropped), launches and GB at the target tokens
    before and after, largest change first; and the totals by kind."""
    runs = [json.loads(Path(p).read_text()) for p in (before_path, after_path)]
    for run in runs:  # the kinds by today's GEMM list (a run recorded before `addmm_` joined it filed it elsewhere)
        for r in run["rows"]:
            if r["op"] in GEMM:
                r["kind"] = "gemm/attention/optimizer"
        run["by_kind"] = group(run["rows"], ("phase", "kind"), bandwidth)
    sides: list[dict] = []
    for run in runs:
        acc: dict[tuple, list] = defaultdict(lambda: [0, 0.0])
        for r in run["rows"]:
            a = acc[_site_key(r)]
            a[0] += r["launches"]
            a[1] += r["bytes_at_target"]
        sides.append(acc)
    keys = set(sides[0]) | set(sides[1])
    changes = []
    for k in keys:
        (n0, b0), (n1, b1) = (side.get(k, [0, 0.0]) for side in sides)
        if n0 != n1 or abs(b1 - b0) > 1e6:
            changes.append({"phase": k[0], "kind": k[1], "op": k[2], "dtypes": k[3], "site": k[4],
                            "launches_before": n0, "launches_after": n1, "GB_before": round(b0 / 1e9, 3),
                            "GB_after": round(b1 / 1e9, 3), "est_ms_saved": round((b0 - b1) / bandwidth * 1e3, 3)})
    changes.sort(key=lambda c: -abs(c["GB_before"] - c["GB_after"]))
    totals = {}
    for label, run in zip(("before", "after"), runs):
        for r in run["by_kind"]:
            t = totals.setdefault(f"{r['phase']}:{r['kind']}", {})
            t[f"launches_{label}"], t[f"GB_{label}"] = r["launches"], r["GB"]
    all_rows = [[r for r in run["rows"] if r["kind"] != "gemm/attention/optimizer"] for run in runs]
    summary = {
        "before": before_path, "after": after_path, "target_tokens": runs[1]["args"]["target_tokens"],
        "bandwidth": bandwidth,
        "non_gemm": {label: {"launches": sum(r["launches"] for r in rows),
                             "GB": round(sum(r["bytes_at_target"] for r in rows) / 1e9, 3)}
                     for label, rows in zip(("before", "after"), all_rows)},
        "totals_by_kind": totals, "changes": changes}
    nb, na = summary["non_gemm"]["before"], summary["non_gemm"]["after"]
    summary["non_gemm"]["saved"] = {"launches": nb["launches"] - na["launches"], "GB": round(nb["GB"] - na["GB"], 3),
                                    "est_ms": round((nb["GB"] - na["GB"]) * 1e9 / bandwidth * 1e3, 2)}
    print("| phase | op | dtypes | site | launches before -> after | GB before -> after | est. ms saved |")
    print("|---|---|---|---|---|---|---|")
    for c in changes[:top]:
        print(f"| {c['phase']} | {c['op']} ({c['kind']}) | {c['dtypes']} | {c['site']} | {c['launches_before']} -> "
              f"{c['launches_after']} | {c['GB_before']:.2f} -> {c['GB_after']:.2f} | {c['est_ms_saved']:.2f} |")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-lens", default="40,72",
                    help="two sequence lengths: the fit's two points (unlike every model width, so that the shapes "
                         "can be written at the target's)")
    ap.add_argument("--target-tokens", type=int, default=32 * 1024, help="the benchmark's tokens per step")
    ap.add_argument("--target-batch", type=int, default=32, help="the benchmark's sequences per step (for shapes)")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--swa-window", type=int, default=512)
    ap.add_argument("--bandwidth", type=float, default=3e12, help="bytes/s for the time estimates")
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", default=None,
                    help="BEFORE.json,AFTER.json (two --out files): the changes per site as a markdown table on "
                         "stdout, the summary JSON to --out")
    args = ap.parse_args()
    if args.compare:
        summary = compare(*args.compare.split(","), args.bandwidth, args.top)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=1))
        print(json.dumps({"non_gemm": summary["non_gemm"]}))
        return
    torch.set_num_threads(1)

    import jetnas
    from jetnas.models.convert import as_jetnas
    from jetnas.models.hf_compat import load_pretrained
    from jetnas.ops.backend import Backend
    from jetnas.train.stages import StageTeacher

    print(f"jetnas from {Path(jetnas.__file__).parent}", file=sys.stderr)
    ref: list = [None]
    _patch_triton(ref)
    _install_fla_quiet(ref)
    backend = Backend(name="triton", interpret=True)
    work = Path(tempfile.mkdtemp(prefix="elementwise_traffic_"))
    args.teacher_dir = str(teacher_dir(work / "teacher", args.vocab))
    teacher = StageTeacher(as_jetnas(load_pretrained(args.teacher_dir, dtype=torch.float32)).requires_grad_(False)
                           .eval(), None, None, None)
    lc.use_backend(teacher.model, backend)
    t0 = time.perf_counter()
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    if len(seq_lens) != 2 or seq_lens[0] == seq_lens[1]:
        ap.error(f"--seq-lens takes two different lengths, got {args.seq_lens!r}")
    runs = [run_once(args, args.batch_size, t, teacher, work, backend, ref) for t in seq_lens]
    rows = fit(runs, args.target_tokens, args.target_batch)
    bw = args.bandwidth
    by_kind = group(rows, ("phase", "kind"), bw)
    by_op = group([r for r in rows if r["kind"] != "gemm/attention/optimizer"], ("kind", "op", "dtypes"), bw)
    by_site = group([r for r in rows if r["kind"] != "gemm/attention/optimizer"],
                    ("phase", "kind", "op", "dtypes", "site"), bw, shapes=True)
    report = {"jetnas": str(Path(jetnas.__file__).parent), "args": vars(args), "seconds": round(time.perf_counter()
              - t0, 1), "tokens": [r["tokens"] for r in runs], "by_kind": by_kind, "by_op": by_op,
              "by_site": by_site, "rows": rows}
    err = sys.stderr
    print(f"\n=== at {args.target_tokens} tokens, {bw / 1e12:g} TB/s", file=err)
    for r in by_kind:
        print(f"  {r['GB']:>8.2f} GB {r['est_ms']:>7.2f} ms {r['launches']:>6}  {r['phase']:<8} {r['kind']}", file=err)
    print(f"--- by op (not gemm), top {args.top}", file=err)
    for r in by_op[:args.top]:
        print(f"  {r['GB']:>8.2f} GB {r['est_ms']:>7.2f} ms {r['launches']:>6}  {r['kind']:<17} {r['op']:<28} "
              f"{r['dtypes']}", file=err)
    print(f"--- by site (not gemm), top {args.top}", file=err)
    for r in by_site[:args.top]:
        print(f"  {r['GB']:>8.2f} GB {r['est_ms']:>7.2f} ms {r['launches']:>5}  {r['phase'][:3]} {r['op']:<24} "
              f"{r['dtypes']:<16} {r['site']}  {' | '.join(r['shapes'][:2])}", file=err)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    totals = {f"{r['phase']}:{r['kind']}": {"GB": r["GB"], "est_ms": r["est_ms"], "launches": r["launches"]}
              for r in by_kind}
    print(json.dumps({"target_tokens": args.target_tokens, "bandwidth": bw, "totals": totals}))


def _install_fla_quiet(ref: list) -> None:
    """launch_count's fla stand-ins, counting into whatever recorder `ref` holds (they only call `where`,
    `counts.add` and `suspended`, which the Recorder inherits), their reference's output made contiguous as fla's
    is (uncounted); and the LM-head loss's Triton chunk step on CPU
    tensors (`head_terms` picks it for CUDA tensors only: on CPU it would run the eager chunk step, ~20 float32
    passes per chunk that no GPU step makes)."""
    import jetnas.ops.delta_rule as delta_rule

    naive = delta_rule.naive_chunk_gated_delta_rule
    if not getattr(naive, "_traffic", False):
        def contiguous_output(*a, **k):
            # fla writes o contiguous (`[B, T, H, V]`); the reference returns a transposed view, whose copy by the
            # gated norm after it would be counted as if a GPU step made it
            o, final = naive(*a, **k)
            return o.contiguous(), final

        contiguous_output._traffic = True
        delta_rule.naive_chunk_gated_delta_rule = contiguous_output
    lc._install_fla(ref)
    import jetnas.train.losses as losses

    original = losses.chunked_linear_kl_ce
    if getattr(original, "_traffic", False):
        return

    def chunked(*a, step="torch", **k):
        return original(*a, step="triton", **k)

    chunked._traffic = True
    losses.chunked_linear_kl_ce = chunked


if __name__ == "__main__":
    main()
