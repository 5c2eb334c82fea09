"""Fast inference for jetnas models (and plain HF Llama / Qwen models): preallocated caches, chunked prefill,
batched decoding. See `engine.py`."""

from jetnas.engine.cache import StaticCache
from jetnas.engine.engine import Engine, GenerateOutput, as_jetnas, sample_next

__all__ = ["Engine", "GenerateOutput", "StaticCache", "as_jetnas", "sample_next"]
