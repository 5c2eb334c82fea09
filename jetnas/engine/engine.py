"""The inference engine: preallocated caches, chunked prefill, batched greedy / sampled decoding.

    engine = Engine(model)                       # a jetnas model, or a plain HF Llama / Qwen2 / Qwen3 model
    out = engine.generate(input_ids, attention_mask, max_new_tokens=64)
    out.sequences, out.prefill_seconds, out.decode_seconds

It runs the model's own forward over a `StaticCache` (allocated once per batch size and length, updated in place),
so every block type and the kernel backends the layers chose are used as they are. Prompts are left-padded;
greedy decoding gives exactly the tokens of `model.generate()` (tested for every block type). Timings synchronise
the device before reading the clock; preparing a captured step or prefill (warm-up, capture) is not timed.

Prefill modes: "forward" runs the model's forward per chunk; "static" runs the same passes at fixed shapes,
captured once per batch size and prompt length in CUDA graphs (`jetnas.engine.prefill`), which pays when Python's
kernel launches, not the GPU, bound a prefill (small models, short prompts). Prompts with left padding always take
the forward path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from jetnas.engine.cache import StaticCache
from jetnas.engine.prefill import StaticPrefill, chunk_bounds
from jetnas.models.convert import as_jetnas


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, T_prompt + new tokens]
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    cache_bytes: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None, suppress: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens `[B]` from last-position logits `[B, V]`: argmax at temperature 0, else sampling after
    temperature, top-k and top-p (nucleus) filtering. `suppress`: token ids (a 1-D long tensor on the logits'
    device) that are never chosen, e.g. an instruction-tuned teacher's chat markup in sampled training text."""
    if suppress is not None:
        logits = logits.index_fill(-1, suppress, float("-inf"))
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


DECODE_MODES = ("static", "forward")
PREFILL_MODES = ("forward", "static")


