"""The inference engine: preallocated caches, chunked prefill, batched greedy / sampled decoding.

    engine = Engine(model)                       # a jetnas model, or a plain HF Llama / Qwen2 / Qwen3 model
    out = engine.generate(input_ids, attention_mask, max_new_tokens=64)
    out.sequences, out.prefill_seconds, out.decode_seconds

It runs the model's own forward over a `StaticCache` (allocated once per batch size and length, updated in place),
so every block type and the kernel backends the layers chose are used as they are. Prompts are left-padded;
greedy decoding gives exactly the tokens of `model.generate()` (tested for every block type). Timings synchronise
the device before reading the clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def as_jetnas(model):
    """A jetnas model as it is; a plain HF Llama / Qwen2 / Qwen3 model converted with every layer kept as
    attention (exact: same logits, see `jetnas.models.convert`), sharing nothing it does not need to copy."""
    from jetnas.models.modeling import JetNemotronForCausalLM

    if isinstance(model, JetNemotronForCausalLM):
        return model
    from jetnas.models.convert import convert_model

    param = next(model.parameters())
    converted, _ = convert_model(model, ["attn"] * model.config.num_hidden_layers)
    return converted.to(device=param.device, dtype=param.dtype).eval()


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
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens `[B]` from last-position logits `[B, V]`: argmax at temperature 0, else sampling after
    temperature, top-k and top-p (nucleus) filtering."""
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


class Engine:
    """Batched generation over a preallocated cache.

    Args:
        model: a `JetNemotronForCausalLM` or a HF Llama / Qwen2 / Qwen3 causal LM (converted, see `as_jetnas`).
        chunk_size: prompt tokens per prefill pass (None: the whole prompt in one pass). Smaller chunks bound the
            activation memory of long prompts, which leaves room for a larger batch.
    """

    def __init__(self, model, chunk_size: int | None = None):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.model = as_jetnas(model).eval()
        self.chunk_size = chunk_size
        self.device = next(self.model.parameters()).device
        self.cache = None

    def cache_for(self, batch_size: int, max_length: int):
        """The engine's cache for this batch size and length: reused (reset) when it fits, else allocated."""
        from jetnas.engine.cache import StaticCache

        c = self.cache
        if c is None or c.batch_size != batch_size or c.max_length < max_length:
            self.cache = None  # free the old buffers before allocating new ones
            self.cache = StaticCache(self.model, batch_size, max_length, device=self.device)
        else:
            c.reset()
        return self.cache

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 seed: int | None = None) -> GenerateOutput:
        """Generate up to `max_new_tokens` after left-padded prompts `input_ids [B, T]` (`attention_mask` 1 for
        real tokens). Rows that produced `eos_token_id` continue with `pad_token_id` (default: the eos id), as
        `generate()` does; decoding stops early when every row has finished."""
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
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(0 if seed is None else seed)
        pad = eos_token_id if pad_token_id is None else pad_token_id

        _sync(self.device)
        start = time.perf_counter()
        chunk = self.chunk_size or T
        for begin in range(0, T, chunk):
            end = min(begin + chunk, T)
            logits = self.model(input_ids[:, begin:end], attention_mask=mask[:, :end], past_key_values=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1]
        token = sample_next(logits, temperature, top_k, top_p, generator)
        _sync(self.device)
        prefill_seconds = time.perf_counter() - start

        out = [token]
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        start = time.perf_counter()
        ones = torch.ones(B, 1, dtype=mask.dtype, device=self.device)
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None and bool(finished.all()):
                break
            mask = torch.cat([mask, ones], 1)
            logits = self.model(token[:, None], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, pad), token)
                finished |= token == eos_token_id
            out.append(token)
        _sync(self.device)
        decode_seconds = time.perf_counter() - start
        sequences = torch.cat([input_ids, torch.stack(out, 1)], 1)
        return GenerateOutput(sequences, len(out), prefill_seconds, decode_seconds, cache.nbytes())
