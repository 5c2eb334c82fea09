"""Sliding-window attention forward on the GPU (issue 16): the Triton kernel (`jetnas.ops.triton_attention`) against
the path it replaces in `causal_attention` and against full causal SDPA, the cost it should be a fraction of.

Issue 16: in the SmolLM2-135M hybrid's 8K prefill (one H100) the two window-512 layers took ~0.41 ms each through
`_windowed_by_blocks` (query blocks of 2W, an explicit mask each, SDPA that cannot skip masked tiles, a `torch.cat`),
twice a full causal layer (0.208 ms). A window over T tokens computes about `T W - W^2 / 2` query-key pairs where
causal attention computes `T (T + 1) / 2`: about 2W / T of it (0.125 at 8K with W = 512); `pairs_ratio` reports
the exact figure per shape.

Rows per shape (bf16, batch 1, q and k contiguous as the fused rotary writes them, v a column slice of the
q|k|v product as the layer passes it):
- `old`: `causal_attention(..., window=W)` on the torch backend: `_windowed_by_blocks` for T > 2W, one SDPA with a
  materialised mask otherwise (the short prompts, which the Triton backend now also sends to the kernel);
- `triton`: `triton_swa_forward` at its default tiles;
- `causal_sdpa`: `causal_attention(...)` without a window (SDPA's causal flag: cuDNN / FlashAttention), the bound;
- `triton_causal`: the kernel with no window, for comparison with `causal_sdpa` (not routed to by the library).

Checks: every windowed row against `old` in bf16 (max abs error, norm-relative error; pass within 1e-2: each side
rounds its output to bf16, ~2e-3, and the kernel also rounds the probabilities to bf16 before P V, as
FlashAttention does) and against a float32 run of the old path (`rel_vs_fp32`, for both: the kernel should be as
close as the old path). `triton_causal` is checked against `causal_sdpa` the same way.

Times: `triton.testing.do_bench_cudagraph` medians (each call replayed from a CUDA graph, so launch overhead does not
count; the old path's several launches per call are all in the graph). `--sweep` also times every tile (BLOCK_M,
BLOCK_N, warps, stages) of the kernel, each checked like the default.

    PYTHONPATH=. python benchmarks/swa_bench.py --out $OUT/swa.json
    PYTHONPATH=. python benchmarks/swa_bench.py --sweep --shapes smollm-8k-w512,jet2b-64k-w1152 \
        --out $OUT/swa_sweep.json

`--tiny` runs the same code on CPU under Triton's interpreter (TRITON_INTERPRET=1) at small shapes and 16 x 16
tiles: a check of the script, its times are not timings. The table comes last but for one JSON summary line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from jetnas.ops.attention import causal_attention
from jetnas.ops.triton_attention import default_tiles, triton_swa_forward

TOL = 1e-2
# name: (B, T, H, Hkv, D, W). SmolLM2-135M's attention (9 / 3 heads of 64) at the shipped windows, 8K and 32K;
# Jet-Nemotron-2B's (12 / 2 heads of 128, window 1,152) at 64K; two short prompts (T <= 2W), now also the kernel's
SHAPES = {
    "smollm-8k-w512": (1, 8192, 9, 3, 64, 512),
    "smollm-8k-w1152": (1, 8192, 9, 3, 64, 1152),
    "smollm-32k-w512": (1, 32768, 9, 3, 64, 512),
    "smollm-32k-w1152": (1, 32768, 9, 3, 64, 1152),
    "jet2b-64k-w1152": (1, 65536, 12, 2, 128, 1152),
    "smollm-1k-w512": (1, 1024, 9, 3, 64, 512),
    "smollm-300-w512": (1, 300, 9, 3, 64, 512),
}
TINY = {
    "tiny-w8": (1, 40, 3, 1, 64, 8),
    "tiny-gqa-d128-w16": (2, 37, 6, 2, 128, 16),
    "tiny-short-w32": (1, 30, 3, 1, 64, 32),
}
TINY_TILES = {"block_m": 16, "block_n": 16}
SWEEP = {"block_m": (64, 128), "block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
TINY_SWEEP = {"block_m": (16, 32), "block_n": (16,), "num_warps": (4,), "num_stages": (1,)}


def inputs(B, T, H, Hkv, D, device):
    """q, k `[B, T, H|Hkv, D]` contiguous and v a slice of a wider `[B, T, (H + 2 Hkv) D]` product, bf16."""
    q = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, T, Hkv, D, device=device, dtype=torch.bfloat16)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=device, dtype=torch.bfloat16)
    v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
    return q, k, v


def pairs(T: int, W: int | None) -> int:
    """Query-key pairs a causal window of W (None: all) computes over T tokens."""
    W = T if W is None else min(W, T)
    return T * W - W * (W - 1) // 2


def errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = (got.float() - want.float())
    rel = (diff.norm() / want.float().norm().clamp_min(1e-30)).item()
    return {"max_abs": diff.abs().max().item(), "rel": rel, "passed": rel < TOL}


def timer(tiny: bool):
    """ms per call: CUDA-graph replay medians, or (--tiny) one wall-clock call, which times nothing useful."""
    if tiny:
        def wall(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return wall
    from triton.testing import do_bench_cudagraph

    return lambda fn: float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


def measure(name: str, shape: tuple, args, time_ms) -> dict:
    B, T, H, Hkv, D, W = shape
    device = "cpu" if args.tiny else "cuda"
    torch.manual_seed(0)
    q, k, v = inputs(B, T, H, Hkv, D, device)
    tiles = TINY_TILES if args.tiny else {}
    runs = {
        "old": lambda: causal_attention(q, k, v, window=W),
        "triton": lambda: triton_swa_forward(q, k, v, W, **tiles),
        "causal_sdpa": lambda: causal_attention(q, k, v),
        "triton_causal": lambda: triton_swa_forward(q, k, v, None, **tiles),
    }
    with torch.no_grad():
        outs = {label: fn() for label, fn in runs.items()}
        # float32 references with the key/value heads repeated: SDPA's memory-efficient kernel takes float32 but
        # not grouped heads, and the math fallback would materialise [H, T, T] scores (200 GB at 64K)
        qf, kf, vf = q.float(), k.float().repeat_interleave(H // Hkv, 2), v.float().repeat_interleave(H // Hkv, 2)
        fp32 = causal_attention(qf, kf, vf, window=W)
        fp32_causal = causal_attention(qf, kf, vf)
        del qf, kf, vf
        rows = {}
        for label, fn in runs.items():
            windowed = label in ("old", "triton")
            row = {"ms": time_ms(fn), "rel_vs_fp32": errors(outs[label], fp32 if windowed else fp32_causal)["rel"]}
            if label == "triton":
                row["vs_old"] = errors(outs[label], outs["old"])
            if label == "triton_causal":
                row["vs_causal_sdpa"] = errors(outs[label], outs["causal_sdpa"])
            rows[label] = row
        sweep = []
        if args.sweep:
            grid = TINY_SWEEP if args.tiny else SWEEP
            for bm, bn, warps, stages in itertools.product(*grid.values()):
                launch = {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
                try:
                    out = triton_swa_forward(q, k, v, W, **launch)
                    sweep.append({**launch, "ms": time_ms(lambda: triton_swa_forward(q, k, v, W, **launch)),
                                  **errors(out, outs["old"])})
                except Exception as err:  # noqa: BLE001 - a tile that does not fit (shared memory) is reported
                    sweep.append({**launch, "error": f"{type(err).__name__}: {str(err)[:200]}"})
    old, new, causal = rows["old"]["ms"], rows["triton"]["ms"], rows["causal_sdpa"]["ms"]
    return {
        "shape": {"B": B, "T": T, "H": H, "Hkv": Hkv, "D": D, "window": W},
        "path_old": "query blocks of 2W" if T > 2 * W else "one SDPA with a mask",
        "tiles": tiles or default_tiles(D),
        "pairs_ratio": pairs(T, W) / pairs(T, None),
        "rows": rows,
        "old_over_triton": old / new,
        "triton_over_causal_sdpa": new / causal,
        "sweep": sweep,
        "passed": rows["triton"]["vs_old"]["passed"] and rows["triton_causal"]["vs_causal_sdpa"]["passed"]
        and all(r.get("passed", False) for r in sweep),
    }


def table(results: dict) -> str:
    head = (f"{'shape':<20}{'old ms':>9}{'triton ms':>11}{'causal ms':>11}{'old/tri':>9}{'tri/causal':>11}"
            f"{'pairs':>8}{'rel err':>10}  ok")
    lines = [head]
    for name, r in results.items():
        rows = r["rows"]
        lines.append(f"{name:<20}{rows['old']['ms']:>9.3f}{rows['triton']['ms']:>11.3f}"
                     f"{rows['causal_sdpa']['ms']:>11.3f}"
                     f"{r['old_over_triton']:>9.2f}{r['triton_over_causal_sdpa']:>11.3f}{r['pairs_ratio']:>8.3f}"
                     f"{rows['triton']['vs_old']['rel']:>10.1e}  {'yes' if r['passed'] else 'NO'}")
        best = min((s for s in r["sweep"] if "ms" in s and s["passed"]), key=lambda s: s["ms"], default=None)
        if best is not None:
            lines.append(f"{'':<20}best tile {best['block_m']}x{best['block_n']}, {best['num_warps']} warps, "
                         f"{best['num_stages']} stages: {best['ms']:.3f} ms")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help=f"comma-separated names (default: all of {list(SHAPES)})")
    ap.add_argument("--sweep", action="store_true", help="also time every tile of the kernel")
    ap.add_argument("--tiny", action="store_true", help="CPU check of the script (TRITON_INTERPRET=1), tiny shapes")
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args()
    known = TINY if args.tiny else SHAPES
    names = args.shapes.split(",") if args.shapes else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown shapes {unknown}; known: {list(known)}")
    if not args.tiny and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or --tiny on CPU under TRITON_INTERPRET=1")
    time_ms = timer(args.tiny)
    results = {name: measure(name, known[name], args, time_ms) for name in names}
    report = {"device": "cpu (tiny, interpreter: not timings)" if args.tiny else torch.cuda.get_device_name(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tolerance": TOL, "shapes": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(table(results))
    print(json.dumps({"passed": all(r["passed"] for r in results.values()),
                      "old_over_triton": {n: round(r["old_over_triton"], 3) for n, r in results.items()},
                      "out": args.out}))


if __name__ == "__main__":
    main()
