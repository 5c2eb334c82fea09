"""The LM-head losses of distillation and training, full logits vs chunked (`jetnas.ops.losses`): correctness
first, then speed and memory, at the stage-1 shape (N = 32 x 1024 tokens, D = 576, V = 49,152: SmolLM2-135M) in
bf16. Each row times one forward + backward of the loss from the LM-head inputs (hidden states and head weight).

    python benchmarks/loss_bench.py --out $OUT/loss_bench.json                    # CUDA, the full shape
    python benchmarks/loss_bench.py --device cpu --tiny --steps torch --out x.json  # the CPU smoke test

Tasks:
- `kl` (stage 1): KL(teacher || student), the teacher given as hidden states + its head (its logits are part of the
  cost, as in the teacher forward with `logits_to_keep=0` today); the head is frozen (no weight gradient).
- `ce` (stage 2): cross-entropy with next-token labels; the tied head trains (weight gradient).
- `kl+ce` (stage 2 with kl_weight > 0): both in one pass over the student's logits.

Methods: `naive` (today's path: full bf16 logits, float32 log-softmaxes; for kl+ce the student's logits made once,
as `stage_losses` does); `<step>/<rows>`, the chunked op with
each chunk step (`torch`: eager PyTorch, `compile`: torch.compile of it, `triton`: the fused kernel) and chunk size
(`auto` is `default_chunk_size` for that step; the sizes are swept for torch and triton, compile runs auto only);
`torch+teacher-logits/auto` (the teacher's full logits made first, then chunked); and, when importable on
CUDA, liger-kernel's `LigerFusedLinearJSD` (beta = 0: forward KL; its loss has no T^2 factor, so it is scaled by
T^2 here) and `LigerFusedLinearCrossEntropyLoss`, and cut-cross-entropy's `linear_cross_entropy` (default
`filter_eps="auto"`: it skips gradient entries below bf16 resolution by design).

Correctness: every method's loss and gradients (hidden, and weight where it trains) are compared with a float32
reference (the same bf16-valued inputs upcast, full logits). A method passes when each error is at most
`max(2 x naive's error, 1e-3)`: no worse than today's bf16 path, within a factor 2. Failing methods are still timed
(and flagged). Timing: triton.testing.do_bench median (CUDA; CUDA-event median without triton), perf_counter
median on CPU. Memory: torch.cuda.max_memory_allocated during one forward + backward, beyond what was allocated
before it (inputs excluded); None on CPU. TFLOP/s counts the LM-head matmuls only (2NVD each: student forward,
teacher forward where the task has one, dL/dh, and dL/dW where the head trains).

Stdout: a progress log, the table, and, last, one JSON line; the full results go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import jetnas  # noqa: F401
from jetnas.ops.losses import (
    STEPS,
    chunked_linear_kl_ce,
    default_chunk_size,
    naive_linear_cross_entropy,
    naive_linear_kl,
)

FULL = {"n": 32 * 1024, "d": 576, "v": 49152}
TINY = {"n": 300, "d": 32, "v": 1000}  # n a multiple of no chunk size below
TASKS = ("kl", "ce", "kl+ce")


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def make_inputs(n: int, d: int, v: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Student and teacher LM-head inputs. Logits of a few units (hidden states ~ unit RMS as after a final norm,
    head rows of norm ~2), the teacher a perturbed student with its own copy of the head (stage 1's student
    inherits the teacher's embeddings), labels uniform over the vocabulary (none ignored, no mask: every row
    weighs the same, which `reference` relies on)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (2.0 / d ** 0.5)
    th = h + 0.3 * torch.randn(n, d, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    return {"h": h.to(device, dtype), "w": w.to(device, dtype), "th": th.to(device, dtype),
            "tw": w.clone().to(device, dtype), "labels": labels.to(device)}


def stage_losses_today(h, w, th, tw, y, t: float) -> torch.Tensor:
    """KL + CE as `stage_losses` computes them today: the student's logits made once and shared by both terms
    (`naive_linear_kl_ce`, the reference, makes them once per term), the teacher's under no_grad."""
    logits = F.linear(h, w)
    with torch.no_grad():
        log_p = F.log_softmax(F.linear(th, tw).float() / t, -1)
    log_q = F.log_softmax(logits.float() / t, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t
    return kl + F.cross_entropy(logits.float(), y)


def task_fn(task: str, method: str, chunk: int | None, temperature: float) -> Callable:
    """`fn(h, w, th, tw, labels) -> loss` (differentiable w.r.t. h and w) for one method of one task."""
    t = temperature
    if method == "naive":
        if task == "kl":
            return lambda h, w, th, tw, y: naive_linear_kl(h, w, teacher_hidden=th, teacher_weight=tw, temperature=t)
        if task == "ce":
            return lambda h, w, th, tw, y: naive_linear_cross_entropy(h, w, y)
        return lambda h, w, th, tw, y: stage_losses_today(h, w, th, tw, y, t)
    if method in STEPS:
        if task == "kl":
            return lambda h, w, th, tw, y: chunked_linear_kl_ce(
                h, w, teacher_hidden=th, teacher_weight=tw, temperature=t, ce_weight=0.0, chunk_size=chunk,
                step=method).loss
        if task == "ce":
            return lambda h, w, th, tw, y: chunked_linear_kl_ce(h, w, y, kl_weight=0.0, chunk_size=chunk,
                                                                step=method).loss
        return lambda h, w, th, tw, y: chunked_linear_kl_ce(h, w, y, teacher_hidden=th, teacher_weight=tw,
                                                            temperature=t, chunk_size=chunk, step=method).loss
    if method == "torch+teacher-logits":
        if task == "ce":
            raise ValueError("no teacher in the ce task")
        ce_weight = 0.0 if task == "kl" else 1.0
        return lambda h, w, th, tw, y: chunked_linear_kl_ce(
            h, w, y if task != "kl" else None, th @ tw.T, temperature=t, ce_weight=ce_weight, chunk_size=chunk).loss
    if method == "liger":
        if task == "kl":
            from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

            jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=t)
            return lambda h, w, th, tw, y: jsd(h, w, th, tw) * (t * t)
        if task == "ce":
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            flce = LigerFusedLinearCrossEntropyLoss()
            return lambda h, w, th, tw, y: flce(w, h, y)
        raise ValueError("liger has no fused KL + CE")
    if method == "cut-cross-entropy":
        if task != "ce":
            raise ValueError("cut-cross-entropy is a cross-entropy only")
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, th, tw, y: linear_cross_entropy(h, w, y)
    raise ValueError(f"unknown method {method!r}")


