"""The segment-parallel GDN state pass (`Backend.segment_state_pass`) and the affine-form one
(`Backend.affine_state_pass`, `--affine bf16,tf32`) against fla's plain `chunk_gated_delta_rule`.

Issue 16: in the SmolLM2 hybrid's 8K prefill (batch 1, one H100, 2026-12-06, benchmarks/results/
2026-12-06_h100_graph_step) fla's sequential state pass `chunk_gated_delta_rule_fwd_kernel_h` is 3.3 of 14.5 GPU-ms:
9 heads x 1 value block = 9 thread blocks on 132 SMs over 128 dependent chunk steps, ~1 us each. The segment path
(`jetnas.ops._fla.segment_parallel_chunk_gated_delta_rule`, algebra in `jetnas.ops.segment_pass`) splits each
sequence into P segments: their affine maps in parallel ("prescan": fla's own pre-scan kernel of its intra-card
context parallelism; "state_pass": fla's ordinary pass on [u | 0] from [0 | I]), a PyTorch combine, then the ordinary
pass on every segment in parallel from its true initial state.

For each shape (BxHxKxV) and length, every (summary, P):
- check: output o and final state against fla's plain op on the same bf16 inputs, as max |diff| / max |fla's value|.
  The bound is bf16 noise measured in the same run: the distance of fla's bf16 output from fla on the float32 copies
  of the same inputs (the rounding every bf16 run carries); the segment path must be within 2x that (it regroups the
  same products, and float32 summaries multiply bf16-rounded states), with a floor of 1e-3 (1e-2, bf16's 2^-8
  grown over the sums, if fla refuses the float32 run; the JSON then says why). The check must be able to fail:
  `carried_state`, the second half run from a zero state against the whole run's second half, must exceed 10x the
  bound, else the shape's checks count as failed (decays of ~1e-3 per token keep it large).
- time: CUDA events, warm-up, median of --repeats, eagerly and replayed from a CUDA graph (prefill runs captured:
  the combine's small launches cost less there), against fla's plain op timed the same way.

    python benchmarks/gdn_segment_pass_bench.py --out $OUT/gdn_segment_pass.json --autotune-configs 4
    python benchmarks/gdn_segment_pass_bench.py --device cpu --out /tmp/seg.json   # the PyTorch reference, checks only
    python benchmarks/gdn_segment_pass_bench.py --segments "" --affine bf16,tf32 --out $OUT/gdn_affine_pass.json \
        --autotune-configs 4     # the affine pass: whole op + the state pass alone at each launch, against fla

The affine form (`jetnas.ops.triton_affine_pass`) keeps one matrix product per chunk on the sequential path
(the chunks' [K, K] state matrices computed in parallel first); its rows are checked like the segments' (within 2x
of bf16's own noise against fla's plain op, on inputs whose carried state matters).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from jetnas.ops.backend import parse_affine

SHAPES = "1x9x64x64,1x12x96x256"  # SmolLM2-135M hybrid's GDN; Jet-Nemotron-2B's JetBlock (jetnas.models.presets)


def _inputs(B, T, H, K, V, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, generator=gen)
    k = torch.randn(B, T, H, K, device=device, generator=gen)
    v = torch.randn(B, T, H, V, device=device, generator=gen)
    # weak decays, ~1e-3 per token: the state carries over thousands of tokens, across segment boundaries. (The
    # first version's -softplus(x) * 0.1, ~0.07 per token, forgot a state within ~100 tokens: every segment's start
    # state then vanished below float32 rounding, and the check gave exactly 0.0 on the H100 of 2026-12-06, passing
    # a path that the whole-model check then found 0.156 off. `carried_state` below now guards this.)
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, device=device, generator=gen)) * 1.4e-3
    beta = torch.rand(B, T, H, device=device, generator=gen).sigmoid()
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def graph_time(fn, repeats: int, sync_time) -> float:
    """Median ms of replaying `fn` captured in a CUDA graph (after an eager warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return sync_time(graph.replay, repeats, warmup=2)


def _measure(shape: str, T: int, args, rows: list, checks: list) -> None:
    """Check and time fla's plain op and every (summary, P) of the segment path at one shape and length."""
    from gpu_kernel_check import sync_time  # benchmarks/, this script's folder

    from jetnas.ops import _fla

    B, H, K, V = (int(x) for x in shape.split("x"))
    q, k, v, g, beta = _inputs(B, T, H, K, V, "cuda", torch.bfloat16)
    S0 = torch.randn(B, H, K, V, device="cuda") * 0.1 if args.initial_state else None

    def plain():
        return _fla.chunk_gated_delta_rule(q, k, v, g, beta, None, S0, True, None, True)

    with torch.no_grad():
        ref_o, ref_S = plain()
        base = {"shape": shape, "T": T}
        try:
            f32 = _fla.chunk_gated_delta_rule(q.float(), k.float(), v.float(), g, beta.float(), None, S0, True,
                                              None, True)
            noise = max(_rel(ref_o, f32[0]), _rel(ref_S, f32[1]))
            bound = max(2 * noise, 1e-3)
        except Exception as e:  # fla refusing float32 here: bf16's 2^-8 rounding grown over the sums, said so
            noise, bound, base["noise_error"] = None, 1e-2, str(e)[:200]
        # how much the state carried into the second half matters: the second half run from a zero state against
        # the same tokens' outputs in the whole run. A check of segment start states can only fail when this is
        # well above the bound (here: 10x); otherwise every check of this shape is marked failed as insensitive.
        h = T // 2
        alone, _ = _fla.chunk_gated_delta_rule(*(t[:, h:].contiguous() for t in (q, k, v, g, beta)), None, None, True,
                                               None, True)
        base["carried_state"] = _rel(alone, ref_o[:, h:])
        sensitive = base["carried_state"] > 10 * bound
        plain_ms = sync_time(plain, args.repeats, warmup=args.warmup)
        try:
            plain_graph_ms = graph_time(plain, args.repeats, sync_time)
        except Exception as e:  # report, keep measuring the eager rows
            plain_graph_ms, base["graph_error"] = None, str(e)[:200]
        rows.append({**base, "path": "fla", "ms": plain_ms, "graph_ms": plain_graph_ms})

        def path_row(row: dict, fn) -> None:
            """Check `fn` (another path to the same op) against fla's plain op, then time it eagerly and graphed."""
            try:
                o, S = fn()
                torch.cuda.synchronize()
            except Exception as e:  # a kernel refusing this shape: say so, go on
                rows.append({**row, "error": str(e)[:300]})
                return
            err = {"o_rel_err": _rel(o, ref_o), "state_rel_err": _rel(S, ref_S)}
            checks.append({**row, **err, "bf16_noise": noise, "bound": bound, "sensitive": sensitive,
                           "passed": sensitive and max(err.values()) <= bound})
            row["ms"] = sync_time(fn, args.repeats, warmup=args.warmup)
            try:
                row["graph_ms"] = graph_time(fn, args.repeats, sync_time)
            except Exception as e:
                row["graph_ms"], row["graph_error"] = None, str(e)[:200]
            row["speedup"] = plain_ms / row["ms"]
            if row["graph_ms"] and plain_graph_ms:
                row["graph_speedup"] = plain_graph_ms / row["graph_ms"]
            rows.append(row)

        for summary in args.summaries.split(","):
            for P in _ints(args.segments):
                path_row({**base, "path": f"segments:{summary}", "P": P},
                         lambda summary=summary, P=P: _fla.segment_parallel_chunk_gated_delta_rule(
                             q, k, v, g, beta, None, S0, True, True, P, summary))
        for value in filter(None, args.affine.split(",")):
            precision, variant = parse_affine(value)
            path_row({**base, "path": f"affine:{value}"},
                     lambda precision=precision, variant=variant: _fla.affine_chunk_gated_delta_rule(
                         q, k, v, g, beta, None, S0, True, True, precise=precision == "tf32", variant=variant))
        if args.affine:
            _state_pass_sweep(q, k, v, g, beta, S0, base, args, rows)


def _ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x]


