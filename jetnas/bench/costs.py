"""Cost accounting of a jetnas model, computed from its shapes (no measurement).

Decoding is memory-bound: one step reads every weight once and every sequence's cache once, so at batch B and
context T a step takes at least `(weight_bytes + B * cache_bytes(T)) / bandwidth` and

    decode tokens/s <= B * bandwidth / (weight_bytes + B * cache_bytes(T))          (the roofline)

`cache_bytes` is per sequence: KV of full attention grows with T, a sliding window keeps `window - 1` tokens, a
linear block keeps a constant conv + recurrent state (`TokenMixer.cache_bytes`). (The engine's sliding-window ring
has one slot more, for the step's own token: a rounding error next to the rest.)

That roofline counts reads only (the issue's definition, kept as `roofline_tokens_per_s`). A step also writes: a
linear block rewrites its whole state in place (every entry of a decayed recurrent state changes, and the conv step
shifts its window), while attention appends one token's key and value. Memory moves both, and the measured copy
bandwidth counts both, so `roofline_rw_tokens_per_s` (reads + writes) is the tighter bound; for attention-only
models the two agree to a token's KV.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DecodeCost:
    batch_size: int
    context_length: int
    weight_bytes: int
    cache_bytes_per_sequence: int
    cache_bytes_per_token: float  # cache_bytes_per_sequence / context_length
    bytes_per_step: int  # read: weight_bytes + batch_size * cache_bytes_per_sequence
    flops_per_token: int
    bytes_written_per_sequence: int = 0  # per step: linear states rewritten, one token's KV per attention layer

    @property
    def bytes_moved_per_step(self) -> int:
        """Reads and writes of one step."""
        return self.bytes_per_step + self.batch_size * self.bytes_written_per_sequence

    def roofline_tokens_per_s(self, bandwidth_bytes_per_s: float) -> float:
        """The reads-only bound: batch * bandwidth / bytes read per step."""
        return self.batch_size * bandwidth_bytes_per_s / self.bytes_per_step

    def roofline_rw_tokens_per_s(self, bandwidth_bytes_per_s: float) -> float:
        """The bound with the step's writes counted too (tighter; see the module docstring)."""
        return self.batch_size * bandwidth_bytes_per_s / self.bytes_moved_per_step

    def as_dict(self) -> dict:
        return asdict(self)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters a decode step reads (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def flops_per_token(model, context_length: int) -> int:
    """Forward FLOPs of one decoded token at `context_length`: 2 per weight of every matmul (embeddings are a
    lookup, not a matmul; the LM head is) plus attention over the visible keys (q.k and p.v: 4 * heads * head_dim
    per key) for `attn` / `swa` layers. Linear blocks' state updates (~4 H K V) are included."""
    from jetnas.layers.attention import Attention

    embed = model.get_input_embeddings().weight
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and p.data_ptr() != embed.data_ptr())
    flops = 2 * matmul
    if model.get_output_embeddings().weight.data_ptr() == embed.data_ptr():
        flops += 2 * embed.numel()  # tied: the LM head is a matmul with the embedding matrix
    for layer in model.model.layers:
        mixer = layer.self_attn
        if isinstance(mixer, Attention):
            keys = context_length if mixer.window_size is None else min(context_length, mixer.window_size)
            flops += 4 * mixer.num_heads * mixer.head_dim * keys
        else:
            state = mixer.cache_bytes(context_length, state_dtype=torch.float32)
            flops += state  # ~4 flops per float32 state entry: decay, k^T(S), rank-1 update, q S
    return int(flops)


def bytes_written_per_step(model, dtype: torch.dtype) -> int:
    """Bytes one decode step writes per sequence: a linear block's whole state, an attention layer's new key and
    value. Both are what a layer keeps after one token: `model.cache_bytes(1)` (a linear state is the same size
    at every context; attention keeps one token's KV, sliding window or not)."""
    return model.cache_bytes(1, dtype=dtype)


def decode_cost(model, batch_size: int, context_length: int, cache_dtype: torch.dtype | None = None) -> DecodeCost:
    """What one decode step of `batch_size` sequences at `context_length` reads, writes and computes."""
    dtype = cache_dtype or next(model.parameters()).dtype
    cache = model.cache_bytes(context_length, dtype=dtype)
    weights = weight_bytes(model)
    return DecodeCost(batch_size, context_length, weights, cache, cache / max(context_length, 1),
                      weights + batch_size * cache, flops_per_token(model, context_length),
                      bytes_written_per_step(model, dtype))


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 28, repeats: int = 10) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (a copy reads and writes: 2 * nbytes per copy)."""
    import time

    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)
