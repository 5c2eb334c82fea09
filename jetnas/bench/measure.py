"""Timed prefill and decode of random prompts through the engine (and through `generate()` as a baseline), and the
rules of the throughput benchmarks: the largest batch predicted to fit (`largest_batch`), halving a batch that runs
out of memory anyway (`halving_on_oom`), and the largest prefill chunk predicted to fit (`auto_chunk_size`, what
`chunk_size="auto"` means).

Prefill mode (`prefill`): None picks the "static" prefill on a GPU (chunk passes captured in CUDA graphs,
`jetnas.engine.prefill`) and the "forward" prefill (the model's own forward per chunk) on CPU. On an H200
(2026-12-06, `benchmarks/results/2026-12-06_h200_prefill/`) the captured passes gave bit-identical last logits to
the forward prefill for every block type (bf16 and float32) and for the SmolLM2-135M hybrid and teacher at 8K and
32K, and were 4.0x (hybrid) and 2.3x (teacher) faster at 8K, where Python's launches bound the forward prefill.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # CPU: the process's peak resident set (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _random_prompts(model, batch_size: int, context_length: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch_size, context_length), generator=g).to(device)


def prefill_mode(device, prefill: str | None = None) -> str:
    """The engine's prefill mode for a measurement on `device`: `prefill` when given, else "static" on CUDA and
    "forward" elsewhere (see the module docstring)."""
    if prefill is not None:
        return prefill
    return "static" if torch.device(device).type == "cuda" else "forward"


def make_engine(model, context_length: int, batch_size: int, chunk_size, prefill, reserved_rows: int):
    """The engine of a measurement: `Engine(model, chunk_size, prefill=prefill_mode(device, prefill))`, with an
    "auto" chunk resolved by `auto_chunk_size` next to the cache of `reserved_rows` rows (not allocated yet)."""
    from jetnas.engine import Engine, as_jetnas

    model = as_jetnas(model)
    device = next(model.parameters()).device
    if chunk_size == "auto":
        dtype = next(model.parameters()).dtype
        if device.type == "cuda":
            torch.cuda.empty_cache()  # blocks cached by the allocator are not free to mem_get_info
        chunk_size = auto_chunk_size(model, context_length, batch_size, device,
                                     reserved_bytes=reserved_rows * model.cache_bytes(context_length, dtype=dtype))
    elif chunk_size is not None and (isinstance(chunk_size, str) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, None or 'auto', got {chunk_size!r}")
    return Engine(model, chunk_size=chunk_size, prefill=prefill_mode(device, prefill))


def decode_throughput(model, batch_size: int, context_length: int, new_tokens: int = 32,
                      chunk_size: int | str | None = None, device=None, warmup: bool = True, seed: int = 0,
                      prefill: str | None = None) -> dict:
    """Prefill `batch_size` random prompts of `context_length` tokens, then decode `new_tokens` greedily (no early
    stop) with the engine. A short warm-up run (same shapes, 2 tokens) comes first so kernel compilation and
    autotuning (and a static prefill's capture) are not timed. `chunk_size`: tokens per prefill pass, None (one
    pass) or "auto" (`auto_chunk_size`, next to the batch's cache); `prefill`: see the module docstring.

    Returns `decode_tokens_per_s` (batch * decoded tokens after the first / decode time), `prefill_tokens_per_s`,
    `cache_bytes_per_sequence` (allocated cache / batch at the end), `peak_memory_bytes`, the timings and shapes,
    the chunk size used and the prefill mode.
    """
    engine = make_engine(model, context_length, batch_size, chunk_size, prefill, reserved_rows=batch_size)
    dev = engine.device if device is None else torch.device(device)
    ids = _random_prompts(engine.model, batch_size, context_length, dev, seed)
    if warmup:
        engine.generate(ids, max_new_tokens=2)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    out = engine.generate(ids, max_new_tokens=new_tokens)
    decoded = batch_size * (out.new_tokens - 1)
    return {
        "batch_size": batch_size, "context_length": context_length, "new_tokens": out.new_tokens,
        "chunk_size": engine.chunk_size, "chunk_rule": "auto" if chunk_size == "auto" else "given",
        "prefill_mode": engine.prefill_mode,
        "prefill_seconds": out.prefill_seconds, "decode_seconds": out.decode_seconds,
        "prefill_tokens_per_s": batch_size * context_length / out.prefill_seconds,
        "decode_tokens_per_s": decoded / out.decode_seconds if decoded else float("nan"),
        "cache_bytes_per_sequence": out.cache_bytes // batch_size,
        "peak_memory_bytes": _peak_memory(dev),
    }


@torch.inference_mode()
def prefill_throughput(model, context_length: int, batch_size: int = 1, chunk_size: int | str | None = "auto",
                       prefill: str | None = None, repeats: int = 3, seed: int = 0,
                       return_logits: bool = False) -> dict:
    """Prefill of `batch_size` random prompts of `context_length` tokens through the engine, what the benchmarks
    time as prefill: one untimed run first (kernels compile and autotune; a static prefill warms up and captures
    its passes), then `repeats` timed runs into the engine's cache (reset each time); the median counts.

    `chunk_size`: tokens per pass, None (one pass) or "auto" (default, `auto_chunk_size` next to the cache);
    `prefill`: see the module docstring.

    Returns `prefill_tokens_per_s` (batch * context / median seconds), `prefill_seconds` and every run's,
    the chunk size and rule, the prefill mode, `peak_memory_bytes` over the timed runs, and with `return_logits`
    the last run's last-position logits (`last_logits`, a tensor).
    """
    from jetnas.engine.engine import _sync

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    engine = make_engine(model, context_length, batch_size, chunk_size, prefill, reserved_rows=batch_size)
    dev = engine.device
    ids = _random_prompts(engine.model, batch_size, context_length, dev, seed)
    if engine.prefill_mode == "static":
        engine.prefiller_for(engine.cache_for(batch_size, context_length), ids)  # untimed: warm-up pass, capture
    else:
        engine.prefill(ids)  # untimed: kernels compile and autotune
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    runs = []
    for _ in range(repeats):
        _sync(dev)
        start = time.perf_counter()
        logits = engine.prefill(ids)
        _sync(dev)
        runs.append(time.perf_counter() - start)
    seconds = statistics.median(runs)
    out = {"batch_size": batch_size, "context_length": context_length, "chunk_size": engine.chunk_size,
           "chunk_rule": "auto" if chunk_size == "auto" else "given", "prefill_mode": engine.prefill_mode,
           "prefill_seconds": seconds, "prefill_seconds_runs": runs,
           "prefill_tokens_per_s": batch_size * context_length / seconds,
           "cache_bytes": engine.cache.nbytes(), "peak_memory_bytes": _peak_memory(dev)}
    if return_logits:
        out["last_logits"] = logits
    return out


def free_memory(device) -> int | None:
    """Bytes that can still be allocated on `device`: `torch.cuda.mem_get_info` on CUDA; on CPU the available
    system memory (psutil when installed, else `MemAvailable` of /proc/meminfo); None when it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in KiB
    except OSError:
        pass
    return None


def _device_and_free(model, device, free_bytes: int | None, what: str):
    """The device a memory rule reads (default the model's) and its free bytes (`free_bytes` when given); a
    `ValueError` naming `what` to give explicitly when the free memory is unknown."""
    if device is None:
        device = next(model.parameters()).device
    if free_bytes is None:
        free_bytes = free_memory(device)
        if free_bytes is None:
            raise ValueError(f"the free memory of device {device} is unknown: give the {what} explicitly")
    return device, free_bytes


def largest_batch(model, context_length: int, new_tokens: int, device=None, cap: int = 1024, fraction: float = 0.85,
                  free_bytes: int | None = None) -> int:
    """The largest batch whose decoding fits, predicted from the model's cost accounting (nothing is allocated).

    One row needs its cache at `context_length + new_tokens` tokens (`model.cache_bytes`, in the parameters' dtype,
    what `Engine.generate_replicated` allocates) plus ~4 * vocab_size bytes for the decode step's logits and
    activations, which grow with the batch too. The batch is `fraction` of the free memory over that, rounded down
    to a multiple of 8 when >= 8, then capped at `cap`: the rule of `benchmarks/engine_h100.py`.

    Args:
        model: a jetnas model (`JetNemotronForCausalLM`; see `jetnas.engine.as_jetnas`).
        context_length: prompt tokens per row.
        new_tokens: tokens generated per row (the cache holds `context_length + new_tokens`).
        device: where free memory is read (`free_memory`); default the model's device. Ignored with `free_bytes`.
        cap: the largest batch returned (default 1024).
        fraction: share of the free memory the rows may take (default 0.85; the rest is for the weights' workspace,
            the one-prompt prefill and the allocator's slack).
        free_bytes: free memory in bytes to predict from instead of measuring it (tests, what-if questions).

    Raises `ValueError` when the free memory is unknown (pass `free_bytes`, or choose the batch yourself) or when
    not even one row fits, with the numbers."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    device, free_bytes = _device_and_free(model, device, free_bytes, "batch size")
    dtype = next(model.parameters()).dtype
    cache = model.cache_bytes(context_length + new_tokens, dtype=dtype)
    per_row = cache + 4 * model.config.vocab_size
    b = int(fraction * free_bytes // per_row)
    if b < 1:
        raise ValueError(f"not even batch 1 fits at context {context_length} + {new_tokens} new tokens: one row needs "
                         f"{per_row} bytes (cache {cache} + logits {4 * model.config.vocab_size}), {fraction} of the "
                         f"free {free_bytes} bytes on {device} is {int(fraction * free_bytes)}")
    return min(cap, b - b % 8 if b >= 8 else b)


def auto_chunk_size(model, context_length: int, batch_size: int = 1, device=None, free_bytes: int | None = None,
                    reserved_bytes: int = 0, fraction: float = 0.8, minimum: int = 512) -> int:
    """The largest prefill chunk predicted to fit: the whole prompt when it does, else the largest power of two
    below it (and at least `minimum`) whose pass's activations (`jetnas.bench.costs.prefill_chunk_bytes`, with the
    flash kernels of CUDA) take at most `fraction` of the memory left next to the weights (already allocated) and
    the cache (`reserved_bytes`, when not allocated yet). Fewer, larger passes: fewer launches, larger GEMMs, and
    full attention runs causal over its own keys instead of a chunk after cached ones.

    Args:
        model: a jetnas model.
        context_length: prompt tokens per row.
        batch_size: rows prefilled together.
        device: where free memory is read (`free_memory`); default the model's. Ignored with `free_bytes`.
        free_bytes: free memory to predict from instead of measuring it (tests, what-if questions).
        reserved_bytes: memory that the run will still allocate besides the pass (the prefill's cache).
        fraction: share of the remaining memory a pass may take (default 0.8: the allocator's slack and the GEMM
            and attention workspaces, which the rule does not count).
        minimum: the smallest chunk considered (default 512).

    Raises `ValueError` when the free memory is unknown, or when not even a `minimum` chunk fits, with the
    numbers."""
    from jetnas.bench.costs import prefill_chunk_bytes

    if context_length < 1 or batch_size < 1 or minimum < 1:
        raise ValueError(f"context_length, batch_size and minimum must be >= 1, got {context_length}, {batch_size}, "
                         f"{minimum}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    device, free_bytes = _device_and_free(model, device, free_bytes, "chunk size")
    budget = fraction * (free_bytes - reserved_bytes)
    flash = torch.device(device).type == "cuda"
    candidates = [context_length]
    c = 1 << (context_length - 1).bit_length() - 1 if context_length > 1 else 1
    while c >= minimum:
        if c < context_length:
            candidates.append(c)
        c //= 2
    for chunk in candidates:
        if prefill_chunk_bytes(model, chunk, batch_size, context_length, flash=flash) <= budget:
            return chunk
    smallest = candidates[-1]
    need = prefill_chunk_bytes(model, smallest, batch_size, context_length, flash=flash)
    raise ValueError(f"not even a prefill chunk of {smallest} tokens fits: its activations need {need} bytes, "
                     f"{fraction} of the free {free_bytes} bytes less {reserved_bytes} reserved for the cache is "
                     f"{int(budget)}")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the allocator running out of memory: CUDA raises torch.OutOfMemoryError; the CPU allocator
    a RuntimeError "... can't allocate memory ..."."""
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def halving_on_oom(run: Callable[[int], dict], batch: int, device, halve: bool = True) -> tuple[dict, int]:
    """`run(batch)`, retried at half the batch while it runs out of memory (down to 1; with `halve` False, the
    error is raised). Returns `run`'s result and how many times the batch was halved: a measurement at the largest
    batch that runs, as the paper compares systems."""
    device = torch.device(device)
    halvings = 0
    while True:
        try:
            return run(batch), halvings
        except RuntimeError as err:
            if not (halve and batch > 1 and is_out_of_memory(err)):
                raise
        # outside the except block, where the failed run's tensors (held by the traceback) are released
        if device.type == "cuda":
            torch.cuda.empty_cache()
        batch //= 2
        halvings += 1


@torch.inference_mode()
def replicated_decode_throughput(model, batch_size: int, context_length: int, new_tokens: int = 32,
                                 chunk_size: int | str | None = None, device=None, warmup: bool = True,
                                 seed: int = 0, prefill_repeats: int = 0, prefill: str | None = None) -> dict:
    """The protocol of `benchmarks/engine_h100.py`: one random prompt of `context_length` tokens is prefilled once
    and its cache copied into all `batch_size` rows (`Engine.generate_replicated`), then `new_tokens` are decoded
    greedily (no early stop). A decode step reads every row's cache whatever it holds, so decoding costs what
    `batch_size` different prompts cost, without prefilling them all. A warm-up run (one row, the first two chunks
    of the prompt, 2 tokens) comes first so kernel compilation and autotuning are not timed; a static prefill
    (`prefill`, see the module docstring) warms up and captures its passes untimed before each timed prefill
    instead. `chunk_size`: tokens per prefill pass, None (one pass) or "auto" (`auto_chunk_size` next to the one
    row's cache: the batch's is allocated after the prefill).

    Returns `decode_tokens_per_s` (batch * decoded tokens after the first / decode time), `prefill_tokens_per_s`
    of the one prompt (context_length / prefill time), `cache_bytes_per_sequence` (allocated batch cache / batch),
    `peak_memory_bytes`, the timings and shapes, and `protocol`: "replicated-prompt".

    With `prefill_repeats`, the prompt's prefill is timed that many more times before the decoding run;
    `prefill_seconds` is the median of all its timings (listed in `prefill_seconds_runs`), so that one slow pass
    does not set it.
    """
    from jetnas.engine.engine import _sync

    if prefill_repeats < 0:
        raise ValueError(f"prefill_repeats must be >= 0, got {prefill_repeats}")
    if device is not None:  # the signature of `decode_throughput`; the engine runs where the model is
        model = model.to(device)
    engine = make_engine(model, context_length, 1, chunk_size, prefill, reserved_rows=1)
    dev = engine.device
    prompt = _random_prompts(engine.model, 1, context_length, dev, seed)
    if warmup and engine.prefill_mode == "forward":
        # two chunks: the first chunk's kernels and those of a chunk after a filled cache (a static prefill warms
        # up every pass of the prompt's shape when it is prepared)
        engine.generate_replicated(prompt[:, :2 * (engine.chunk_size or context_length)], 1, max_new_tokens=2)
    runs = []
    if prefill_repeats:
        engine.prefiller_for(engine.cache_for(1, context_length), prompt)  # static: prepared here, untimed
    for _ in range(prefill_repeats):
        _sync(dev)
        start = time.perf_counter()
        engine.prefill(prompt)
        _sync(dev)
        runs.append(time.perf_counter() - start)
    engine.release()  # the batch-1 cache and its passes, before the batch's cache is allocated
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    out = engine.generate_replicated(prompt, batch_size, max_new_tokens=new_tokens)
    runs.append(out.prefill_seconds)
    prefill = statistics.median(runs)
    decoded = batch_size * (out.new_tokens - 1)
    return {
        "protocol": "replicated-prompt",
        "batch_size": batch_size, "context_length": context_length, "new_tokens": out.new_tokens,
        "chunk_size": engine.chunk_size, "chunk_rule": "auto" if chunk_size == "auto" else "given",
        "prefill_mode": engine.prefill_mode, "prefill_batch_size": 1,
        "prefill_seconds": prefill, "prefill_seconds_runs": runs, "decode_seconds": out.decode_seconds,
        "prefill_tokens_per_s": context_length / prefill,
        "decode_tokens_per_s": decoded / out.decode_seconds if decoded else float("nan"),
        "cache_bytes_per_sequence": out.cache_bytes // batch_size,
        "peak_memory_bytes": _peak_memory(dev),
    }


class _StepClock:
    """A logits processor that timestamps every decoding step of `generate()` (synchronising the device first):
    the first call comes right after the prefill, each later one after one more decoded token."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def hf_generate_throughput(model, batch_size: int, context_length: int, new_tokens: int = 32, seed: int = 0) -> dict:
    """The same protocol through transformers `generate()` with its default dynamic cache, timed inside one call:
    prefill = start to the first step's logits, decode = first to last step (`new_tokens - 1` tokens per row)."""
    from transformers import LogitsProcessorList

    dev = next(model.parameters()).device
    ids = _random_prompts(model, batch_size, context_length, dev, seed)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids[:, :8], max_new_tokens=2, **kwargs)  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
    clock = _StepClock(dev)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   logits_processor=LogitsProcessorList([clock]), **kwargs)
    prefill = clock.times[0] - start
    decode = max(clock.times[-1] - clock.times[0], 1e-9)
    return {
        "batch_size": batch_size, "context_length": context_length, "new_tokens": new_tokens,
        "prefill_seconds": prefill, "decode_seconds": decode,
        "prefill_tokens_per_s": batch_size * context_length / prefill,
        "decode_tokens_per_s": batch_size * (len(clock.times) - 1) / decode,
        "peak_memory_bytes": _peak_memory(dev),
    }