def _state_pass_sweep(q, k, v, g, beta, S0, base: dict, args, rows: list) -> None:
    """The state pass alone on the same inputs (fla's chunk-local cumsum and WY kernels first): fla's
    `chunk_gated_delta_rule_fwd_h` against `affine_state_pass` at each launch of `--affine-launches`
    (block_v x num_warps x num_stages) and precision, graphed; each path's h and v_new against fla's."""
    import triton
    from fla.modules.norm.l2norm import l2norm_fwd
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2
    from gpu_kernel_check import sync_time

    from jetnas.ops.triton_affine_pass import affine_state_pass

    kn, _ = l2norm_fwd(k.contiguous())
    g2 = chunk_local_cumsum(g.contiguous(), chunk_size=64, scale=RCP_LN2)
    w, u, _ = chunk_gated_delta_rule_fwd_intra(k=kn, v=v.contiguous(), g=g2, beta=beta.contiguous(), chunk_size=64)

    def fla_pass():
        return chunk_gated_delta_rule_fwd_h(k=kn, w=w, u=u, g=g2, initial_state=S0, output_final_state=True,
                                            chunk_size=64)

    ref_h, ref_v, _ = fla_pass()
    fla_ms = graph_time(fla_pass, args.repeats, sync_time)
    rows.append({**base, "path": "state-pass:fla", "graph_ms": fla_ms})
    # every launch for the "loop" kernel of each precision, the other variants at the first launch
    precisions = sorted({parse_affine(value)[0] for value in filter(None, args.affine.split(","))})
    launches = args.affine_launches.split(",")
    runs = [(p, "loop", launch) for p in precisions for launch in launches]
    variants = [variant for variant in args.affine_variants.split(",") if variant]
    runs += [(p, variant, launches[0]) for p in precisions for variant in variants]
    for precision, variant, launch in runs:
        bv, warps, stages = (int(x) for x in launch.split("x"))
        row = {**base, "path": f"state-pass:affine:{precision}:{variant}", "launch": launch}
        if bv > triton.next_power_of_2(v.shape[-1]):
            continue

        def ours(precision=precision, bv=bv, warps=warps, stages=stages, variant=variant):
            return affine_state_pass(kn, w, u, g2, S0, True, precise=precision == "tf32", block_v=bv,
                                     num_warps=warps, num_stages=stages, variant=variant)

        try:
            h, vn, _ = ours()
            torch.cuda.synchronize()
            row.update(h_rel_to_fla=_rel(h, ref_h), v_new_rel_to_fla=_rel(vn, ref_v))
            row["graph_ms"] = graph_time(ours, args.repeats, sync_time)
            row["graph_speedup"] = fla_ms / row["graph_ms"]
        except Exception as e:  # a launch Triton refuses (shared memory): say so, go on
            row["error"] = str(e)[:300]
        rows.append(row)


