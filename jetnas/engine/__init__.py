"""Fast inference for jetnas models (and plain HF Llama / Qwen models): preallocated caches, chunked prefill,
batched decoding. See `engine.py`; `graph.py` is the decode step captured in a CUDA graph, `prefill.py` the prefill's
chunk passes captured the same way."""

from jetnas.engine.cache import StaticCache
from jetnas.engine.engine import Engine, GenerateOutput, as_jetnas, sample_next

__all__ = ["Engine", "GenerateOutput", "StaticCache", "as_jetnas", "sample_next"]
