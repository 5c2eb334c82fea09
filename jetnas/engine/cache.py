"""Caches of the inference engine: every buffer is allocated once and updated in place.

A `StaticCache` holds one layer object per model layer and plugs into `JetNemotronForCausalLM.forward` as
`past_key_values` (the model reads `cache.layers[i]`, see `models/hf_compat.layer_state`):

- `attn`: `StaticKV`, keys and values `[B, Hkv, max_length, D]`; a call writes its tokens at the current position
  and attends over the filled prefix.
- `swa`: `WindowKV`, keys and values in a ring of `window` slots `[B, Hkv, window, D]` (column c in slot c % window),
  written in place; its size does not grow with the context, and the decode step reads it as it is.
- linear blocks: `StaticLinear`, the recurrent state and conv states with transformers' `LinearAttentionLayer`
  interface; each buffer is allocated by the first write (its shape is the block's own) and copied into afterwards.

In-place updates keep tensor addresses fixed from one decode step to the next, which is what a captured CUDA graph
needs; they also make the memory a run takes known up front (`nbytes`). Besides its buffers a cache keeps Python
counters (tokens seen per layer, which linear states exist): `counters()` / `restore()` save and set them, since a
replayed graph advances the buffers but not the Python state (`jetnas.engine.prefill`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class CacheCounters(NamedTuple):
    """The Python state of a `StaticCache` (no tensors): tokens seen, and per layer its token count (attention) or
    the initialised flags of its conv and recurrent slots (linear)."""

    seen_tokens: int
    layers: tuple


class _KVBuffers:
    """Keys and values in two preallocated `[B, Hkv, slots, D]` buffers, and the tokens seen so far."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, slots: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch_size, num_kv_heads, slots, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.seq_length = 0

    def get_seq_length(self) -> int:
        return self.seq_length

    def reset(self) -> None:
        self.seq_length = 0

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


class StaticKV(_KVBuffers):
    """Full-attention keys and values in preallocated `[B, Hkv, max_length, D]` buffers."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__(batch_size, num_kv_heads, head_dim, max_length, dtype, device)
        self.max_length = max_length

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        T = keys.shape[-2]
        end = self.seq_length + T
        if end > self.max_length:
            raise ValueError(f"the cache holds {self.max_length} tokens; {self.seq_length} + {T} do not fit")
        self.keys[:, :, self.seq_length:end].copy_(keys)
        self.values[:, :, self.seq_length:end].copy_(values)
        self.seq_length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def fill_from(self, other: StaticKV, batch_size: int) -> None:
        n = other.seq_length
        self.keys[:, :, :n].copy_(other.keys[:, :, :n])
        self.values[:, :, :n].copy_(other.values[:, :, :n])
        self.seq_length = n


class WindowKV(_KVBuffers):
    """Sliding-window keys and values in a ring of `window` slots, `[B, Hkv, window, D]`: column c (prompt columns
    count the left padding) lives in slot c % window. A call attends over the window's last `window - 1` kept
    tokens plus its own; the decode step (`jetnas.engine.graph`) writes its token into its slot and reads the ring
    as it is, so nothing is shifted or copied between prefill and decoding."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, window: int, dtype: torch.dtype,
                 device: torch.device | str):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        super().__init__(batch_size, num_kv_heads, head_dim, window, dtype, device)

    def _slots(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.keys.device) % self.window

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        s, T = self.seq_length, keys.shape[-2]
        # what the new queries attend over: the kept tokens (oldest first) and the new ones; a prompt's first pass
        # keeps none, and attends over its own keys as they are (no copy of them)
        all_k, all_v = keys, values
        if s:
            kept = self._slots(max(0, s - (self.window - 1)), s)
            all_k = torch.cat([self.keys[:, :, kept], keys], -2)
            all_v = torch.cat([self.values[:, :, kept], values], -2)
        n = min(T, self.window)  # the newest `window` tokens overwrite their slots
        slots = self._slots(s + T - n, s + T)
        self.keys[:, :, slots] = keys[:, :, T - n:]
        self.values[:, :, slots] = values[:, :, T - n:]
        self.seq_length = s + T
        return all_k, all_v

    def fill_from(self, other: WindowKV, batch_size: int) -> None:
        self.keys.copy_(other.keys)
        self.values.copy_(other.values)
        self.seq_length = other.seq_length