def library_versions() -> dict:
    """Which optional libraries are importable (their versions), or why not."""
    import importlib
    import importlib.metadata

    found = {}
    for module, dist in (("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy")):
        try:
            importlib.import_module(module)
            found[dist] = importlib.metadata.version(dist)
        except Exception as exc:  # noqa: BLE001  (absent, or present but broken: skipped either way)
            found[dist] = f"unavailable: {type(exc).__name__}: {str(exc)[:120]}"
    return found


def run_once(fn: Callable, inputs: dict, train_w: bool):
    """One forward + backward: (loss as float, dL/dh, dL/dW or None)."""
    h = inputs["h"].detach().requires_grad_()
    w = inputs["w"].detach().requires_grad_(train_w)
    loss = fn(h, w, inputs["th"], inputs["tw"], inputs["labels"])
    loss.backward()
    return loss.detach().float(), h.grad, w.grad if train_w else None


def reference(fn: Callable, inputs: dict, train_w: bool, block: int):
    """The float32 reference through autograd, in blocks of rows so that its full float32 logits fit (45+ GB at
    the full shape otherwise): every row weighs 1 / N in the means (no mask, no ignored label), so the loss is the
    blocks' losses weighted by their share of the rows and the gradients their sums."""
    n = inputs["h"].shape[0]
    h = inputs["h"].detach().requires_grad_()
    w = inputs["w"].detach().requires_grad_(train_w)
    total = torch.zeros((), device=h.device)
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        loss = fn(h[rows], w, inputs["th"][rows], inputs["tw"], inputs["labels"][rows]) * ((rows.stop - start) / n)
        loss.backward()
        total += loss.detach().float()
    return total, h.grad, w.grad if train_w else None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def errors(got, ref) -> dict:
    loss, gh, gw = got
    out = {"loss": rel(loss, ref[0]), "grad_h": rel(gh, ref[1])}
    if ref[2] is not None:
        out["grad_w"] = rel(gw, ref[2])
    return out


