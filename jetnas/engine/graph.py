"""The engine's decode step with fixed shapes and addresses, captured once in a CUDA graph and replayed per token.

The model's own forward decides positions, masks and cache slices from Python integers and a growing attention
mask, so a captured graph of it would replay the first step's positions forever. `StaticDecoder` instead runs one
step from tensors that the step itself advances in place:

- `column [B]`: the column of the token being decoded (prompt columns include the left padding), and `start [B]`:
  each row's first real column. The RoPE position is `column - start`.
- full attention writes the new key/value at slot `column` of the prefill's own `StaticKV` buffers and attends over
  columns `[start, column]` with `decode_attention`; a sliding window writes into the prefill's `WindowKV` ring
  (column c in slot c % window) and attends over the window's columns.
- linear blocks run their own step path on the prefill's `StaticLinear` buffers, which they update in place.

`prepare()` fixes the addresses before any real prompt: a one-token prefill makes every linear layer allocate its
state buffers at their final shapes, one eager step runs the kernels (Triton compiles, fla autotunes) and, on CUDA,
the step is captured; then the cache is reset. Prefill copies into those same buffers afterwards.
"""

from __future__ import annotations

import torch

from jetnas.engine.cache import StaticCache, StaticKV, WindowKV
from jetnas.layers.attention import Attention
from jetnas.models.hf_compat import LinearCacheView
from jetnas.ops.decode import decode_attention


class StaticDecoder:
    """One greedy-or-not decode step over a `StaticCache`, graph-captured on CUDA (see the module docstring)."""

    def __init__(self, model, cache: StaticCache, use_graph: bool | None = None):
        self.model, self.cache = model, cache
        B = cache.batch_size
        device = next(model.parameters()).device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.token = torch.zeros(B, dtype=torch.long, device=device)
        self.column = torch.zeros(B, dtype=torch.int32, device=device)
        self.start = torch.zeros(B, dtype=torch.int32, device=device)
        self.rows = torch.arange(B, device=device)
        self.logits: torch.Tensor | None = None
        self.windows: dict[int, int] = {}  # sliding-window layers: their ring's size
        self.views: dict[int, LinearCacheView] = {}
        for i, state in enumerate(cache.layers):
            if isinstance(state, WindowKV):
                self.windows[i] = state.window
            elif not isinstance(state, StaticKV):
                self.views[i] = LinearCacheView(state)
        self.graph = None
        self._addresses: dict[str, int] = {}

    # -- the step ---------------------------------------------------------------------------------------------

    def _attend(self, i: int, attn: Attention, x: torch.Tensor, cos, sin, where: dict) -> torch.Tensor:
        q, k, v = attn.project(x, cos, sin)
        window = self.windows.get(i)
        keys, values = self.cache.layers[i].keys, self.cache.layers[i].values
        slot, lo, hi = where[window]
        keys[self.rows, :, slot] = k[:, 0]
        values[self.rows, :, slot] = v[:, 0]
        # the kernel the attention layer was built for (its resolved backend), as every other op of the step
        o = decode_attention(q[:, 0], keys, values, lo, hi, ring=window is not None, backend=attn.backend)
        return attn.o_proj(o.reshape(x.shape[0], 1, -1))

    def _step(self) -> torch.Tensor:
        inner = self.model.model
        h = inner.embed_tokens(self.token)[:, None]
        positions = (self.column - self.start).long()[:, None]
        cos, sin = inner.rotary_emb(h, positions)
        # per step, not per layer: each cache kind's write slot and visible columns [lo, hi)
        hi = self.column + 1
        where = {None: (self.column.long(), self.start, hi)}
        for window in set(self.windows.values()):
            where[window] = ((self.column % window).long(), torch.maximum(self.start, hi - window), hi)
        for i, layer in enumerate(inner.layers):
            x = layer.input_layernorm(h)
            if i in self.views:
                # positions from the step's tensors (RetNet rotates q/k): the view's own token count is Python
                # state, frozen into a captured graph
                mixed, _ = layer.self_attn(x, self.views[i], position_ids=positions, use_cache=True)
            else:
                mixed = self._attend(i, layer.self_attn, x, cos, sin, where)
            h = h + mixed
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(inner.norm(h))[:, 0]
        self.column.add_(1)
        return logits

    # -- set-up and use ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prepare(self) -> None:
        """Fix every buffer's address, run the step once, capture it (CUDA), and leave the cache empty."""
        self.cache.reset()
        self.model(self.token[:, None], past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.column.fill_(1)
        self.start.zero_()
        if self.use_graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile / autotune every kernel outside the capture
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
        else:
            self._step()
        self._addresses = self.cache.buffer_addresses()
        self.cache.reset()

    def begin(self, attention_mask: torch.Tensor) -> None:
        """After the prefill of left-padded prompts with this `[B, T]` mask: the next step decodes column T."""
        moved = [name for name, ptr in self.cache.buffer_addresses().items() if self._addresses.get(name) != ptr]
        if moved:  # a captured step would read the stale buffer: wrong tokens with no error
            raise RuntimeError(f"the prefill reallocated cache buffers the decode step was prepared with: "
                               f"{', '.join(moved)} (a layer's state changed shape or dtype between prepare() and "
                               f"the prefill)")
        T = attention_mask.shape[1]
        self.start.copy_(T - attention_mask.sum(1).to(torch.int32))
        self.column.fill_(T)

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Decode `token [B]` (at the current column) and return the next-token logits `[B, V]`. With a captured
        graph these are its output buffer, overwritten by the next step: copy them to keep them (a copy per step
        here would cost every caller B x V floats)."""
        self.token.copy_(token)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._step()
