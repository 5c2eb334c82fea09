"""Throughput of one model as a run: prefill and decode tokens/s at each context length through the engine, against
the memory-bandwidth roofline, optionally with transformers `generate()` as the baseline (bench.json, bench.png).

The protocol of benchmarks/engine_h100.py ("replicated-prompt"): one prompt is prefilled once and its cache copied
into every row of the batch (`Engine.generate_replicated`), then the batch decodes; prefill tokens/s is that one
prompt's (after a warm-up run; the median of three timed passes). A decode step reads every row's cache whatever it
holds, so this costs what a batch of different prompts costs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jetnas.runner.models import load_model, resolve_device, resolve_dtype
from jetnas.runner.recipes import BenchRecipe
from jetnas.runner.results import BenchResult

HF_BATCH_CAP = 64  # transformers prefills every row at once: its activations, not its cache, run out first


def _figure(rows: list[dict], path: Path, title: str) -> None:
    """Decode and prefill tokens/s against context, one line per system, the decode rooflines as marks; with one
    context length a line would be a lone point, so bars (one per system) stand in and the title says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = sorted({r["system"] for r in rows})
    contexts = sorted({r["context_length"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=130)
    for ax, (name, key) in zip(axes, (("decode", "decode_tokens_per_s"), ("prefill", "prefill_tokens_per_s"))):
        if len(contexts) == 1:
            values = [next(r[key] for r in rows if r["system"] == s) for s in systems]
            ax.bar(range(len(systems)), values, color=[f"C{i}" for i in range(len(systems))])
            ax.set_xticks(range(len(systems)), systems, fontsize=9)
            ax.set_ylabel(f"{name} tokens/s at {contexts[0]:,} tokens")
        else:
            for i, system in enumerate(systems):
                mine = [r for r in rows if r["system"] == system]
                ax.plot([r["context_length"] for r in mine], [r[key] for r in mine], marker="o", label=system,
                        color=f"C{i}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(f"{name} tokens/s")
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    engine = [r for r in rows if r["system"] == "jetnas engine"]
    x_of = (lambda r: systems.index("jetnas engine")) if len(contexts) == 1 else (lambda r: r["context_length"])
    for r in engine:
        for key, color in (("roofline_tokens_per_s", "gray"), ("roofline_rw_tokens_per_s", "black")):
            if r.get(key):
                axes[0].scatter([x_of(r)], [r[key]], marker="_", s=300, color=color)
    one = "; one context length measured: bars, not lines" if len(contexts) == 1 else ""
    axes[0].set_title("decode (roofline marks: gray reads, black reads + writes)", fontsize=9)
    axes[1].set_title("prefill", fontsize=9)
    fig.suptitle(f"{title}{one}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_bench(recipe: BenchRecipe) -> BenchResult:
    """Measure `recipe.model` at every context of the recipe; writes bench.json and bench.png under out_dir."""
    import torch

    from jetnas.bench import measure
    from jetnas.bench.costs import copy_bandwidth, decode_cost
    from jetnas.engine import as_jetnas
    from jetnas.files import write_json_atomic

    r = recipe
    dev_name = resolve_device(r.device)
    dev = torch.device(dev_name)
    # token ids are random: no tokenizer is loaded, so a preset needs neither one nor the network
    source = load_model(r.model, dev_name, resolve_dtype(r.dtype, dev_name))
    net = as_jetnas(source)
    out = Path(r.out_dir or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth(dev, nbytes=(1 << 30) if dev.type == "cuda" else (1 << 27))
    print(f"jetnas bench: {r.model} on {dev_name}, copy bandwidth {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)
    rows = []
    for ctx in r.context:
        # auto: on a GPU the largest chunk predicted to fit next to the cache (`bench.measure.auto_chunk_size`, up
        # to the whole prompt: fewer, fuller passes); on CPU 1,024 tokens (its free memory is not known)
        chunk_size = None if r.chunk == "none" else int(r.chunk) if r.chunk != "auto" else (
            "auto" if dev.type == "cuda" else min(ctx, 1024))
        predicted = None
        if r.batch == "auto":
            if dev.type == "cuda":
                # blocks cached by the allocator are not free to mem_get_info
                torch.cuda.empty_cache()
            try:
                cap = r.batch_cap or (1024 if dev.type == "cuda" else 8)
                predicted = measure.largest_batch(net, ctx, r.new_tokens, dev, cap=cap)
            except ValueError as err:
                raise ValueError(f"--batch auto: {err}") from err

        def engine_at(batch: int, ctx=ctx, chunk_size=chunk_size) -> dict:
            return measure.replicated_decode_throughput(net, batch, ctx, new_tokens=r.new_tokens,
                                                        chunk_size=chunk_size, prefill_repeats=2)

        # a predicted batch that still runs out of memory is halved; a batch the user chose is not
        m, halved = measure.halving_on_oom(engine_at, predicted or int(r.batch), dev, halve=predicted is not None)
        b = m["batch_size"]
        cost = decode_cost(net, b, ctx + r.new_tokens // 2)
        step_seconds = b / m["decode_tokens_per_s"]
        row = {"system": "jetnas engine", "model": r.model, **m, "batch_predicted": predicted, "batch_halved": halved,
               "weight_bytes": cost.weight_bytes, "bytes_per_step": cost.bytes_per_step,
               "flops_per_token": cost.flops_per_token,
               "achieved_bandwidth": cost.bytes_per_step / step_seconds,
               "roofline_tokens_per_s": cost.roofline_tokens_per_s(bandwidth),
               "bytes_moved_per_step": cost.bytes_moved_per_step,
               "achieved_bandwidth_rw": cost.bytes_moved_per_step / step_seconds,
               "roofline_rw_tokens_per_s": cost.roofline_rw_tokens_per_s(bandwidth)}
        row["roofline_fraction"] = m["decode_tokens_per_s"] / row["roofline_tokens_per_s"]
        row["roofline_rw_fraction"] = m["decode_tokens_per_s"] / row["roofline_rw_tokens_per_s"]
        rows.append(row)
        how = "" if predicted is None else f" (predicted {predicted}" + (
            f", halved {halved}x after running out of memory)" if halved else ")")
        print(f"  context {ctx}: batch {b}{how}, chunk {chunk_size}, decode {m['decode_tokens_per_s']:.1f} tok/s "
              f"({100 * row['roofline_fraction']:.1f}% of the reads roofline, "
              f"{100 * row['roofline_rw_fraction']:.1f}% with writes), prefill {m['prefill_tokens_per_s']:.0f} tok/s",
              file=sys.stderr)
        if r.baseline == "hf":
            # transformers at the engine's batch (capped), halved while it runs out of memory: each system at the
            # largest batch it runs, as the paper compares them
            def hf_at(batch: int, ctx=ctx) -> dict:
                return {**measure.hf_generate_throughput(source, batch, ctx, new_tokens=r.new_tokens),
                        "batch_size": batch}

            h, _ = measure.halving_on_oom(hf_at, min(b, HF_BATCH_CAP), dev)
            rows.append({"system": "transformers generate", "model": r.model, "protocol": "generate",
                         "prefill_batch_size": h["batch_size"], **h,
                         "speedup_decode": m["decode_tokens_per_s"] / h["decode_tokens_per_s"],
                         "speedup_prefill": m["prefill_tokens_per_s"] / h["prefill_tokens_per_s"]})
            print(f"  context {ctx}: transformers generate at batch {h['batch_size']}: decode "
                  f"{h['decode_tokens_per_s']:.1f} tok/s "
                  f"(engine {rows[-1]['speedup_decode']:.2f}x)", file=sys.stderr)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    write_json_atomic(out / "bench.json", {
        "model": r.model, "device": device_name, "dtype": str(next(net.parameters()).dtype),
        "protocol": "replicated-prompt", "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows})
    _figure(rows, out / "bench.png", f"{r.model} on {device_name}")
    last = [row for row in rows if row["system"] == "jetnas engine"][-1]
    keys = ("protocol", "context_length", "batch_size", "batch_predicted", "batch_halved", "decode_tokens_per_s",
            "prefill_tokens_per_s", "cache_bytes_per_sequence", "peak_memory_bytes", "roofline_fraction",
            "roofline_rw_fraction")
    summary = {k: last[k] for k in keys}
    if r.baseline == "hf":
        summary["speedup_decode_vs_hf"] = rows[-1]["speedup_decode"]
    return BenchResult(model=r.model, device=device_name, out_dir=str(out), summary=summary,
                       outputs={"json": str(out / "bench.json"), "figure": str(out / "bench.png")})