def time_ms(step: Callable, device: torch.device, repeats: int, grad_to_none: list) -> float:
    """Median milliseconds of step() (forward + backward)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(step, grad_to_none=grad_to_none, return_mode="median"))
        times = []
        for _ in range(max(3, repeats)):
            for t in grad_to_none:
                t.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    step()  # warm-up
    times = []
    for _ in range(max(1, repeats)):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mib(step: Callable, device: torch.device, grad_to_none: list) -> float | None:
    if device.type != "cuda":
        return None
    for t in grad_to_none:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def matmul_flops(task: str, n: int, d: int, v: int, train_w: bool) -> float:
    mm = 2.0 * n * d * v
    return mm * (1 + (task != "ce") + 1 + train_w)


def methods_for(task: str, chunks: list[int | None], steps: list[str], device: torch.device,
                libraries: dict) -> list[tuple[str, int | None]]:
    out = [("naive", None)]
    for step in steps:
        out += [(step, None)] if step == "compile" else [(step, c) for c in chunks]
    if task != "ce" and "torch" in steps:
        out.append(("torch+teacher-logits", None))
    cuda = device.type == "cuda"
    if cuda and task in ("kl", "ce") and not libraries["liger-kernel"].startswith("unavailable"):
        out.append(("liger", None))
    if cuda and task == "ce" and not libraries["cut-cross-entropy"].startswith("unavailable"):
        out.append(("cut-cross-entropy", None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help=f"tiny shapes {TINY} instead of {FULL}")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--chunks", default="256,1024,4096,auto", help="chunk sizes (rows) to sweep; auto = default")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help="chunk steps: torch, compile (~1 min of compiling), triton (CUDA, or TRITON_INTERPRET=1)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5, help="CPU / CUDA-event repeats (do_bench picks its own)")
    ap.add_argument("--out", default="loss_bench.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = TINY if args.tiny else FULL
    n, d, v = shape["n"], shape["d"], shape["v"]
    tiny_chunks = {"256": 64, "1024": 128, "4096": 512}  # the same sweep scaled to the tiny shape
    chunks = []
    for c in args.chunks.split(","):
        c = c.strip()
        chunks.append(None if c == "auto" else (tiny_chunks.get(c, int(c)) if args.tiny else int(c)))
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if "triton" in steps and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        log("no CUDA and TRITON_INTERPRET is not 1: the triton step is left out")
        steps.remove("triton")
    libraries = library_versions()
    inputs = make_inputs(n, d, v, device, dtype)
    inputs32 = {k: t.float() if t.is_floating_point() else t for k, t in inputs.items()}
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": shape, "dtype": str(dtype), "temperature": args.temperature,
            "auto_chunk_rows": {s: default_chunk_size(n, v, step=s) for s in STEPS}, "libraries": libraries}
    log(f"{meta['device']}: N={n} D={d} V={v} {dtype}, auto chunks {meta['auto_chunk_rows']} rows; {libraries}")

    rows, failures, library_flags = [], [], []
    for task in args.tasks.split(","):
        train_w = task != "kl"  # stage 1 freezes the embeddings (the tied head); stage 2 trains them
        ref = reference(task_fn(task, "naive", None, args.temperature), inputs32, train_w, block=4096)
        baseline = None
        for method, chunk in methods_for(task, chunks, steps, device, libraries):
            ours = method in (*STEPS, "torch+teacher-logits")
            name = f"{method}/{chunk or 'auto'}" if ours else method
            auto = default_chunk_size(n, v, step=method.split("+")[0]) if ours else None
            row = {"task": task, "method": name, "chunk_rows": chunk or auto}
            # a library's rows are measured and flagged, but only jetnas' own paths decide `passed`
            problems = failures if ours or method == "naive" else library_flags
            try:
                fn = task_fn(task, method, chunk, args.temperature)
                err = errors(run_once(fn, inputs, train_w), ref)
                if method == "naive":
                    baseline = err
                limit = {k: max(2 * baseline[k], 1e-3) for k in err}
                row["errors_vs_fp32"] = err
                row["ok"] = all(err[k] <= limit[k] for k in err)
                if not row["ok"]:
                    problems.append(f"{task}:{name} {err} > {limit}")
                h = inputs["h"].detach().requires_grad_()
                w = inputs["w"].detach().requires_grad_(train_w)

                def step(fn=fn, h=h, w=w):
                    fn(h, w, inputs["th"], inputs["tw"], inputs["labels"]).backward()

                row["median_ms"] = time_ms(step, device, args.repeats, [h, w])
                row["peak_mib"] = peak_mib(step, device, [h, w])
                row["tflops"] = matmul_flops(task, n, d, v, train_w) / (row["median_ms"] * 1e-3) / 1e12
                row["tokens_per_s"] = n / (row["median_ms"] * 1e-3)
            except torch.cuda.OutOfMemoryError as exc:
                row.update(ok=False, error=f"OOM: {str(exc)[:200]}")
                problems.append(f"{task}:{name} OOM")
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001  (one method's failure must not cost the other rows)
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                problems.append(f"{task}:{name} {row['error']}")
            rows.append(row)
            log(json.dumps(row))
        naive_ms = next((r["median_ms"] for r in rows if r["task"] == task and r["method"] == "naive"
                         and "median_ms" in r), None)
        for r in rows:
            if r["task"] == task and naive_ms and "median_ms" in r:
                r["speedup_vs_naive"] = naive_ms / r["median_ms"]

    report = {**meta, "command": " ".join(["python", "benchmarks/loss_bench.py", *sys.argv[1:]]),
              "rows": rows, "failures": failures, "library_flags": library_flags, "passed": not failures}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)

    print(f"\n{'task':6} {'method':28} {'ok':3} {'ms':>9} {'x naive':>8} {'peak MiB':>9} {'TFLOP/s':>8} "
          f"{'err loss':>9} {'err dh':>9} {'err dW':>9}")
    for r in rows:
        e = r.get("errors_vs_fp32", {})
        fmt = lambda x, f: "-" if x is None else format(x, f)
        print(f"{r['task']:6} {r['method']:28} {'y' if r.get('ok') else 'N':3} {fmt(r.get('median_ms'), '9.3f')} "
              f"{fmt(r.get('speedup_vs_naive'), '8.2f')} {fmt(r.get('peak_mib'), '9.0f')} "
              f"{fmt(r.get('tflops'), '8.1f')} {fmt(e.get('loss'), '9.1e')} {fmt(e.get('grad_h'), '9.1e')} "
              f"{fmt(e.get('grad_w'), '9.1e')}" + (f"  {r['error']}" if "error" in r else ""))
    best = {}
    for task in {r["task"] for r in rows}:
        timed = [r for r in rows if r["task"] == task and r.get("ok") and "median_ms" in r]
        if timed:
            fastest = min(timed, key=lambda r: r["median_ms"])
            best[task] = {"method": fastest["method"], "median_ms": round(fastest["median_ms"], 3),
                          "speedup_vs_naive": round(fastest.get("speedup_vs_naive", float("nan")), 3)}
    print(json.dumps({"out": args.out, "device": meta["device"], "passed": not failures, "failures": failures,
                      "library_flags": library_flags, "best": best}))


if __name__ == "__main__":
    main()
