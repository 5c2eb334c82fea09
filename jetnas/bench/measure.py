"""Timed prefill and decode of random prompts through the engine (and through `generate()` as a baseline)."""

from __future__ import annotations

import resource
import time

import torch


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # CPU: the process's peak resident set (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _random_prompts(model, batch_size: int, context_length: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch_size, context_length), generator=g).to(device)


def decode_throughput(model, batch_size: int, context_length: int, new_tokens: int = 32,
                      chunk_size: int | None = None, device=None, warmup: bool = True, seed: int = 0) -> dict:
    """Prefill `batch_size` random prompts of `context_length` tokens, then decode `new_tokens` greedily (no early
    stop) with the engine. A short warm-up run (same shapes, 2 tokens) comes first so kernel compilation and
    autotuning are not timed.

    Returns `decode_tokens_per_s` (batch * decoded tokens after the first / decode time), `prefill_tokens_per_s`,
    `cache_bytes_per_sequence` (allocated cache / batch at the end), `peak_memory_bytes`, the timings and shapes.
    """
    from jetnas.engine import Engine

    engine = Engine(model, chunk_size=chunk_size)
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
        "chunk_size": chunk_size,
        "prefill_seconds": out.prefill_seconds, "decode_seconds": out.decode_seconds,
        "prefill_tokens_per_s": batch_size * context_length / out.prefill_seconds,
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
