"""The engine's prefill as fixed-shape chunk passes, each captured once in a CUDA graph and replayed per prompt.

A prompt of T tokens prefilled in chunks of C is the same sequence of passes for every prompt of that batch size and
length: pass i is the model's own forward over columns `[i*C, min((i+1)*C, T))` of a fixed input buffer, starting
from the cache's Python counters (tokens seen, per layer) at `i*C`. Within a pass every shape and every Python
integer the forward uses is fixed (positions `arange(i*C, end)`, the KV slice `[0, end)` full attention reads, the
sliding window's ring slots), and the cache's buffers keep their addresses; so each pass is captured once and
replayed for every prompt of that shape. Small models prefill at the speed of the GPU instead of the speed of
Python launching a few thousand kernels (on an H200 a SmolLM2-135M GDN hybrid spent 68 ms of wall time on 26 ms of
GPU work for one 8K prompt: benchmarks/results/2026-12-02_h200_parity_and_dist).

Why one graph per chunk index, not one graph replayed for every chunk: chunk i's queries attend over `(i+1)*C`
keys, a length fixed per pass. One graph for all chunks would need a fixed key length, a masked pass over the whole
cache, which doubles full attention's work on average and leaves FlashAttention's causal kernels; graphs per index
keep exactly the kernels of the eager prefill. All graphs share one memory pool and are replayed in the order they
were captured, so the pool holds about one pass's activations, as the eager prefill's peak does.

What a pass must not do: read a tensor's value on the host (a synchronisation, which a capture forbids). The model's
forward reads none when it gets no attention mask, so only batches without padding take this path; the engine runs
left-padded batches through the forward (their layers check each chunk's mask on the host).

What a replay does not do: run Python. The cache's counters the passes' code advanced during the capture are saved
(`StaticCache.counters`) and restored after the replays. Without CUDA (`use_graph=False`) `run` executes the same
passes eagerly, each from the counters saved for it: the CPU tests run exactly the code the capture records.
"""

from __future__ import annotations

import torch

from jetnas.engine.cache import CacheCounters, StaticCache


def chunk_bounds(length: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """`[(begin, end), ...]` of the passes over `length` tokens in chunks of `chunk_size` (None: one pass)."""
    if length < 1:
        raise ValueError(f"a prefill needs at least one token, got length {length}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    step = chunk_size or length
    return [(b, min(b + step, length)) for b in range(0, length, step)]


class StaticPrefill:
    """Prefill of `batch_size` prompts of `length` tokens (no padding) into `cache`, in fixed-shape chunk passes,
    graph-captured on CUDA (see the module docstring).

        prefill = StaticPrefill(model, cache, batch_size, length, chunk_size)
        prefill.prepare()            # warm-up and capture (CUDA); leaves the cache empty
        logits = prefill.run(ids)    # [B, V], the last position's logits; the cache holds the prompts

    Args:
        model: a jetnas model (`JetNemotronForCausalLM`), in eval mode.
        cache: a `StaticCache` of this model for `batch_size` rows and at least `length` tokens.
        batch_size, length: the prompts' shape `[B, T]`.
        chunk_size: tokens per pass (None: the whole prompt in one pass).
        use_graph: capture CUDA graphs (default: when the model is on CUDA).
    """

    def __init__(self, model, cache: StaticCache, batch_size: int, length: int, chunk_size: int | None = None,
                 use_graph: bool | None = None):
        if cache.batch_size != batch_size or cache.max_length < length:
            raise ValueError(f"the cache holds {cache.batch_size} rows of {cache.max_length} tokens; a prefill of "
                             f"{batch_size} x {length} does not fit")
        self.model, self.cache = model, cache
        self.bounds = chunk_bounds(length, chunk_size)
        self.batch_size, self.length, self.chunk_size = batch_size, length, chunk_size
        device = next(model.parameters()).device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        self.graphs: list = []
        self.logits: torch.Tensor | None = None
        self.before: list[CacheCounters] = []  # the cache's counters at the start of each pass
        self.after: CacheCounters | None = None  # ... and after the last: a filled cache
        self._addresses: dict[str, int] = {}
        self.prepared = False

    def _pass(self, i: int) -> torch.Tensor:
        """Pass i: the model's forward over its columns of the input buffer, without an attention mask (positions
        continue from the cache's count), into the cache. Returns the pass's last-position logits `[B, V]`."""
        begin, end = self.bounds[i]
        out = self.model(self.ids[:, begin:end], past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _record(self) -> None:
        """Run (or capture) every pass in order from an empty cache, saving the counters each one starts from."""
        self.cache.reset()
        self.before = []
        pool = torch.cuda.graph_pool_handle() if self.use_graph else None
        self.graphs = []
        for i in range(len(self.bounds)):
            self.before.append(self.cache.counters())
            if self.use_graph:
                graph = torch.cuda.CUDAGraph()
                # one pool for all passes: each pass's temporaries are free again when the next one runs
                with torch.cuda.graph(graph, pool=pool):
                    self.logits = self._pass(i)
                self.graphs.append(graph)
            else:
                self.logits = self._pass(i)
        self.after = self.cache.counters()

    @torch.inference_mode()
    def prepare(self) -> None:
        """Fix every cache buffer's address, compile and autotune every kernel at every pass's shapes (one eager
        prefill), capture the passes (CUDA), and leave the cache empty. Without graphs: one eager prefill that
        saves the counters."""
        self.cache.reset()
        # one token allocates every linear layer's state buffers at their final shapes (as the decode step does)
        self.model(self.ids[:, :1], past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        if self.use_graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.cache.reset()
                for i in range(len(self.bounds)):  # kernels compile and fla autotunes here, outside the capture
                    self._pass(i)
            torch.cuda.current_stream().wait_stream(stream)
        self._record()
        self._addresses = self.cache.buffer_addresses()
        self.cache.reset()
        self.prepared = True

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prefill prompts `input_ids [B, T]` (every token real) into the cache, which ends holding them as after
        `T` tokens of the model's forward. Returns the last position's logits `[B, V]` (a copy)."""
        if tuple(input_ids.shape) != (self.batch_size, self.length):
            raise ValueError(f"this prefill was prepared for prompts of shape [{self.batch_size}, {self.length}], "
                             f"got {list(input_ids.shape)}")
        if not self.prepared:
            self.prepare()
        moved = [name for name, ptr in self.cache.buffer_addresses().items() if self._addresses.get(name) != ptr]
        if moved:  # a captured pass would write the stale buffer: wrong results with no error
            raise RuntimeError(f"cache buffers moved since the prefill was prepared: {', '.join(moved)}")
        self.ids.copy_(input_ids)
        if self.use_graph:
            for graph in self.graphs:
                graph.replay()
            logits = self.logits
        else:
            for i in range(len(self.bounds)):
                self.cache.restore(self.before[i])  # what the capture saw, not what the previous pass left
                logits = self._pass(i)
        self.cache.restore(self.after)
        return logits.clone()
