"""The gated RMS norm's Triton launches (`jetnas.ops.triton_fused`), forward and backward, swept over tiles.

Issue 16: in the SmolLM2 hybrid's 8K prefill (one H100, 2026-12-06, benchmarks/results/2026-12-06_h100_train_prefill_
after/prefill_h100_profile_8k.json) `_gated_rms_norm_kernel` took 1.19 of 15.6 GPU-ms: 46 us per GDN layer for
28 MB (x, gate, y: 8,192 tokens x 9 heads x 64 channels, bf16), ~0.6 TB/s, where the residual add + RMS norm beside
it runs at ~3.4 TB/s. Its tile (64 rows x 64 channels, 16 warps) was never timed. The backward's one-row kernel walks
64-channel rows one warp at a time; `_gated_rms_norm_bwd_tile_kernel` takes tiles of rows.

For each shape (the GDN blocks' per-head norm: rows of 64 channels, the output gate a column slice of a wider
product, as `jetnas.modules` passes it; weight trainable, as in stage 1):
- forward: every (rows per program, warps), against the default launch; each config's output checked against the
  float32 reference (within 1e-2 relative: bf16 outputs, float32 math; the default's own error is printed beside it);
- backward: the one-row kernel, the default ("auto") and every (rows per tile, warps, programs) of the tile kernel,
  each checked against the float32 reference's gradients (dx, dgate within 2e-2: one bf16 rounding of terms summed
  over 64 channels; dweight within 1e-3: float32 partial sums);
- times: `triton.testing.do_bench` medians (L2 flushed between runs), as GB/s of the bytes each launch must move,
  against a device-to-device copy of as many bytes timed the same way (the bandwidth bound).

    python benchmarks/gated_norm_tiles_bench.py --out $OUT/gated_norm_tiles.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {  # name: (tokens, heads, channels)
    "prefill-8k": (8192, 9, 64),  # the SmolLM2 hybrid's GDN at the 8K prefill, batch 1
    "train-32x1024": (32768, 9, 64),  # the stage-1 step: 32 sequences of 1,024
}


# the gate's row stride in the fused product, besides the sweep's 4 x heads x channels: the GDN's g|b|a product of
# 9 heads of 64 unpadded (594), padded to 8 columns (600, the model's until 2026-12-07) and to 16 (608, now): Triton
# vectorizes the gate's loads only for a stride divisible by 16 (jetnas.layers.jet._aligned)
GATE_STRIDES = (594, 600, 608)


def inputs(tokens, heads, L, device, dtype=torch.bfloat16, seed=0, stride=None):
    """x, the gate, weight and dy; the gate a column slice of a wider product viewed as heads: columns 3HL.. of q, k,
    v, gate side by side (stride None), or the first HL of `stride` columns (the model's g|b|a product)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, heads, L, device=device, generator=gen).to(dtype)
    wide = 2 * torch.randn(tokens, stride or 4 * heads * L, device=device, generator=gen)
    start = 0 if stride else 3 * heads * L
    gate = wide.to(dtype)[:, start:start + heads * L].view(tokens, heads, L)
    w = (1 + 0.1 * torch.randn(L, device=device, generator=gen))
    dy = torch.randn(tokens, heads, L, device=device, generator=gen).to(dtype)
    return x, gate, w, dy


def rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def bench_ms(fn) -> float:
    if not torch.cuda.is_available():  # --tiny on CPU (TRITON_INTERPRET=1): the code path, not a timing
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="CPU check of the script (TRITON_INTERPRET=1): 16 tokens")
    args = ap.parse_args()
    from jetnas.ops import triton_fused as tf
    from jetnas.ops.fused import naive_gated_rms_norm

    dev = torch.device("cpu" if args.tiny else "cuda")
    report = {"device": "cpu (tiny)" if args.tiny else torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "shapes": {}}
    sms = 4 if args.tiny else torch.cuda.get_device_properties(dev).multi_processor_count
    for name in args.shapes.split(","):
        tokens, heads, L = SHAPES[name]
        tokens = 16 if args.tiny else tokens
        x, gate, w, dy = inputs(tokens, heads, L, dev)
        rows = tokens * heads
        elem = rows * L * x.element_size()
        xr, gr, wr = (t.detach().float().requires_grad_() for t in (x, gate, w))
        ref = naive_gated_rms_norm(xr, gr, wr, 1e-5, True, None)
        ref.backward(dy.float())
        # the bandwidth bound: a copy moving the forward's bytes (1.5 tensors read, 1.5 written: x + gate in, y out)
        src = torch.zeros(3 * elem // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_ms = bench_ms(lambda: dst.copy_(src))
        copy_gbs = 3 * elem / copy_ms / 1e6
        entry = {"tokens": tokens, "heads": heads, "channels": L, "copy_gb_s": copy_gbs, "forward": [],
                 "backward": []}
        fwd_bytes, bwd_bytes = 3 * elem, 5 * elem  # fwd: x, gate in, y out; bwd: x, gate, dy in, dx, dgate out
        default_y = tf._gated_rms_norm_fwd(x, gate, w, 1e-5, True, None)
        default_err = rel(default_y, ref)
        fwd_tiles = [(r, nw) for r in (2, 4, 8, 16, 32, 64, 128) for nw in (1, 2, 4, 8) if r * L >= 32 * nw]
        if args.tiny:  # the interpreter runs every program in Python: a sixth of the grid, its ends included
            fwd_tiles = fwd_tiles[::6] + fwd_tiles[-1:]
        for tile in [None] + fwd_tiles:
            y = tf._gated_rms_norm_fwd(x, gate, w, 1e-5, True, None, tile=tile)
            err = rel(y, ref)
            ms = bench_ms(lambda: tf._gated_rms_norm_fwd(x, gate, w, 1e-5, True, None, tile=tile))
            entry["forward"].append({"tile": "default" if tile is None else list(tile), "ms": ms,
                                     "gb_s": fwd_bytes / ms / 1e6, "of_copy": fwd_bytes / ms / 1e6 / copy_gbs,
                                     "rel_err": err, "passed": err < 1e-2})
        bwd_tiles = [(r, nw, p) for r in (8, 16, 32, 64) for nw in (2, 4, 8) for p in (2 * sms, 8 * sms, -(-rows // r))]
        bwd_tiles = ["rows", "auto"] + (bwd_tiles[::6] + bwd_tiles[-1:] if args.tiny else bwd_tiles)
        for tile in bwd_tiles:
            dx, dg, dw = tf._gated_rms_norm_bwd(x, gate, w, dy, 1e-5, True, None, True, tile=tile)
            errs = {"dx": rel(dx, xr.grad), "dgate": rel(dg, gr.grad), "dweight": rel(dw, wr.grad)}
            ok = errs["dx"] < 2e-2 and errs["dgate"] < 2e-2 and errs["dweight"] < 1e-3
            ms = bench_ms(lambda: tf._gated_rms_norm_bwd(x, gate, w, dy, 1e-5, True, None, True, tile=tile))
            entry["backward"].append({"tile": tile if isinstance(tile, str) else list(tile), "ms": ms,
                                      "gb_s": bwd_bytes / ms / 1e6, "of_copy": bwd_bytes / ms / 1e6 / copy_gbs,
                                      "rel_err": errs, "passed": ok})
        entry["default_forward_rel_err"] = default_err
        # the default launches at the model's gate strides (same x, gate values of another draw)
        entry["gate_strides"] = []
        for stride in GATE_STRIDES:
            xs, gs, ws, dys = inputs(tokens, heads, L, dev, stride=stride)
            assert gs.stride(0) == stride
            gr2 = gs.detach().float().requires_grad_()
            xr2, wr2 = xs.detach().float().requires_grad_(), ws.detach().float().requires_grad_()
            ref2 = naive_gated_rms_norm(xr2, gr2, wr2, 1e-5, True, None)
            ref2.backward(dys.float())
            err = rel(tf._gated_rms_norm_fwd(xs, gs, ws, 1e-5, True, None), ref2)
            dx, dg, dw = tf._gated_rms_norm_bwd(xs, gs, ws, dys, 1e-5, True, None, True)
            berr = max(rel(dx, xr2.grad), rel(dg, gr2.grad))
            fwd_ms = bench_ms(lambda: tf._gated_rms_norm_fwd(xs, gs, ws, 1e-5, True, None))
            bwd_ms = bench_ms(lambda: tf._gated_rms_norm_bwd(xs, gs, ws, dys, 1e-5, True, None, True))
            entry["gate_strides"].append({"stride": stride, "forward_ms": fwd_ms, "backward_ms": bwd_ms,
                                          "forward_of_copy": fwd_bytes / fwd_ms / 1e6 / copy_gbs,
                                          "backward_of_copy": bwd_bytes / bwd_ms / 1e6 / copy_gbs,
                                          "passed": err < 1e-2 and berr < 2e-2})
        report["shapes"][name] = entry
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{report['device']}: gated RMS norm tiles (bf16, per-head, 64 channels, strided gate)")
    for name, e in report["shapes"].items():
        print(f"{name}: copy bound {e['copy_gb_s']:.0f} GB/s")
        for kind in ("forward", "backward"):
            rows = e[kind]
            fails = [r for r in rows if not r["passed"]]
            ok = [r for r in rows if r["passed"]]
            named = {str(r["tile"]): r for r in rows if isinstance(r["tile"], str)}
            best = sorted(ok, key=lambda r: r["ms"])[:4]
            print(f"  {kind}: {len(fails)} of {len(rows)} configs failed the check")
            for label, r in [*named.items(), *((f"best {r['tile']}", r) for r in best)]:
                print(f"    {label:<22} {r['ms'] * 1e3:8.1f} us {r['gb_s']:7.0f} GB/s ({r['of_copy']:.0%} of copy)")
        for r in e["gate_strides"]:
            print(f"  gate stride {r['stride']}: forward {r['forward_ms'] * 1e3:6.1f} us ({r['forward_of_copy']:.0%}), "
                  f"backward {r['backward_ms'] * 1e3:6.1f} us ({r['backward_of_copy']:.0%})"
                  f"{'' if r['passed'] else '  FAILED the check'}")


if __name__ == "__main__":
    main()