class StaticLinear:
    """Conv and recurrent states of a linear-attention layer, in transformers' `LinearAttentionLayer` interface
    (slots of conv states; recurrent state in slot 0) with in-place updates after the first write."""

    def __init__(self, slots: int = 3):
        self.conv_states: dict[int, torch.Tensor | None] = dict.fromkeys(range(slots))
        self.recurrent_states: dict[int, torch.Tensor | None] = dict.fromkeys(range(slots))
        self.is_conv_states_initialized = dict.fromkeys(range(slots), False)
        self.is_recurrent_states_initialized = dict.fromkeys(range(slots), False)

    @staticmethod
    def _write(store: dict, flags: dict, value: torch.Tensor, slot: int) -> torch.Tensor:
        current = store[slot]
        if current is None or current.shape != value.shape or current.dtype != value.dtype:
            store[slot] = value.clone()  # the one allocation of this buffer
        elif current.data_ptr() != value.data_ptr():
            current.copy_(value)
        flags[slot] = True
        return store[slot]

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0) -> torch.Tensor:
        return self._write(self.conv_states, self.is_conv_states_initialized, conv_states, state_idx)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0) -> torch.Tensor:
        return self._write(self.recurrent_states, self.is_recurrent_states_initialized, recurrent_states, state_idx)

    def reset(self) -> None:
        # buffers stay allocated; the next sequence starts from "no state"
        for flags in (self.is_conv_states_initialized, self.is_recurrent_states_initialized):
            for slot in flags:
                flags[slot] = False

    def nbytes(self) -> int:
        tensors = [*self.conv_states.values(), *self.recurrent_states.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def fill_from(self, other: StaticLinear, batch_size: int) -> None:
        for store, flags, theirs, their_flags in (
                (self.conv_states, self.is_conv_states_initialized, other.conv_states, other.is_conv_states_initialized),
                (self.recurrent_states, self.is_recurrent_states_initialized, other.recurrent_states,
                 other.is_recurrent_states_initialized)):
            for slot, value in theirs.items():
                if their_flags[slot]:
                    mine = store[slot]
                    if mine is None or mine.shape[1:] != value.shape[1:] or mine.dtype != value.dtype:
                        store[slot] = value.expand(batch_size, *value.shape[1:]).clone()  # first allocation
                    else:
                        mine.copy_(value)  # broadcast over the batch, in place
                    flags[slot] = True


class StaticCache:
    """One preallocated state per layer of a jetnas model, for `batch_size` sequences of up to `max_length`."""

    def __init__(self, model, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        from jetnas.layers.attention import Attention

        param = next(model.parameters())
        dtype, device = dtype or param.dtype, device or param.device
        self.batch_size, self.max_length = batch_size, max_length
        self.layers = []
        for layer in model.model.layers:
            mixer = layer.self_attn
            if isinstance(mixer, Attention):
                shape = (batch_size, mixer.num_kv_heads, mixer.head_dim)
                if mixer.window_size is None:
                    self.layers.append(StaticKV(*shape, max_length, dtype, device))
                else:
                    self.layers.append(WindowKV(*shape, mixer.window_size, dtype, device))
            else:
                self.layers.append(StaticLinear())
        self.jetnas_seen_tokens = 0

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.jetnas_seen_tokens = 0

    def counters(self) -> CacheCounters:
        """The cache's Python state now (what a forward pass advances besides the buffers)."""
        layers = []
        for layer in self.layers:
            if isinstance(layer, _KVBuffers):
                layers.append(layer.seq_length)
            else:
                layers.append((dict(layer.is_conv_states_initialized), dict(layer.is_recurrent_states_initialized)))
        return CacheCounters(self.jetnas_seen_tokens, tuple(layers))

    def restore(self, counters: CacheCounters) -> None:
        """Set the Python state saved by `counters()` (the buffers are left as they are)."""
        if len(counters.layers) != len(self.layers):
            raise ValueError(f"counters of {len(counters.layers)} layers given to a cache of {len(self.layers)}")
        for layer, saved in zip(self.layers, counters.layers):
            if isinstance(layer, _KVBuffers):
                layer.seq_length = saved
            else:
                layer.is_conv_states_initialized.update(saved[0])
                layer.is_recurrent_states_initialized.update(saved[1])
        self.jetnas_seen_tokens = counters.seen_tokens

    def buffer_addresses(self) -> dict[str, int]:
        """Every buffer of the cache by a name that says where it lives, with its address: what a captured graph
        reads and writes, so a moved buffer (a state reallocated at another shape or dtype) can be named."""
        out = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, _KVBuffers):
                out.update({f"layer {i} keys": layer.keys.data_ptr(), f"layer {i} values": layer.values.data_ptr()})
            else:
                for kind in ("conv_states", "recurrent_states"):
                    for slot, t in getattr(layer, kind).items():
                        if t is not None:
                            out[f"layer {i} {kind}[{slot}]"] = t.data_ptr()
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.jetnas_seen_tokens

    def fill_from(self, other: StaticCache) -> None:
        """Copy a one-sequence cache of the same model into every row (the buffers keep their addresses)."""
        if other.batch_size != 1 or len(other.layers) != len(self.layers):
            raise ValueError("fill_from takes a one-sequence cache of the same model")
        if other.jetnas_seen_tokens > self.max_length:
            raise ValueError(f"{other.jetnas_seen_tokens} tokens do not fit in a cache of {self.max_length}")
        for mine, theirs in zip(self.layers, other.layers):
            mine.fill_from(theirs, self.batch_size)
        self.jetnas_seen_tokens = other.jetnas_seen_tokens

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