def run_gpu(args) -> dict:
    rows, checks = [], []
    for shape in args.shapes.split(","):
        for T in (int(t) for t in args.lengths.split(",")):
            _measure(shape, T, args, rows, checks)
            torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "rows": rows, "checks": checks}


def run_cpu(args) -> dict:
    """The PyTorch reference of the same algorithm against the sequential chunked form (no timing): a smoke run."""
    from jetnas.ops.delta_rule import naive_chunk_gated_delta_rule
    from jetnas.ops.segment_pass import segment_parallel_chunk_gated_delta_rule

    checks = []
    for shape in args.shapes.split(","):
        B, H, K, V = (int(x) for x in shape.split("x"))
        for T in (int(t) for t in args.lengths.split(",")):
            q, k, v, g, beta = _inputs(B, T, H, K, V, "cpu", torch.float32)
            ref_o, ref_S = naive_chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True, use_qk_l2norm=True)
            for P in _ints(args.segments):
                o, S = segment_parallel_chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
                                                               use_qk_l2norm=True, segments=P)
                err = max(_rel(o, ref_o), _rel(S, ref_S))
                # float32 against float32 (the products regrouped): rounding, far below 1e-4
                checks.append({"shape": shape, "T": T, "P": P, "rel_err": err, "passed": err < 1e-4})
    return {"device": "cpu", "rows": [], "checks": checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SHAPES, help="BxHxKxV, comma-separated")
    ap.add_argument("--lengths", default="8192,32768", help="sequence lengths T, comma-separated")
    ap.add_argument("--segments", default="2,4,8,16", help="segment counts P, comma-separated")
    ap.add_argument("--summaries", default="prescan,state_pass", help="how the segments' maps are computed")
    ap.add_argument("--affine", default="",
                    help="also the affine-form state pass (Backend.affine_state_pass) at these precisions, e.g. "
                         "bf16,tf32: the whole op checked and timed like the segments, and the state pass alone "
                         "against fla's at each of --affine-launches")
    ap.add_argument("--affine-launches", default="64x4x2,64x4x3,32x4x2,32x2x2,16x2x2,64x8x2",
                    help="the affine pass's launches to time, block_v x num_warps x num_stages")
    ap.add_argument("--affine-variants", default="v-after,pre-n",
                    help="the affine pass's other variants (jetnas.ops.triton_affine_pass.VARIANTS), timed at the "
                         "first launch")
    ap.add_argument("--initial-state", action="store_true", help="start from a random state (prefill after a cache)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the PyTorch reference's checks at the given (small) shapes, no timing")
    ap.add_argument("--autotune-configs", type=int, default=None,
                    help="benchmark at most N autotuning configs per Triton kernel (a fast start; lightly tuned)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.autotune_configs is not None:
        from jetnas.ops.autotune import limit_autotuning

        limit_autotuning(args.autotune_configs)
    start = time.time()
    if args.device == "cpu":
        result = run_cpu(args)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gdn_segment_pass_bench needs a CUDA GPU for fla's kernels (or --device cpu)")
        result = run_gpu(args)
    result.update(args=vars(args), wall_s=time.time() - start,
                  checks_passed=bool(result["checks"]) and all(c["passed"] for c in result["checks"]))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if result["rows"]:
        print(f"{'shape':>14} {'T':>6} {'path':>26} {'P/launch':>8} {'ms':>8} {'graph ms':>9} {'x fla':>6} "
              f"{'x fla graph':>11}")
        for r in result["rows"]:
            what = r.get("P", r.get("launch", ""))
            if "error" in r:
                print(f"{r['shape']:>14} {r['T']:>6} {r['path']:>26} {what:>8} error: {r['error'][:60]}")
                continue
            ms, gms = (f"{r[key]:.3f}" if r.get(key) else "-" for key in ("ms", "graph_ms"))
            print(f"{r['shape']:>14} {r['T']:>6} {r['path']:>26} {what:>8} {ms:>8} {gms:>9} "
                  f"{r.get('speedup', 1.0):>6.2f} {r.get('graph_speedup', 1.0):>11.2f}")
    worst = max((max(c.get("o_rel_err", c.get("rel_err", 0)), c.get("state_rel_err", 0)) for c in result["checks"]),
                default=None)
    print(f"checks {'passed' if result['checks_passed'] else 'FAILED'} ({len(result['checks'])}, worst rel err "
          f"{worst})")


if __name__ == "__main__":
    main()
