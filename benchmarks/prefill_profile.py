"""Where a long prefill's time goes: the Jet-Nemotron-2B architecture (random weights, bf16) prefilling one prompt
in the engine, timed at several chunk sizes, then one run under the PyTorch profiler with the GPU time summed by
kernel and by kind of kernel (GEMMs, attention, fla's linear-attention kernels, our dynamic conv, the rest).
Each chunk size is timed under three backends of the same weights, switched explicitly on the built model
(`jetnas.modules.backend.set_backend`): the fused norm / SwiGLU kernels (`jetnas.ops.fused`) off (`unfused`) and
on (`fused`), both with the static short convolutions on `F.conv1d`, after a check that both give the same
last-position logits (bf16: relative error ~1e-2 expected, from one-step roundings); and a model with static short
convolutions (GDN, DeltaNet, Mamba2) also fused with those convs on their Triton kernel (`fused_conv_kernel`,
`Backend.static_conv`, the default) instead of `F.conv1d` (`static_conv_kernel_speedup`), after the same logits
check. The profile runs under the default backend (`resolve_backend("auto")`, recorded).

    python benchmarks/prefill_profile.py --out $OUT/prefill_profile.json [--context 65536 --chunks 8192,16384,32768,65536]
    [--autotune-configs 4]   (a fast start on a fresh machine; the timings are then lightly tuned)

Bound: the matrix products of the weights take 2 x (non-embedding parameters) FLOPs per token; `gemm_bound_tok_s`
is what the measured bf16 GEMM rate of this GPU (an 8192^3 product) allows for them alone. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

import jetnas  # noqa: F401
from jetnas.bench.costs import matmul_rate
from jetnas.engine import Engine
from jetnas.models import JetNemotronConfig, JetNemotronForCausalLM
from jetnas.models.presets import preset_config
from jetnas.modules.backend import set_backend
from jetnas.modules.conv import ShortConvolution
from jetnas.ops.autotune import limit_autotuning
from jetnas.ops.backend import Backend, resolve_backend

DEV = torch.device("cuda")
# the backends compared, on the same weights: fused norms / SwiGLU off and on (static convs on F.conv1d), and on
# with the static convs' Triton kernel
UNFUSED = Backend("triton", fused=False, static_conv=False)
FUSED = Backend("triton", fused=True, static_conv=False)
FUSED_CONV_KERNEL = Backend("triton", fused=True, static_conv=True)
KINDS = [  # first match wins
    ("attention (SDPA)", r"flash|fmha|attention|sdpa|efficient"),
    ("fla linear attention", r"chunk|recurrent|fwd_h|bwd|wy|solve_tril|l2norm|kkt|cumsum|gated_delta"),
    ("dynamic conv (ours)", r"dynamic_conv|_conv_fwd|conv"),
    ("GEMM", r"gemm|nvjet|cutlass|sm90|xmma|matmul|cublas"),
    ("norms / activations / copies", r"elementwise|vectorized|reduce|norm|copy|cat|index|silu|sigmoid|softplus"),
]


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def kind(name: str) -> str:
    low = name.lower()
    for label, pattern in KINDS:
        if re.search(pattern, low):
            return label
    return "other"


def model_config(model: str, max_positions: int, block_types: str | None = None) -> JetNemotronConfig:
    """A preset's config, or the config.json of a model directory (or the file itself)."""
    path = Path(model)
    if path.suffix == ".json" or path.is_dir():
        config = JetNemotronConfig.from_pretrained(path.parent if path.suffix == ".json" else path)
        config.max_position_embeddings = max(config.max_position_embeddings, max_positions)
    else:
        config = preset_config(model, max_position_embeddings=max_positions)
    if block_types:
        config.block_types = [block_types] * config.num_hidden_layers
    return config


