"""`jetnas bench`: prefill and decode throughput of a model against the memory-bandwidth roofline."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from jetnas.commands.models import _device, _dtype, load_model_and_tokenizer


def _is_oom(err: Exception) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError "... can't allocate memory ..."
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _measure_engine(net, batch: int, context: int, new_tokens: int, chunk: int | None, halve: bool,
                    device: torch.device) -> tuple[dict, int]:
    """The replicated-prompt measurement at `batch`; with `halve`, a run that runs out of memory is retried at half
    the batch. Returns the measurement and how many times the batch was halved."""
    from jetnas.bench import measure

    halvings = 0
    while True:
        try:
            return measure.replicated_decode_throughput(net, batch, context, new_tokens=new_tokens,
                                                        chunk_size=chunk, prefill_repeats=2), halvings
        except RuntimeError as err:
            if not (halve and batch > 1 and _is_oom(err)):
                raise
        # outside the except block, where the failed run's tensors (held by the traceback) are released
        if device.type == "cuda":
            torch.cuda.empty_cache()
        batch //= 2
        halvings += 1


HF_BATCH_CAP = 64  # transformers prefills every row at once: its activations, not its cache, run out first


def _measure_hf(source, batch: int, context: int, new_tokens: int, device: torch.device) -> dict:
    """transformers generate() at `batch` rows (at most the engine's, capped), halved while it runs out of memory:
    each system at the largest batch it runs, as the paper compares them."""
    from jetnas.bench.measure import hf_generate_throughput

    while True:
        try:
            return {**hf_generate_throughput(source, batch, context, new_tokens=new_tokens), "batch_size": batch}
        except RuntimeError as err:
            if not (batch > 1 and _is_oom(err)):
                raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        batch //= 2


def _figure(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=130)
    for system in sorted({r["system"] for r in rows}):
        mine = [r for r in rows if r["system"] == system]
        ctx = [r["context_length"] for r in mine]
        axes[0].plot(ctx, [r["decode_tokens_per_s"] for r in mine], marker="o", label=system)
        axes[1].plot(ctx, [r["prefill_tokens_per_s"] for r in mine], marker="o", label=system)
        for r in mine:
            if r.get("roofline_tokens_per_s"):
                axes[0].scatter([r["context_length"]], [r["roofline_tokens_per_s"]], marker="_", s=200, color="gray")
            if r.get("roofline_rw_tokens_per_s"):
                axes[0].scatter([r["context_length"]], [r["roofline_rw_tokens_per_s"]], marker="_", s=200,
                                color="black")
    for ax, name in zip(axes, ("decode", "prefill")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"{name} tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("decode (rooflines of the engine's batch: gray reads, black reads + writes)", fontsize=9)
    axes[1].set_title("prefill", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bench(model: str, context: str = "4096,16384,65536", batch: str = "auto", batch_cap: int | None = None,
          chunk: str = "auto", new_tokens: int = 32, baseline: str | None = None, out_dir: str | None = None,
          device: str | None = None, dtype: str = "auto") -> dict:
    """Measure prefill and decode throughput at each context length, against the memory-bandwidth roofline.

    The protocol of benchmarks/engine_h100.py ("replicated-prompt"): one prompt is prefilled once and its cache
    copied into every row of the batch (`Engine.generate_replicated`), then the batch decodes; prefill tokens/s is
    that one prompt's (after a warm-up run; the median of three timed passes). A decode step reads every row's
    cache whatever it holds, so this costs what a batch of different prompts costs.

    Args:
        model: a model directory, a preset (random weights: jet-nemotron-2b, jet-nemotron-4b) or a teacher name.
        context: comma-separated prompt lengths.
        batch: sequences decoded together: a number, or auto (`jetnas.bench.measure.largest_batch`: the largest whose
            cache and logits fit in 85% of the free memory, GPU memory on CUDA, available system memory on CPU,
            predicted from the model's cost accounting, a multiple of 8 from 8 up; halved while it still runs out
            of memory).
        batch_cap: the largest batch auto picks; default 1024 on GPU, 8 on CPU (where memory is plentiful and
            compute is not: a larger batch would only make the run long).
        chunk: prompt tokens per prefill pass: a number, none (the whole prompt), or auto (8192 on GPU, 1024 on CPU).
        new_tokens: tokens decoded per measurement (the first comes from the prefill and is not counted).
        baseline: hf: also run transformers generate() (dynamic cache), prefilling every row, at the engine's
            batch capped at 64 and halved while it runs out of memory (each system at the batch it can run).
        out_dir: where bench.json and bench.png go (default runs/bench-<time>).
        device: cpu, cuda, ...; default cuda when available.
        dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.
    """
    from jetnas.bench.costs import copy_bandwidth, decode_cost
    from jetnas.bench.measure import largest_batch
    from jetnas.engine import as_jetnas

    if baseline not in (None, "hf"):
        raise ValueError(f"--baseline must be hf or unset, got {baseline!r}")
    try:
        contexts = [int(c) for c in context.split(",") if c]
    except ValueError as err:
        raise ValueError(f"--context must be comma-separated integers, got {context!r}") from err
    if not contexts or min(contexts) < 1:
        raise ValueError(f"--context needs lengths >= 1, got {context!r}")
    if batch != "auto" and not (batch.isdigit() and int(batch) >= 1):
        raise ValueError(f"--batch must be a positive integer or auto, got {batch!r}")
    if batch_cap is not None and batch_cap < 1:
        raise ValueError(f"--batch-cap must be >= 1, got {batch_cap}")
    if chunk not in ("auto", "none") and not (chunk.isdigit() and int(chunk) >= 1):
        raise ValueError(f"--chunk must be a positive integer, none or auto, got {chunk!r}")
    dev_name = _device(device)
    dev = torch.device(dev_name)
    source, _ = load_model_and_tokenizer(model, None, dev_name, _dtype(dtype, dev_name))
    net = as_jetnas(source)
    out = Path(out_dir or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth(dev, nbytes=(1 << 30) if dev.type == "cuda" else (1 << 27))
    print(f"jetnas bench: {model} on {dev_name}, copy bandwidth {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)
    rows = []
    for ctx in contexts:
        chunk_size = None if chunk == "none" else (min(ctx, 8192 if dev.type == "cuda" else 1024) if chunk == "auto"
                                                   else int(chunk))
        predicted = None
        if batch == "auto":
            if dev.type == "cuda":
                # blocks cached by the allocator are not free to mem_get_info
                torch.cuda.empty_cache()
            try:
                cap = batch_cap or (1024 if dev.type == "cuda" else 8)
                predicted = largest_batch(net, ctx, new_tokens, dev, cap=cap)
            except ValueError as err:
                raise ValueError(f"--batch auto: {err}") from err
        r, halved = _measure_engine(net, predicted or int(batch), ctx, new_tokens, chunk_size, predicted is not None,
                                    dev)
        b = r["batch_size"]
        cost = decode_cost(net, b, ctx + new_tokens // 2)
        step_seconds = b / r["decode_tokens_per_s"]
        row = {"system": "jetnas engine", "model": model, **r, "batch_predicted": predicted, "batch_halved": halved,
               "weight_bytes": cost.weight_bytes, "bytes_per_step": cost.bytes_per_step,
               "flops_per_token": cost.flops_per_token,
               "achieved_bandwidth": cost.bytes_per_step / step_seconds,
               "roofline_tokens_per_s": cost.roofline_tokens_per_s(bandwidth),
               "bytes_moved_per_step": cost.bytes_moved_per_step,
               "achieved_bandwidth_rw": cost.bytes_moved_per_step / step_seconds,
               "roofline_rw_tokens_per_s": cost.roofline_rw_tokens_per_s(bandwidth)}
        row["roofline_fraction"] = r["decode_tokens_per_s"] / row["roofline_tokens_per_s"]
        row["roofline_rw_fraction"] = r["decode_tokens_per_s"] / row["roofline_rw_tokens_per_s"]
        rows.append(row)
        how = "" if predicted is None else f" (predicted {predicted}" + (
            f", halved {halved}x after running out of memory)" if halved else ")")
        print(f"  context {ctx}: batch {b}{how}, chunk {chunk_size}, decode {r['decode_tokens_per_s']:.1f} tok/s "
              f"({100 * row['roofline_fraction']:.1f}% of the reads roofline, "
              f"{100 * row['roofline_rw_fraction']:.1f}% with writes), prefill {r['prefill_tokens_per_s']:.0f} tok/s",
              file=sys.stderr)
        if baseline == "hf":
            h = _measure_hf(source, min(b, HF_BATCH_CAP), ctx, new_tokens, dev)
            rows.append({"system": "transformers generate", "model": model, "protocol": "generate",
                         "prefill_batch_size": h["batch_size"], **h,
                         "speedup_decode": r["decode_tokens_per_s"] / h["decode_tokens_per_s"],
                         "speedup_prefill": r["prefill_tokens_per_s"] / h["prefill_tokens_per_s"]})
            print(f"  context {ctx}: transformers generate at batch {h['batch_size']}: decode "
                  f"{h['decode_tokens_per_s']:.1f} tok/s "
                  f"(engine {rows[-1]['speedup_decode']:.2f}x)", file=sys.stderr)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    report = {"model": model, "device": device_name, "dtype": str(next(net.parameters()).dtype),
              "protocol": "replicated-prompt", "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    _figure(rows, out / "bench.png", f"{model} on {device_name}")
    last = [r for r in rows if r["system"] == "jetnas engine"][-1]
    keys = ("protocol", "context_length", "batch_size", "batch_predicted", "batch_halved", "decode_tokens_per_s",
            "prefill_tokens_per_s", "cache_bytes_per_sequence", "peak_memory_bytes", "roofline_fraction",
            "roofline_rw_fraction")
    summary = {k: last[k] for k in keys}
    if baseline == "hf":
        summary["speedup_decode_vs_hf"] = rows[-1]["speedup_decode"]
    return {"model": model, "device": device_name, "out_dir": str(out), "summary": summary,
            "outputs": {"json": str(out / "bench.json"), "figure": str(out / "bench.png")}}