class Engine:
    """Batched generation over a preallocated cache.

    Args:
        model: a `JetNemotronForCausalLM` or a HF Llama / Qwen2 / Qwen3 causal LM (converted, see `as_jetnas`).
        chunk_size: prompt tokens per prefill pass (None: the whole prompt in one pass). Smaller chunks bound the
            activation memory of long prompts, which leaves room for a larger batch.
        decode: "static" (default): the fixed-address step of `jetnas.engine.graph`, captured in a CUDA graph on
            GPU; "forward": the model's own forward per token (the readable reference the tests compare with).
        prefill: "forward" (default): the model's forward per chunk; "static": the same chunk passes at fixed
            shapes (`jetnas.engine.prefill.StaticPrefill`), captured in CUDA graphs on GPU once per batch size and
            prompt length (a new length costs a warm-up prefill and a capture, untimed) and kept while the engine's
            cache is; prompts with left padding take the forward path.
    """

    def __init__(self, model, chunk_size: int | None = None, decode: str = "static", prefill: str = "forward"):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
        self.model = as_jetnas(model).eval()
        self.chunk_size, self.decode, self.prefill_mode = chunk_size, decode, prefill
        self.device = next(self.model.parameters()).device
        self.cache = None
        self.decoder = None
        self.prefiller: StaticPrefill | None = None

    def cache_for(self, batch_size: int, max_length: int):
        """The engine's cache for this batch size and length: reused (reset) when it fits, else allocated."""
        c = self.cache
        if c is None or c.batch_size != batch_size or c.max_length < max_length:
            self.release()  # free the old buffers (and what was captured over them) before allocating new ones
            self.cache = StaticCache(self.model, batch_size, max_length, device=self.device)
        else:
            c.reset()
        return self.cache

    def decoder_for(self, cache):
        """The static decode step of this cache, prepared (and on CUDA captured) once; leaves the cache empty."""
        from jetnas.engine.graph import StaticDecoder

        if self.decoder is None or self.decoder.cache is not cache:
            self.decoder = None
            self.decoder = StaticDecoder(self.model, cache)
            self.decoder.prepare()
        return self.decoder

    def release(self) -> None:
        """Drop the engine's cache and the decode step and prefill passes captured over it (their memory is freed
        once nothing else holds them)."""
        self.prefiller = self.decoder = self.cache = None

    def prefiller_for(self, cache: StaticCache, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> StaticPrefill | None:
        """The static prefill of these prompts' shape into `cache`, prepared (on CUDA captured) once and kept until
        the next shape or cache; None when the engine's prefill mode is "forward" or a prompt has padding."""
        if self.prefill_mode != "static" or (attention_mask is not None and not bool(attention_mask.all())):
            return None
        B, T = input_ids.shape
        p = self.prefiller
        if p is None or p.cache is not cache or (p.batch_size, p.length, p.chunk_size) != (B, T, self.chunk_size):
            self.prefiller = None  # free the old passes' memory pool before capturing new ones
            self.prefiller = StaticPrefill(self.model, cache, B, T, self.chunk_size)
            self.prefiller.prepare()
        return self.prefiller

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 seed: int | None = None, suppress_token_ids: Sequence[int] | None = None) -> GenerateOutput:
        """Generate up to `max_new_tokens` after left-padded prompts `input_ids [B, T]` (`attention_mask` 1 for
        real tokens). Rows that produced `eos_token_id` continue with `pad_token_id` (default: the eos id), as
        `generate()` does; decoding stops early when every row has finished. `suppress_token_ids` are never
        generated (see `sample_next`)."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [batch, tokens >= 1], got {list(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        B, T = input_ids.shape
        input_ids = input_ids.to(self.device)
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)).long()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {list(mask.shape)} must match input_ids {list(input_ids.shape)}")
        cache = self.cache_for(B, T + max_new_tokens)
        decoder = self.decoder_for(cache) if self.decode == "static" else None
        self.prefiller_for(cache, input_ids, mask)  # prepared (captured) here, before the clock starts
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(0 if seed is None else seed)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        suppress = None
        if suppress_token_ids:
            vocab = self.model.config.vocab_size
            bad = [i for i in suppress_token_ids if not 0 <= int(i) < vocab]
            if bad:
                raise ValueError(f"suppress_token_ids {bad} outside the model's vocabulary of {vocab:,}")
            suppress = torch.tensor(sorted({int(i) for i in suppress_token_ids}), dtype=torch.long, device=self.device)

        _sync(self.device)
        start = time.perf_counter()
        logits = self.prefill(input_ids, mask, cache)
        token = sample_next(logits, temperature, top_k, top_p, generator, suppress)
        _sync(self.device)
        prefill_seconds = time.perf_counter() - start
        return self._decode(input_ids, mask, token, cache, decoder, max_new_tokens, prefill_seconds, temperature, top_k,
                            top_p, generator, eos_token_id, pad, suppress)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: StaticCache | None = None) -> torch.Tensor:
        """Fill `cache` with left-padded prompts `input_ids [B, T]`, `chunk_size` tokens per pass, and return the
        last position's logits `[B, V]`. `cache` (empty, holding at least `T` positions for `B` rows) defaults to
        the engine's own for this batch and length, reset. What `generate` times as its prefill, without sampling.
        In "static" mode, prompts without padding run the captured passes (prepared on the first call of a shape)."""
        input_ids = input_ids.to(self.device)
        if cache is None:
            cache = self.cache_for(*input_ids.shape)
        # one host read per prefill: without padding no layer needs the mask (the forward then counts positions
        # from the cache, as the mask would), so no layer reads it on the host for every chunk
        padded = attention_mask is not None and not bool(attention_mask.all())
        static = self.prefiller_for(cache, input_ids, attention_mask if padded else None)
        if static is not None:
            return static.run(input_ids)
        mask = attention_mask.to(self.device).long() if padded else None
        for begin, end in chunk_bounds(input_ids.shape[1], self.chunk_size):
            logits = self.model(input_ids[:, begin:end], attention_mask=None if mask is None else mask[:, :end],
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return logits

    def _decode(self, input_ids, mask, token, cache, decoder, max_new_tokens, prefill_seconds, temperature=0.0,
                top_k=None, top_p=None, generator=None, eos_token_id=None, pad=None, suppress=None) -> GenerateOutput:
        B = input_ids.shape[0]
        out = [token]
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        start = time.perf_counter()
        ones = torch.ones(B, 1, dtype=mask.dtype, device=self.device)
        if decoder is not None:
            decoder.begin(mask)
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None and bool(finished.all()):
                break
            if decoder is not None:
                logits = decoder.step(token)
            else:
                mask = torch.cat([mask, ones], 1)
                logits = self.model(token[:, None], attention_mask=mask, past_key_values=cache,
                                    use_cache=True).logits[:, -1]
            token = sample_next(logits, temperature, top_k, top_p, generator, suppress)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, pad), token)
                finished |= token == eos_token_id
            out.append(token)
        _sync(self.device)
        decode_seconds = time.perf_counter() - start
        sequences = torch.cat([input_ids, torch.stack(out, 1)], 1)
        return GenerateOutput(sequences, len(out), prefill_seconds, decode_seconds, cache.nbytes())

    @torch.inference_mode()
    def generate_replicated(self, prompt: torch.Tensor, batch_size: int, max_new_tokens: int = 32) -> GenerateOutput:
        """Greedy decoding of `batch_size` copies of one prompt `[1, T]`: the prompt is prefilled once (that is what
        `prefill_seconds` times) and its cache copied into every row of the batch's cache. Decoding then costs what
        it costs for `batch_size` different prompts of that length (a step reads every row's cache whatever it
        holds), without prefilling them all: how the benchmark reaches long contexts at large batches."""
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise ValueError(f"prompt must be [1, tokens], got {list(prompt.shape)}")
        T = prompt.shape[1]
        prompt = prompt.to(self.device)
        mask = torch.ones_like(prompt)
        single = StaticCache(self.model, 1, T, device=self.device)
        self.prefiller_for(single, prompt)  # prepared (captured) before the clock starts
        _sync(self.device)
        start = time.perf_counter()
        logits = self.prefill(prompt, mask, single)
        token = sample_next(logits)
        _sync(self.device)
        prefill_seconds = time.perf_counter() - start
        if self.prefiller is not None and self.prefiller.cache is single:
            self.prefiller = None  # its passes' memory, before the batch's cache is allocated
        cache = self.cache_for(batch_size, T + max_new_tokens)
        decoder = self.decoder_for(cache) if self.decode == "static" else None
        cache.fill_from(single)
        del single
        input_ids = prompt.expand(batch_size, T)
        return self._decode(input_ids, mask.expand(batch_size, T), token.expand(batch_size), cache, decoder,
                            max_new_tokens, prefill_seconds)