def timed_prefill(engine: Engine, prompt: torch.Tensor, repeats: int = 2) -> float:
    mask = torch.ones_like(prompt)
    best = float("inf")
    for _ in range(repeats):
        cache = engine.cache_for(1, prompt.shape[1])
        cache.reset()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            engine.prefill(prompt, mask, cache)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def last_logits(engine: Engine, prompt: torch.Tensor) -> torch.Tensor:
    cache = engine.cache_for(1, prompt.shape[1])
    cache.reset()
    return engine.prefill(prompt, torch.ones_like(prompt), cache).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--chunks", default="8192,16384,32768,65536")
    ap.add_argument("--profile-chunk", type=int, default=32768)
    ap.add_argument("--model", default="jet-nemotron-2b",
                    help="a preset, or a jetnas model directory / config.json (its architecture, random weights)")
    ap.add_argument("--block-types", default=None,
                    help="one layer type for every layer instead of the model's (e.g. attn: the all-attention model "
                         "of the same shape, a converted model's teacher)")
    ap.add_argument("--autotune-configs", type=int, default=None,
                    help="benchmark at most N autotuning configs per Triton kernel (a fast start on a fresh machine; "
                         "the timings are then lightly tuned)")
    args = ap.parse_args()
    if args.autotune_configs is not None:
        limit_autotuning(args.autotune_configs)
    args.chunks_list = [int(c) for c in args.chunks.split(",")]
    torch.manual_seed(0)
    with torch.device(DEV):
        model = JetNemotronForCausalLM(model_config(args.model, args.context + 64, args.block_types))
    model = model.to(torch.bfloat16).eval()
    n_embed = model.model.embed_tokens.weight.numel()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        n_embed += model.lm_head.weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - n_embed
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
              "block_types": args.block_types or "as the model's",
              "context": args.context, "non_embedding_params": non_embedding, "chunks": {}}
    tflops = matmul_rate(DEV) / 1e12
    report["gemm_TFLOPs"] = tflops
    report["gemm_bound_tok_s"] = tflops * 1e12 / (2 * non_embedding)
    log(f"GEMM {tflops:.0f} TFLOP/s -> weights-only bound {report['gemm_bound_tok_s']:.0f} tok/s")
    prompt = torch.randint(1, model.config.vocab_size, (1, args.context), device=DEV)
    # correctness of the fused kernels first: the same prefill's last logits with and without them
    engine = Engine(model, chunk_size=min(args.chunks_list[0], args.context))
    short = prompt[:, :8192]
    set_backend(model, UNFUSED)
    want = last_logits(engine, short)
    try:
        set_backend(model, FUSED)
        got = last_logits(engine, short)
        report["fused_vs_unfused_last_logits_rel_err"] = ((got - want).norm() / want.norm()).item()
    except Exception as err:  # noqa: BLE001  (the unfused timings are still worth having)
        report["fused_error"] = repr(err)[:2000]
        report["fused_vs_unfused_last_logits_rel_err"] = float("nan")
    log("fused vs unfused logits, rel err", report["fused_vs_unfused_last_logits_rel_err"], report.get("fused_error"))
    has_static_conv = any(isinstance(m, ShortConvolution) for m in model.modules())
    if has_static_conv:  # the static convs' Triton kernel against F.conv1d, the rest fused in both
        try:
            set_backend(model, FUSED)
            want = last_logits(engine, short)
            set_backend(model, FUSED_CONV_KERNEL)
            got = last_logits(engine, short)
            report["static_conv_kernel_vs_conv1d_last_logits_rel_err"] = ((got - want).norm() / want.norm()).item()
        except Exception as err:  # noqa: BLE001  (its first GPU run: the other timings are still worth having)
            report["static_conv_error"] = repr(err)[:2000]
            report["static_conv_kernel_vs_conv1d_last_logits_rel_err"] = float("nan")
        log("static conv kernel vs F.conv1d, rel err", report["static_conv_kernel_vs_conv1d_last_logits_rel_err"],
            report.get("static_conv_error"))
    for chunk in args.chunks_list:
        engine = Engine(model, chunk_size=min(chunk, args.context))
        entry = report["chunks"][chunk] = {}
        for fused in (False,) if "fused_error" in report else (False, True):
            key = "fused" if fused else "unfused"
            try:
                set_backend(model, FUSED if fused else UNFUSED)
                timed_prefill(engine, prompt[:, : 2 * engine.chunk_size], repeats=1)  # compile / autotune
                seconds = timed_prefill(engine, prompt)
                entry[key] = {"seconds": seconds, "tokens_per_s": args.context / seconds,
                              "peak_GB": torch.cuda.max_memory_allocated() / 1e9}
            except Exception as err:  # noqa: BLE001  (out of memory, or a kernel that failed: recorded)
                entry[key] = {"error": repr(err)[:300]}
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if "seconds" in entry.get("fused", {}) and "seconds" in entry.get("unfused", {}):
            entry["speedup"] = entry["unfused"]["seconds"] / entry["fused"]["seconds"]
        if has_static_conv and "seconds" in entry.get("fused", {}) and "static_conv_error" not in report:
            # the same with the static short convs' Triton kernel instead of F.conv1d (jetnas.ops.conv)
            set_backend(model, FUSED_CONV_KERNEL)
            seconds = timed_prefill(engine, prompt)
            entry["fused_conv_kernel"] = {"seconds": seconds, "tokens_per_s": args.context / seconds}
            entry["static_conv_kernel_speedup"] = entry["fused"]["seconds"] / seconds
        log("chunk", chunk, entry)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    # the default backend, unless its static conv kernel failed above
    default = FUSED if "static_conv_error" in report else resolve_backend("auto")
    report["profile_backend"] = repr(set_backend(model, default))
    engine = Engine(model, chunk_size=min(args.profile_chunk, args.context))
    timed_prefill(engine, prompt, repeats=1)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_prefill(engine, prompt, repeats=1)
    by_kernel: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_kernel[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(by_kernel.values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, us in by_kernel.items():
        by_kind[kind(name)] += us
    report["profile"] = {
        "chunk": engine.chunk_size, "gpu_ms": total / 1e3,
        "by_kind": {k: {"ms": v / 1e3, "share": v / total} for k, v in sorted(by_kind.items(), key=lambda x: -x[1])},
        "top_kernels": [{"name": n[:160], "ms": v / 1e3, "share": v / total, "kind": kind(n)}
                        for n, v in sorted(by_kernel.items(), key=lambda x: -x[1])[:25]],
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'kind':<32} {'ms':>8} {'share':>6}")
    for k, v in report["profile"]["by_kind"].items():
        print(f"{k:<32} {v['ms']:>8.1f} {100 * v['share']:>5.1f}%")
    for row in report["profile"]["top_kernels"][:12]:
        print(f"{row['ms']:>8.1f} ms {100 * row['share']:>5.1f}%  {row['name'][:90]}")
    print(f"{'chunk':>6} {'unfused tok/s':>14} {'fused tok/s':>12} {'speed-up':>9} {'conv kernel':>12} {'conv x':>7}")
    for c, v in report["chunks"].items():
        print(f"{c:>6} {v.get('unfused', {}).get('tokens_per_s', 0):>14.0f} {v.get('fused', {}).get('tokens_per_s', 0):>12.0f} "
              f"{v.get('speedup', float('nan')):>9.3f} {v.get('fused_conv_kernel', {}).get('tokens_per_s', 0):>12.0f} "
              f"{v.get('static_conv_kernel_speedup', float('nan')):>7.3f}")
    print(json.dumps({"chunks": {c: {k: round(v[k]["tokens_per_s"]) for k in ("unfused", "fused", "fused_conv_kernel")
                                     if "tokens_per_s" in v.get(k, {})} for c, v in report["chunks"].items()},
                      "fused_vs_unfused_rel_err": report["fused_vs_unfused_last_logits_rel_err"],
                      "gemm_bound_tok_s": round(report["gemm_bound_tok_s"])}))


if __name__ == "__main__":
    main()
