"""fla's GDN state pass (`chunk_gated_delta_rule_fwd_h`) under every launch config, at prefill and training shapes.

Issue 16: in the SmolLM2 hybrid's 8K prefill (batch 1) the state pass `chunk_gated_delta_rule_fwd_kernel_h` is the
largest kernel, 3.3 of 15.6 GPU-ms on an H100 (2026-12-06, benchmarks/results/2026-12-06_h100_train_prefill_after):
26 layers x 128 sequential 64-token chunks, and at batch 1 with 9 heads of 64 only cdiv(64, BV) x 9 programs
(18 with fla's BV = 32) run on 132 SMs. Each program carries the state's BV columns through every chunk; the columns
are independent (the delta rule's `w @ h` and `k^T @ v` act on each column alone), so a smaller BV gives more
programs and shorter dependent products per chunk. fla offers BV in {32, 64} on Hopper; this measures 16 too, and
every (BV, warps, stages) against fla's own autotuned choice and against the choice of the 4-config autotuning
(`--autotune-configs 4`) that the recipes and benchmarks use, so the state pass's config can be chosen by measurement.

Correctness: every config's states and new values are compared with the first config's (the columns are computed
by the same float32 products whatever BV is; tolerance 1e-3 relative to the largest value, which only the order of
the K-reductions inside tl.dot could move).

    python benchmarks/gdn_state_pass_bench.py --out $OUT/gdn_state_pass.json
"""

from __future__ import annotations

import argparse
import json

import torch


def _autotuner(kernel):
    """The Autotuner inside fla's decorator stack (heuristics -> autotune -> jit)."""
    from triton.runtime.autotuner import Autotuner

    fn = kernel
    while not isinstance(fn, Autotuner):
        fn = fn.fn
    return fn


def _inputs(B: int, T: int, H: int, K: int, V: int, device: str):
    from fla.ops.utils import chunk_local_cumsum

    g = torch.Generator(device=device).manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, device=device, generator=g), dim=-1)
    w = 0.1 * torch.randn(B, T, H, K, device=device, generator=g)
    u = torch.randn(B, T, H, V, device=device, generator=g)
    gate = -torch.nn.functional.softplus(torch.randn(B, T, H, device=device, generator=g)) * 0.1
    gate = chunk_local_cumsum(gate, chunk_size=64)
    return k.bfloat16(), w.bfloat16(), u.bfloat16(), gate.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1x8192,1x32768,32x1024", help="BxT, comma-separated")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--dim", type=int, default=64, help="head_k_dim = head_v_dim")
    ap.add_argument("--bv", default="16,32,64")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--stages", default="1,2,3,4")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gdn_state_pass_bench needs a CUDA GPU (fla's Triton kernels)")
    import triton
    from fla.ops.common import chunk_delta_h as m
    from gpu_kernel_check import sync_time  # benchmarks/, this script's folder

    from jetnas.ops.autotune import limit_autotuning

    tuner = _autotuner(m.chunk_gated_delta_rule_fwd_kernel_h_blockdim64)
    fla_configs = list(tuner.configs)
    H, D = args.heads, args.dim
    rows, checks = [], []
    for shape in args.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        k, w, u, g = _inputs(B, T, H, D, D, "cuda")

        def run():
            return m.chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=g, output_final_state=True)

        def with_configs(configs, limit=None):
            tuner.configs = configs
            tuner.cache.clear()
            limit_autotuning(limit)
            try:
                ms = sync_time(run, args.repeats, warmup=1)
                chosen = next(iter(tuner.cache.values())) if tuner.cache else configs[0]
                return ms, f"BV{chosen.kwargs['BV']} w{chosen.num_warps} s{chosen.num_stages}"
            finally:
                limit_autotuning(None)

        ref = None
        for bv in (int(x) for x in args.bv.split(",")):
            for nw in (int(x) for x in args.warps.split(",")):
                for ns in (int(x) for x in args.stages.split(",")):
                    cfg = triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
                    tuner.configs = [cfg]
                    tuner.cache.clear()
                    try:
                        out = run()
                        torch.cuda.synchronize()
                    except Exception as e:  # a config the compiler refuses (shared memory, dot shape)
                        rows.append({"shape": shape, "BV": bv, "warps": nw, "stages": ns, "error": str(e)[:200]})
                        continue
                    h, v_new, ht = (t.float() for t in out)
                    if ref is None:
                        ref = (h, v_new, ht)
                    err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in
                              zip((h, v_new, ht), ref))
                    checks.append({"shape": shape, "BV": bv, "warps": nw, "stages": ns, "rel_err": err,
                                   "passed": err < 1e-3})
                    ms = sync_time(run, args.repeats, warmup=1)
                    rows.append({"shape": shape, "BV": bv, "warps": nw, "stages": ns, "ms": ms})
        fla_ms, fla_cfg = with_configs(fla_configs)
        lim_ms, lim_cfg = with_configs(fla_configs, limit=4)
        ok = [r for r in rows if r["shape"] == shape and "ms" in r]
        best = min(ok, key=lambda r: r["ms"])
        rows.append({"shape": shape, "fla_autotuned_ms": fla_ms, "fla_autotuned_config": fla_cfg,
                     "four_config_ms": lim_ms, "four_config_config": lim_cfg, "best": best,
                     "best_vs_fla": fla_ms / best["ms"], "best_vs_four_config": lim_ms / best["ms"]})
        del k, w, u, g, ref
    tuner.configs = fla_configs
    tuner.cache.clear()
    result = {"device": torch.cuda.get_device_name(), "heads": H, "dim": D, "rows": rows, "checks": checks,
              "checks_passed": all(c["passed"] for c in checks)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'shape':>10} {'fla autotuned':>24} {'4-config autotuning':>24} {'best':>24} {'x fla':>6} {'x 4-cfg':>7}")
    for r in rows:
        if "best" in r:
            b = r["best"]
            best = f"BV{b['BV']} w{b['warps']} s{b['stages']}"
            print(f"{r['shape']:>10} {r['fla_autotuned_ms']:>8.3f} ms {r['fla_autotuned_config']:>12} "
                  f"{r['four_config_ms']:>8.3f} ms {r['four_config_config']:>12} {b['ms']:>8.3f} ms {best:>12} "
                  f"{r['best_vs_fla']:>6.2f} {r['best_vs_four_config']:>7.2f}")
    print(f"checks {'passed' if result['checks_passed'] else 'FAILED'} ({len(checks)} configs)")


if __name__ == "__main__":
    main()
