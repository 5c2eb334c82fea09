"""The static short convolution's training cost on the GPU: `triton_short_conv` forward + backward, and backward
alone, at the stage-1 shapes (32 x 1,024 tokens) and at one long sequence, against `F.conv1d` (`short_conv`'s
torch path) and, with `--old`, against an earlier copy of `jetnas/ops/triton_dynamic_conv.py` loaded beside the
current one in the same process (same inputs, same GPU, one run).

    git show <earlier commit>:jetnas/ops/triton_dynamic_conv.py > /tmp/old_conv.py
    PYTHONPATH=. python benchmarks/short_conv_bench.py --old /tmp/old_conv.py --out $OUT/short_conv.json

PYTHONPATH=. makes `jetnas` this checkout's (a script's own folder leads sys.path, so an installed jetnas, e.g. an
editable install of another checkout, would otherwise be timed as "new"); the report records both files (`new`,
`old`).

Inputs are bf16 (as the convolutions see them in training: outputs of bf16 projections), W = 4, SiLU, no bias
unless `--bias` (the GDN block's q, k, v convolutions have none). `--split` times the conv as the GDN layers run it
in training: `triton_short_conv_split` over q|k|v (three equal parts, each with its own gradient), against
`short_conv_split`'s torch path. Times are the median of `--iters` runs with CUDA events after warm-up. The
backward's kernels are also summed by name under the PyTorch profiler (`kernels_us`), so the weight-gradient
kernel and the partials' reduction show apart. Old and new gradients are compared (`max_grad_rel_err_vs_old`): the
weight's gradient sums the same float32 products in another order, and dx differs by about one bf16 rounding where
one version rounds the SiLU gradient to bf16 before dx (as PyTorch's autograd does) and the other keeps it in
float32 (the two-kernel backward rounded it; the one-kernel backward that replaced it keeps it in registers): a
few 1e-3 (4.1e-3 measured under the CPU interpreter, which truncates). `--bwd-configs 16x32x4,32x64x8` also times
the one-kernel backward with other tiles (`_bwd_config`: rows, channels, warps; chosen by register count, never
timed). `--device cpu` (under TRITON_INTERPRET=1, tiny shapes) only smoke-tests the script.

`--fwd-sweep BxTxD` times the static forward alone instead, old (`[BLOCK_T, BLOCK_D, W]` windows) and new (tap by
tap) in one process, the new over a grid of tiles, each call timed inside a CUDA graph of 20 (see `fwd_sweep`):

    PYTHONPATH=. python benchmarks/short_conv_bench.py --fwd-sweep 1x8192x1728 --out $OUT/short_conv_fwd.json

Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections import defaultdict

import torch

from jetnas.ops import triton_dynamic_conv as new_module
from jetnas.ops.conv import short_conv, short_conv_split

# (B, T, D): stage 1 of the SmolLM2-135M GDN hybrid (32 x 1,024 tokens, conv widths 576..1,728) and one 64K sequence
SHAPES = ((32, 1024, 576), (32, 1024, 1152), (32, 1024, 1728), (1, 65536, 576), (1, 65536, 1728))


def load_module(path: str):
    """An earlier `triton_dynamic_conv.py` as a module of its own (it imports only `jetnas.ops.utils`)."""
    spec = importlib.util.spec_from_file_location("old_triton_dynamic_conv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_ms(fn, dev: torch.device, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` (CUDA events on a GPU, wall clock otherwise), after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_times_us(fn, dev: torch.device) -> dict[str, float]:
    """GPU microseconds of one `fn()` by kernel name, under the PyTorch profiler."""
    if dev.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = defaultdict(float)
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us > 0:
            out[evt.key[:80]] += us
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_shape(B: int, T: int, D: int, W: int, bias: bool, impls: dict, dev: torch.device, iters: int,
                split: bool = False, configs: dict | None = None) -> dict:
    """Times and gradients of every implementation at one shape; `configs` maps an implementation's name to the
    static backward's `(BLOCK_T, BLOCK_D, num_warps)` it runs with (`--bwd-configs`)."""
    torch.manual_seed(0)
    x = torch.randn(B, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(D, W, device=dev) / W**0.5).to(torch.bfloat16).requires_grad_()
    b = torch.randn(D, device=dev, dtype=torch.bfloat16, requires_grad=True) if bias else None
    # with split: one gradient per part, as the three consumers of q, k and v hand them back
    dy = [torch.randn(B, T, D // 3, device=dev, dtype=torch.bfloat16) for _ in range(3)] if split else \
        torch.randn(B, T, D, device=dev, dtype=torch.bfloat16)
    leaves = [t for t in (x, weight, b) if t is not None]
    entry = {"shape": [B, T, D, W], "bias": bias, "split": split}
    grads = {}
    default_config = new_module._bwd_config
    for name, fn in impls.items():
        cfg = (configs or {}).get(name)
        new_module._bwd_config = default_config if cfg is None else (lambda D, W, on_gpu, cfg=cfg: cfg)
        def fwd(fn=fn):
            return fn(x, weight, b, None, False, "silu", None)[0]

        def fwd_bwd(fwd=fwd):
            torch.autograd.grad(fwd(), leaves, dy)

        y = fwd()

        def bwd(y=y):
            torch.autograd.grad(y, leaves, dy, retain_graph=True)

        grads[name] = torch.autograd.grad(y, leaves, dy, retain_graph=True)
        fb, bw = timed_ms(fwd_bwd, dev, iters), timed_ms(bwd, dev, iters)
        # bytes the backward must move at least: x and dy read, dx written (bf16); the weight's gradient is tiny
        moved = 3 * 2 * x.numel()
        entry[name] = {"fwd_bwd_ms": round(fb, 4), "bwd_ms": round(bw, 4),
                       "bwd_min_bytes_GBps": round(moved / bw / 1e6), "kernels_us": kernel_times_us(bwd, dev)}
        del y, bwd  # the graph (and its saved tensors) before the next implementation's
    new_module._bwd_config = default_config
    if "old" in grads:
        entry["max_grad_rel_err_vs_old"] = max(rel(a, r) for a, r in zip(grads["new"], grads["old"]))
        entry["bwd_speedup_vs_old"] = round(entry["old"]["bwd_ms"] / entry["new"]["bwd_ms"], 3)
        entry["fwd_bwd_speedup_vs_old"] = round(entry["old"]["fwd_bwd_ms"] / entry["new"]["fwd_bwd_ms"], 3)
    entry["max_grad_rel_err_vs_conv1d"] = max(rel(a, r) for a, r in zip(grads["new"], grads["conv1d"]))
    return entry


def graph_us(fn, inputs: list, dev: torch.device, iters: int, calls: int = 20) -> float:
    """Median microseconds of one `fn(inp)`: on a GPU, `calls` back-to-back calls captured in one CUDA graph (cycling
    through `inputs`) and replayed `iters` times between CUDA events, each replay's time over `calls`. Events around
    one Python call time the launch path as well, which for a ~40 us kernel is most of it: the in-model graph
    replay measured 41 us per layer where that timing gave 103 us. On CPU (the interpreter) one call's wall clock,
    only to exercise the code path."""
    if dev.type != "cuda":
        return 1e3 * timed_ms(lambda: fn(inputs[0]), dev, iters, warmup=1)
    for inp in inputs:  # compiles, loads the kernel, settles the allocator, before capturing
        fn(inp)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(calls):
            fn(inputs[j % len(inputs)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


# the per-tap forward's tiles swept: BLOCK_T x BLOCK_D on 2, 4 or 8 warps, 4 to 32 elements a thread (the default,
# 16 x 256 on 8 warps, is 16; 32 took 128 registers compiled for sm_90, no spills)
FWD_TILES = tuple((bt, bd, nw) for bt in (4, 8, 16, 32, 64) for bd in (64, 128, 256, 512) for nw in (2, 4, 8)
                  if 4 <= bt * bd // (32 * nw) <= 32)
# |new - old| <= 2^-7 |old| + FWD_TOL * max |old|: one bf16 step apart at most (the two forwards sum the same
# float32 products in another order; see tests/ops/test_triton_dynamic_conv.py's FWD_TOL)
FWD_TOL = 1e-6
# at least this many bytes of distinct inputs in one graph, so that a call does not find its x in the L2 cache (50 MB
# on an H100) from an earlier call
COLD_BYTES = 200_000_000


def within_one_rounding(parts, reference) -> bool:
    """Every element of `parts` within one bf16 rounding (and FWD_TOL of the largest) of `reference`'s."""
    for a, b in zip(parts, reference):
        a, b = a.float(), b.float()
        if not ((a - b).abs() <= 2**-7 * b.abs() + FWD_TOL * b.abs().max()).all():
            return False
    return True


def fwd_sweep(shape: str, W: int, dev: torch.device, iters: int) -> dict:
    """The static forward at a prefill shape, no gradients, as the GDN layers run it: `triton_short_conv_split` over
    q|k|v (three equal parts), SiLU, no bias, bf16. Rows: the old forward (`STATIC_FWD_PER_TAP = False`, the dynamic
    convolution's kernel with its `[BLOCK_T, BLOCK_D, W]` windows) at its default tile, the per-tap forward
    (`_short_conv_fwd_kernel`) at its default tile and at every tile of FWD_TILES (`_static_fwd_config`: BLOCK_T x
    BLOCK_D, warps).

    Every row's parts are checked against the old default's: within one bf16 rounding (`within_tol_of_old`; the
    two sum in another order), and bit for bit against their own path's default (`equal_to_path_default`: each
    output element is the same W-term sum whatever the tile). Times: `graph_us` (20 calls a CUDA graph, over
    distinct copies of x adding up to COLD_BYTES so that x comes from memory, not L2); GB/s of the bytes the forward
    must move (x read, the parts written), and the fraction of a device copy of as many bytes timed the same way
    (the bandwidth bound). Why: the 8K prefill profile of the SmolLM2 hybrid gave this kernel 41 us per layer at
    [1, 8192, 1728] (2026-12-06_h100_train_prefill_after); this script's old per-call timing said 103 us."""
    B, T, D = map(int, shape.split("x"))
    torch.manual_seed(0)
    x = torch.randn(B, T, D, device=dev, dtype=torch.bfloat16)
    weight = (torch.randn(D, W, device=dev) / W**0.5).to(torch.bfloat16)
    sizes = (D // 3,) * 3
    copies = 1 if dev.type != "cuda" else max(1, min(20, -(-COLD_BYTES // (x.numel() * x.element_size()))))
    xs = [x] + [x.clone() for _ in range(copies - 1)]

    def run(inp):
        with torch.inference_mode():
            return new_module.triton_short_conv_split(inp, weight, sizes, None, None, False, "silu", None)[0]

    moved = 2 * 2 * x.numel()
    srcs = [torch.zeros(moved // 2, dtype=torch.uint8, device=dev) for _ in range(copies)]
    dst = torch.empty_like(srcs[0])
    copy_us = graph_us(dst.copy_, srcs, dev, iters)
    defaults = {"old": new_module._launch_config, "per_tap": new_module._static_fwd_config}
    per_tap = new_module.STATIC_FWD_PER_TAP
    outputs, rows = {}, []
    try:
        for path, tile in [("old", None), ("per_tap", None)] + [("per_tap", c) for c in FWD_TILES]:
            new_module.STATIC_FWD_PER_TAP = path == "per_tap"
            config = "_launch_config" if path == "old" else "_static_fwd_config"
            setattr(new_module, config, defaults[path] if tile is None else
                    (lambda T_, D_, W_, on_gpu, c=tile: ((c[0], c[1]), {"num_warps": c[2]})))
            parts = run(x)
            outputs.setdefault(path, parts)
            us = graph_us(run, xs, dev, iters)
            rows.append({"path": path, "tile": "default" if tile is None else list(tile), "us": us,
                         "gb_s": moved / us / 1e3, "of_copy": copy_us / us,
                         "equal_to_path_default": all(torch.equal(a, b) for a, b in zip(parts, outputs[path])),
                         "within_tol_of_old": within_one_rounding(parts, outputs["old"]),
                         "max_abs_diff_vs_old": max((a.float() - b.float()).abs().max().item()
                                                    for a, b in zip(parts, outputs["old"]))})
    finally:
        new_module.STATIC_FWD_PER_TAP = per_tap
        new_module._launch_config, new_module._static_fwd_config = defaults["old"], defaults["per_tap"]
    return {"shape": [B, T, D, W], "copy_us": copy_us, "graph_calls": 20 if dev.type == "cuda" else 1,
            "distinct_inputs": copies, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", default=None, help="an earlier triton_dynamic_conv.py to time beside this one")
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                        help="comma-separated BxTxD")
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--bias", action="store_true")
    parser.add_argument("--bwd-configs", default="",
                        help="comma-separated BLOCK_TxBLOCK_Dxnum_warps of the static backward to time beside the "
                             "default (e.g. 16x32x4,32x64x8): rows 'new@16x32x4', ...")
    parser.add_argument("--split", action="store_true",
                        help="q|k|v: the output in three parts, each with its own gradient (D a multiple of 3)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--fwd-sweep", default="",
                        help="BxTxD: only sweep the static forward's tiles at this prefill shape (e.g. 1x8192x1728)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="short_conv_bench.json")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (this benchmark times GPU kernels; --device cpu only smoke-tests it)")
    if args.fwd_sweep:
        result = fwd_sweep(args.fwd_sweep, args.width, dev, args.iters)
        report = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                  "fwd_sweep": result}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        rows = result["rows"]
        print(f"copy bound {result['copy_us']:8.1f} us")
        for r in rows[:2] + sorted(rows[2:], key=lambda r: r["us"])[:5]:
            print(f"{r['path']:<8} {str(r['tile']):<16} {r['us']:8.1f} us {r['gb_s']:7.0f} GB/s "
                  f"{r['of_copy']:5.0%} of copy")
        best = min(rows[1:], key=lambda r: r["us"])
        print(json.dumps({"device": report["device"], "configs": len(rows),
                          "old_default_us": round(rows[0]["us"], 2), "per_tap_default_us": round(rows[1]["us"], 2),
                          "per_tap_best": best["tile"], "per_tap_best_us": round(best["us"], 2),
                          "copy_us": round(result["copy_us"], 2),
                          "differ_from_default": [[r["path"], r["tile"]] for r in rows
                                                  if not r["equal_to_path_default"]],
                          "outside_tol_of_old": [[r["path"], r["tile"]] for r in rows if not r["within_tol_of_old"]]}))
        return
    impls = {"new": new_module.triton_short_conv,
             "conv1d": lambda *a: short_conv(*a, backend="torch")}
    if args.old:
        impls["old"] = load_module(args.old).triton_short_conv
    if args.split:
        def as_split(fn):
            # (x, weight, bias, state, output_final_state, activation, cu_seqlens) -> parts of three equal widths
            return lambda x, *a: fn(x, a[0], (x.shape[-1] // 3,) * 3, *a[1:])

        impls = {"new": as_split(new_module.triton_short_conv_split),
                 "conv1d": as_split(lambda *a: short_conv_split(*a, backend="torch"))}
        if args.old:
            impls["old"] = as_split(load_module(args.old).triton_short_conv_split)
    configs = {}
    for c in filter(None, args.bwd_configs.split(",")):
        configs[f"new@{c}"] = tuple(int(v) for v in c.split("x"))
        impls[f"new@{c}"] = impls["new"]
    import triton

    report = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "triton": triton.__version__, "new": new_module.__file__, "old": args.old, "results": []}
    for shape in args.shapes.split(","):
        B, T, D = map(int, shape.split("x"))
        entry = bench_shape(B, T, D, args.width, args.bias, impls, dev, args.iters, args.split, configs)
        report["results"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k not in impls}
                         | {k: {"fwd_bwd_ms": entry[k]["fwd_bwd_ms"], "bwd_ms": entry[k]["bwd_ms"]} for k in impls}),
              flush=True)
        with open(args.out, "w") as f:  # after every shape, so a cut-off run keeps its numbers
            json.dump(report, f, indent=2)
    summary = {"device": report["device"], "shapes": len(report["results"])}
    if args.old:
        summary["bwd_speedup_vs_old"] = [e["bwd_speedup_vs_old"] for e in report["results"]]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
