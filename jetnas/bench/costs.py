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


def prefill_chunk_bytes(model, chunk_size: int, batch_size: int = 1, context_length: int | None = None,
                        dtype: torch.dtype | None = None, flash: bool = True) -> int:
    """Activation bytes one prefill pass of `chunk_size` tokens for `batch_size` rows needs at its peak (the
    weights and the cache not included), predicted from the model's shapes by this rule, per row:

    - the residual stream: 4 x D per token (the hidden states, the normed input, the block's output, their sum);
    - plus the larger working set of any one layer (layers run one after another, so only one is alive):
      - its MLP: 3 x I per token (gate, up, their product);
      - its mixer: 2 x (the out_features of all the mixer's Linear layers) per token (the projections and as many
        tensors made from them: activations, convolved or rotated copies, the gated norm's output; a JetBlock's
        dynamic-conv kernels are its generator's output), plus, for a linear block, one recurrent state per 64
        tokens (the chunk states the chunked kernels keep: `cache_bytes` / 64 per token);
      - full attention after cached keys (`chunk_size < context_length`): the keys and values repeated over the
        query heads for the causal lower-right kernel, 2 x H x head_dim x context_length;
      - without `flash` (CPU; a masked kernel for padded rows), the scores and mask of one layer:
        H x chunk x keys float32 plus chunk x keys booleans, keys = context_length (a window's blocks for `swa`);
    - the LM head of the last position: vocab_size float32 (`logits_to_keep=1`).

    Elements count in `dtype` (default: the parameters'). Against peaks measured on an H200 (bf16, one prompt;
    `max_memory_allocated` less the weights and the cache, from benchmarks/results/2026-12-02_h200_checks and
    _parity_and_dist), the rule's prediction was 1.6x the measured activations of the Jet-Nemotron-2B architecture
    at 64K (one pass, and 32K chunks), and 0.7-1.0x for the SmolLM2-135M hybrid and its teacher at 8K-32K, where
    fixed workspaces (cuBLAS, cuDNN: tens of MB) weigh as much as the activations; `auto_chunk_size` leaves a
    share of the free memory unused for that. benchmarks/prefill_bench.py records prediction and peak per row.
    """
    from jetnas.layers.attention import Attention

    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be >= 1, got {chunk_size} and {batch_size}")
    context_length = chunk_size if context_length is None else context_length
    if context_length < chunk_size:
        raise ValueError(f"context_length ({context_length}) must be >= chunk_size ({chunk_size})")
    dtype = dtype or next(model.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size()
    config = model.config
    per_layer = []
    for layer in model.model.layers:
        mixer = layer.self_attn
        outs = sum(m.out_features for m in mixer.modules() if isinstance(m, nn.Linear))
        mixer_bytes = 2 * outs * chunk_size * size
        if isinstance(mixer, Attention):
            keys = context_length if mixer.window_size is None else min(context_length, 3 * mixer.window_size)
            if mixer.window_size is None and chunk_size < context_length:
                mixer_bytes += 2 * mixer.num_heads * mixer.head_dim * context_length * size
            if not flash:
                mixer_bytes += mixer.num_heads * chunk_size * keys * 4 + chunk_size * keys
        else:
            mixer_bytes += mixer.cache_bytes(1, dtype=dtype, state_dtype=dtype) * chunk_size // 64
        mlp_bytes = 3 * config.intermediate_size * chunk_size * size
        per_layer.append(max(mixer_bytes, mlp_bytes))
    residual = 4 * config.hidden_size * chunk_size * size
    return batch_size * (residual + max(per_layer, default=0) + 4 * config.vocab_size)


def _linear_heads(mixer) -> tuple[int, int, int]:
    """(H, K, V) of a linear block's recurrent state per row: `[H, K, V]`."""
    H = mixer.num_heads
    if hasattr(mixer, "state_size"):  # Mamba2: keys are B (state_size), values x (head_dim)
        return H, mixer.state_size, mixer.head_dim
    return H, mixer.head_k_dim, mixer.head_v_dim


def prefill_flops(model, context_length: int, batch_size: int = 1) -> int:
    """Forward FLOPs of prefilling `batch_size` prompts of `context_length` tokens, the useful work only:

    - 2 per weight of every matrix product per token (embeddings are a lookup), the LM head once per row (the last
      position's logits);
    - causal attention: 4 x H x head_dim per visible key per query (q.k and p.v): `T (T + 1) / 2` keys in all for
      `attn`, `min(t, window)` for the query at t for `swa`;
    - linear blocks, per token and head, the delta rule's chunked (WY) form with 64-token chunks: 6 K V (the state's
      update and read-out) + 64 (6 K + 4 V) (the chunk's k.k^T system, q.k^T, and their products with k and v);
      an upper count for GLA, RetNet and Mamba2, whose chunked forms have no WY system.
    """
    from jetnas.layers.attention import Attention

    if context_length < 1 or batch_size < 1:
        raise ValueError(f"context_length and batch_size must be >= 1, got {context_length} and {batch_size}")
    T = context_length
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and p.data_ptr() not in (embed.data_ptr(), head.data_ptr()))
    flops = 2 * body * T + 2 * head.numel()
    for layer in model.model.layers:
        mixer = layer.self_attn
        if isinstance(mixer, Attention):
            if mixer.window_size is None:
                keys = T * (T + 1) // 2
            else:  # queries t < W see t + 1 keys, the rest W
                W = mixer.window_size
                n = min(T, W)
                keys = n * (n + 1) // 2 + (T - n) * W
            flops += 4 * mixer.num_heads * mixer.head_dim * keys
        else:
            H, K, V = _linear_heads(mixer)
            flops += T * H * (6 * K * V + 64 * (6 * K + 4 * V))
    return int(batch_size * flops)


def matmul_rate(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                repeats: int = 10) -> float:
    """Measured dense matrix-product rate in FLOP/s: `n x n` by `n x n` products in `dtype` (the GPU's bf16 GEMM
    rate with the defaults; on CPU pass a smaller n and float32). What MFU is held against."""
    import time

    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return repeats * 2 * n**3 / (time.perf_counter() - start)
