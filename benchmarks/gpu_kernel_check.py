"""Every block's fast GPU path (fla + our Triton kernels, bf16) against its PyTorch reference (fp32), at the
Jet-Nemotron-2B shapes: forward, backward (input and every parameter), and decode steps after a prefill.
Then times each block's training step (forward + backward), fast vs reference, and the dynamic-conv kernel
against the memory-bandwidth bound.

    python benchmarks/gpu_kernel_check.py --out results.json
    python benchmarks/gpu_kernel_check.py --sections ops,blocks --ops rwkv7 --blocks rwkv7    # one block type

Errors are ||fast - ref|| / ||ref||. Both sides start from the same bf16 values (weights and inputs); the
reference upcasts them and computes in fp32, so the error measures bf16 arithmetic in the fast path: ~1e-3 to
1e-2 is expected; the pass limits are 2e-2 (outputs, states) and 5e-2 (gradients, which sum over more terms).
Last stdout line: one JSON object with the verdict.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from jetnas.layers import LAYER_TYPES, build_layer
from jetnas.modules.backend import set_backend
from jetnas.ops.autotune import limit_autotuning
from jetnas.ops.conv import dynamic_conv, naive_dynamic_conv
from jetnas.ops.decode import rwkv7_step_
from jetnas.ops.delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, naive_chunk_gated_delta_rule
from jetnas.ops.gla import chunk_gla, naive_chunk_gla
from jetnas.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7, naive_chunk_rwkv7, rwkv7_step

OUT_TOL, GRAD_TOL = 2e-2, 5e-2
D = 1536
# Jet-Nemotron-2B: attention 12/2/128 with window 1152; JetBlock 12 heads, K 96, V 256; the other linear blocks
# at the attention's heads and head dim (what PostNAS step 2 compares)
BLOCKS = {
    "attn": dict(num_heads=12, num_kv_heads=2, head_dim=128),
    "swa": dict(num_heads=12, num_kv_heads=2, head_dim=128, window_size=1152),
    "jet": dict(num_heads=12, head_k_dim=96, head_v_dim=256),
    "gdn": dict(num_heads=12, head_k_dim=96, head_v_dim=256),
    "deltanet": dict(num_heads=12, head_k_dim=128, head_v_dim=128),
    "gla": dict(num_heads=12, head_k_dim=128, head_v_dim=128),
    "retnet": dict(num_heads=12, head_k_dim=128, head_v_dim=128),
    "mamba2": dict(head_dim=64, state_size=128),
    "rwkv7": dict(num_heads=12, head_k_dim=128, head_v_dim=128),
}
OPS = ("gated_delta_rule", "gla", "dynamic_conv", "rwkv7")


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sync_time(fn, iters: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` with CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def op_checks(dev, ops=OPS) -> dict:
    res = {}
    if "gated_delta_rule" in ops:
        res.update(gated_delta_rule_checks(dev))
    if "gla" in ops:
        res.update(gla_checks(dev))
    if "dynamic_conv" in ops:
        res.update(dynamic_conv_checks(dev))
    if "rwkv7" in ops:
        res.update(rwkv7_checks(dev))
    return res


def gated_delta_rule_checks(dev) -> dict:
    torch.manual_seed(0)
    B, T, H, K, V = 2, 1000, 12, 96, 256
    res = {}
    # gated delta rule, chunked (training/prefill) with initial state and final state
    q, k, v = (torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16) for d in (K, K, V))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=dev)) * 0.1
    beta = torch.rand(B, T, H, device=dev, dtype=torch.bfloat16)
    h0 = torch.randn(B, H, K, V, device=dev) * 0.1
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta, h0)]
    ref_ins = [t.detach().double().requires_grad_() for t in (q, k, v, g, beta, h0)]
    o, s = chunk_gated_delta_rule(*ins[:5], initial_state=ins[5], output_final_state=True, use_qk_l2norm=True,
                                  backend="triton")
    o_r, s_r = naive_chunk_gated_delta_rule(*ref_ins[:5], initial_state=ref_ins[5], output_final_state=True,
                                            use_qk_l2norm=True)
    do, ds = torch.randn_like(o_r), torch.randn_like(s_r)
    g_fast = torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), ins)
    g_ref = torch.autograd.grad((o_r * do).sum() + (s_r * ds).sum(), ref_ins)
    log("gated delta rule chunk fwd/bwd done")
    res["gated_delta_rule.chunk"] = {"out": rel(o, o_r), "final_state": rel(s, s_r),
                                     **{f"grad_{n}": rel(a, b) for n, a, b in
                                        zip(["q", "k", "v", "g", "beta", "h0"], g_fast, g_ref)}}
    # one decode step from that state
    o1, s1 = fused_recurrent_gated_delta_rule(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], initial_state=h0,
                                              output_final_state=True, use_qk_l2norm=True, backend="triton")
    o1r, s1r = naive_chunk_gated_delta_rule(q[:, :1].double(), k[:, :1].double(), v[:, :1].double(),
                                            g[:, :1].double(), beta[:, :1].double(), initial_state=h0.double(),
                                            output_final_state=True, use_qk_l2norm=True)
    res["gated_delta_rule.decode_step"] = {"out": rel(o1, o1r), "final_state": rel(s1, s1r)}
    return res


def gla_checks(dev) -> dict:
    torch.manual_seed(0)
    B, T, H = 2, 1000, 12
    res = {}
    # GLA: per-channel decay (GLA) and per-head decay (RetNet, Mamba2)
    for name, gshape in (("gla.per_channel", (B, T, H, 128)), ("gla.per_head", (B, T, H))):
        qg, kg, vg = (torch.randn(B, T, H, 128, device=dev, dtype=torch.bfloat16) * 0.3 for _ in range(3))
        gg = torch.nn.functional.logsigmoid(torch.randn(*gshape, device=dev)) / 16
        ins = [t.detach().clone().requires_grad_() for t in (qg, kg, vg, gg)]
        ref_ins = [t.detach().double().requires_grad_() for t in (qg, kg, vg, gg)]
        o, s = chunk_gla(*ins, output_final_state=True, backend="triton")
        o_r, s_r = naive_chunk_gla(*ref_ins, output_final_state=True)
        do = torch.randn_like(o_r)
        g_fast = torch.autograd.grad((o.double() * do).sum() + s.double().sum(), ins)
        g_ref = torch.autograd.grad((o_r * do).sum() + s_r.sum(), ref_ins)
        res[name] = {"out": rel(o, o_r), "final_state": rel(s, s_r),
                     **{f"grad_{n}": rel(a, b) for n, a, b in zip("qkvg", g_fast, g_ref)}}
        log(name, res[name])
    return res


def dynamic_conv_checks(dev) -> dict:
    torch.manual_seed(0)
    B, T, H, V = 2, 1000, 12, 256
    res = {}
    # dynamic convolution, our Triton kernel, with an initial state
    x = torch.randn(B, T, H * V, device=dev, dtype=torch.bfloat16)
    kern = torch.randn(B, T, H * V, 4, device=dev, dtype=torch.bfloat16) * 0.5
    st = torch.randn(B, H * V, 3, device=dev, dtype=torch.bfloat16)
    ins = [t.detach().clone().requires_grad_() for t in (x, kern, st)]
    ref_ins = [t.detach().double().requires_grad_() for t in (x, kern, st)]
    y, f = dynamic_conv(*ins[:2], ins[2], output_final_state=True, backend="triton")
    y_r, f_r = naive_dynamic_conv(*ref_ins[:2], ref_ins[2], output_final_state=True)
    dy = torch.randn_like(y_r)
    g_fast = torch.autograd.grad((y.double() * dy).sum(), ins)
    g_ref = torch.autograd.grad((y_r * dy).sum(), ref_ins)
    res["dynamic_conv"] = {"out": rel(y, y_r), "final_state": rel(f, f_r),
                           **{f"grad_{n}": rel(a, b) for n, a, b in zip(["x", "kernels", "state"], g_fast, g_ref)}}
    return res


def rwkv7_checks(dev) -> dict:
    """RWKV-7's recurrence at the 2B attention shape (12 heads, K = V = 128), RWKV-7's own parametrisation (log decay
    in (-exp(-1/2), 0), a = -kk, b = kk * iclr): fla's chunked kernel with initial and final state, forward and every
    gradient, against the float64 reference; then one decode step from that state through fla's fused recurrent
    kernel and through our in-place step kernel."""
    torch.manual_seed(0)
    B, T, H, K, V = 2, 1000, 12, 128, 128
    res = {}
    r, k = (torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, T, H, V, device=dev, dtype=torch.bfloat16)
    w = -0.6065306597126334 * torch.sigmoid(torch.randn(B, T, H, K, device=dev))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, K, device=dev), dim=-1)
    iclr = torch.sigmoid(torch.randn(B, T, H, K, device=dev))
    a, b = (-kk).bfloat16(), (kk * iclr).bfloat16()
    h0 = torch.randn(B, H, K, V, device=dev) * 0.1
    ins = [t.detach().clone().requires_grad_() for t in (r, w, k, v, a, b, h0)]
    ref_ins = [t.detach().double().requires_grad_() for t in (r, w, k, v, a, b, h0)]
    o, s = chunk_rwkv7(*ins[:6], initial_state=ins[6], output_final_state=True, backend="triton")
    torch.cuda.synchronize()
    log("rwkv7 chunk forward done (first use compiles and autotunes)")
    o_r, s_r = naive_chunk_rwkv7(*ref_ins[:6], initial_state=ref_ins[6], output_final_state=True)
    do, ds = torch.randn_like(o_r), torch.randn_like(s_r)
    g_fast = torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), ins)
    g_ref = torch.autograd.grad((o_r * do).sum() + (s_r * ds).sum(), ref_ins)
    res["rwkv7.chunk"] = {"out": rel(o, o_r), "final_state": rel(s, s_r),
                          **{f"grad_{n}": rel(x, y) for n, x, y in zip(["r", "w", "k", "v", "a", "b", "h0"],
                                                                        g_fast, g_ref)}}
    log("rwkv7.chunk", res["rwkv7.chunk"])
    step = [t[:, :1] for t in (r, w, k, v, a, b)]
    with torch.no_grad():
        o1, s1 = fused_recurrent_rwkv7(*step, initial_state=h0, output_final_state=True, backend="triton")
        o1r, s1r = rwkv7_step(*(t[:, 0].double() for t in step), h0.double())
        state = h0.clone()
        o1k = rwkv7_step_(*(t[:, 0] for t in step), state, backend="triton")
    res["rwkv7.decode_step"] = {"out": rel(o1[:, 0], o1r), "final_state": rel(s1, s1r)}
    res["rwkv7.decode_step_in_place"] = {"out": rel(o1k, o1r), "final_state": rel(state, s1r)}
    log("rwkv7 decode", res["rwkv7.decode_step"], res["rwkv7.decode_step_in_place"])
    return res


def block_checks(dev, types=LAYER_TYPES) -> dict:
    res = {}
    B, T = 2, 1000
    for layer_type in types:
        torch.manual_seed(0)
        fast = build_layer(layer_type, D, **BLOCKS[layer_type], backend="triton")
        with torch.no_grad():  # make the zero-initialised parts count
            for name, p in fast.named_parameters():
                if "kernel_generator.w2.weight" in name or name.endswith("conv1d.bias"):
                    p.normal_(std=0.02)
        fast = fast.to(dev, torch.bfloat16)
        ref = copy.deepcopy(fast).float()
        set_backend(ref, "torch")  # the block and its norms: the PyTorch references
        x = torch.randn(B, T + 4, D, device=dev, dtype=torch.bfloat16)
        xf = x[:, :T].detach().clone().requires_grad_()
        xr = x[:, :T].detach().float().requires_grad_()
        y, state = fast(xf, use_cache=True)
        torch.cuda.synchronize()
        log("block", layer_type, "fast forward done (first use compiles and autotunes)")
        y_r, state_r = ref(xr, use_cache=True)
        dy = torch.randn_like(y_r)
        (y.float() * dy).sum().backward()
        torch.cuda.synchronize()
        log("block", layer_type, "fast backward done")
        (y_r * dy).sum().backward()
        entry = {"out": rel(y, y_r), "grad_input": rel(xf.grad, xr.grad)}
        grads = {n: rel(p.grad, dict(ref.named_parameters())[n].grad)
                 for n, p in fast.named_parameters() if p.grad is not None}
        worst = max(grads, key=grads.get)
        entry.update({"grad_params_max": grads[worst], "grad_params_worst": worst})
        # decode four tokens after the 1000-token prefill
        with torch.no_grad():
            steps = [fast(x[:, T + i : T + i + 1], state)[0] for i in range(4)]
            steps_r = [ref(x[:, T + i : T + i + 1].float(), state_r)[0] for i in range(4)]
        entry["decode"] = max(rel(a, b) for a, b in zip(steps, steps_r))
        res[layer_type] = entry
        log("block", layer_type, entry)
    return res


def block_timings(dev, types=LAYER_TYPES) -> dict:
    """Training step (forward + backward) of each block, B=4, T=2048, bf16: fast path vs reference."""
    res = {}
    B, T = 4, 2048
    x = torch.randn(B, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    for layer_type in types:
        torch.manual_seed(0)
        layer = build_layer(layer_type, D, **BLOCKS[layer_type]).to(dev, torch.bfloat16)
        entry = {}
        for backend in ("triton", "torch"):
            if layer_type in ("attn", "swa") and backend == "torch":
                continue  # SDPA either way
            set_backend(layer, backend)

            def step():
                layer(x)[0].sum().backward()

            ms = sync_time(step, iters=3, warmup=1)
            entry[f"{backend}_ms"] = round(ms, 3)
            entry[f"{backend}_tokens_per_s"] = round(B * T / ms * 1e3)
        if "torch_ms" in entry:
            entry["speedup"] = round(entry["torch_ms"] / entry["triton_ms"], 2)
        res[layer_type] = entry
        log("timing", layer_type, entry)
    return res


def conv_bandwidth(dev) -> dict:
    """Dynamic conv forward: bytes that must move (x, kernels in; y out) over time, against a device copy."""
    B, T, C, W = 8, 4096, 3072, 4
    x = torch.randn(B, T, C, device=dev, dtype=torch.bfloat16)
    kern = torch.randn(B, T, C, W, device=dev, dtype=torch.bfloat16)
    moved = (x.numel() * 2 + kern.numel() * 1) * 2  # x read, y written, kernels read, bf16
    triton_ms = sync_time(lambda: dynamic_conv(x, kern, backend="triton"))
    torch_ms = sync_time(lambda: naive_dynamic_conv(x, kern))
    big = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    copy_ms = sync_time(lambda: big.clone())
    copy_gbs = 2 * big.numel() / copy_ms / 1e6
    return {"shape": [B, T, C, W], "bytes": moved, "triton_ms": round(triton_ms, 3), "torch_ms": round(torch_ms, 3),
            "triton_GBps": round(moved / triton_ms / 1e6), "copy_GBps": round(copy_gbs),
            "fraction_of_copy_bandwidth": round(moved / triton_ms / 1e6 / copy_gbs, 3),
            "speedup_vs_torch": round(torch_ms / triton_ms, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="kernel_check.json")
    parser.add_argument("--sections", default="ops,blocks,timing", help="comma-separated subset of ops,blocks,timing")
    parser.add_argument("--blocks", default=",".join(LAYER_TYPES), help="block types to check and time")
    parser.add_argument("--ops", default=",".join(OPS), help=f"op groups of the ops section, from {','.join(OPS)}")
    parser.add_argument("--autotune-configs", type=int, default=None,
                        help="benchmark at most N autotuning configs per Triton kernel (a fast start on a fresh "
                             "machine, slightly slower kernels: the timings are then lightly tuned)")
    args = parser.parse_args()
    if args.autotune_configs is not None:
        limit_autotuning(args.autotune_configs)
    dev = torch.device("cuda")
    import fla
    import triton

    t0 = time.time()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "fla": fla.__version__, "python": platform.python_version(),
              "tolerances": {"out": OUT_TOL, "grad": GRAD_TOL}}
    sections = args.sections.split(",")
    report.update(ops={}, blocks={}, errors={})
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"unknown op groups {unknown}; known: {', '.join(OPS)}")
    blocks = args.blocks.split(",")
    runs = [("ops", lambda d: op_checks(d, ops)), ("blocks", lambda d: block_checks(d, blocks)),
            ("block_training_step", lambda d: block_timings(d, blocks)), ("dynamic_conv_bandwidth", conv_bandwidth)]
    for key, fn in runs:
        if (key if key in ("ops", "blocks") else "timing") not in sections:
            continue
        try:
            report[key] = fn(dev)
        except Exception as err:  # keep what the other sections measured; the error is part of the result
            report["errors"][key] = f"{type(err).__name__}: {err}"
            log("section", key, "failed:", report["errors"][key][:300])
        with open(args.out, "w") as f:  # after every section, so a cut-off run still returns its numbers
            json.dump(report, f, indent=2)
    failures = []
    for section in ("ops", "blocks"):
        for name, entry in report[section].items():
            for key, value in entry.items():
                if isinstance(value, float):
                    limit = GRAD_TOL if key.startswith("grad") else OUT_TOL
                    if not value < limit:
                        failures.append(f"{section}.{name}.{key}={value:.3g}")
    failures += [f"{k}: {v[:200]}" for k, v in report["errors"].items()]
    report["failures"] = failures
    report["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{'block':<10} {'out':>9} {'grad_in':>9} {'grad_par':>9} {'decode':>9} {'fast tok/s':>11} {'ref tok/s':>10}")
    for name, e in report["blocks"].items():
        t = report.get("block_training_step", {}).get(name, {})
        print(f"{name:<10} {e['out']:>9.2e} {e['grad_input']:>9.2e} {e['grad_params_max']:>9.2e} {e['decode']:>9.2e} "
              f"{t.get('triton_tokens_per_s', ''):>11} {t.get('torch_tokens_per_s', ''):>10}")
    for name, e in report["ops"].items():
        print(f"op {name:<28} " + " ".join(f"{k}={v:.1e}" for k, v in e.items()))
    if "dynamic_conv_bandwidth" in report:
        print("dynamic conv:", report["dynamic_conv_bandwidth"])
    print(json.dumps({"device": report["device"], "failures": failures, "passed": not failures}))


if __name__ == "__main__":
    main()
