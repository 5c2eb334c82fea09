"""Training data as a weighted mixture of sources (stage 2: "more math and code data"), sampled deterministically.

A mixture spec lists sources with weights: `"web.bin:0.7,math.jsonl:0.2,hf:NAME@train:0.1"` (each source is any
`jetnas.train.data.resolve_data` spec; the weight is the last `:NUMBER` of an entry; weights are normalised). A spec
without weights is one ordinary source (comma-separated text files are then one concatenated corpus, as before).

Sampling is a pure function of (seed, sample index), so a resumed run sees exactly the batches an uninterrupted one
would, with no sampler state to save:

- sample i of the run (counting over all global batches) comes from source k when `u_i` falls in k's slice of
  [0, 1), with `u_i = frac(phase + i / golden ratio)` (a Weyl sequence, in exact 32-bit integer arithmetic; `phase`
  from the seed). Its low discrepancy keeps every prefix of the run within a few samples of the exact proportions,
  unlike independent draws whose error grows like sqrt(n);
- the c-th sample drawn from source k is window c of that source's own seeded permutation (`WindowBatcher`), so a
  source is visited window by window without repeats until it is exhausted, then in a new order.

Rank r of W takes the r-th contiguous share of each global batch, like `WindowBatcher`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from jetnas.train.data import TokenStream, WindowBatcher, resolve_data

_WEIGHTED = re.compile(r"^(?P<source>.+):(?P<weight>(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)$")
# 2^32 / golden ratio, odd: the Weyl step visits every 32-bit phase once per 2^32 samples
_WEYL_STEP = np.uint64(2654435769)
_MASK32 = np.uint64(2**32 - 1)


def parse_mixture(spec: str) -> list[tuple[str, float]] | None:
    """`"a.bin:0.7,b.txt:0.3"` -> `[("a.bin", 0.7), ("b.txt", 0.3)]` with weights normalised to sum 1; None when no
    entry carries a weight (the spec is one ordinary data source)."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    matches = [_WEIGHTED.match(e) for e in entries]
    if not any(matches):
        return None
    unweighted = [e for e, m in zip(entries, matches) if m is None]
    if unweighted:
        raise ValueError(f"data mixture {spec!r}: every source needs a weight (SOURCE:WEIGHT), these have none: "
                         f"{unweighted}")
    pairs = [(m.group("source"), float(m.group("weight"))) for m in matches]
    for source, weight in pairs:
        if weight <= 0:
            raise ValueError(f"data mixture {spec!r}: weight of {source!r} is {weight}; weights must be > 0 "
                             f"(leave a source out instead)")
    names = [s for s, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"data mixture {spec!r} lists a source twice")
    total = sum(w for _, w in pairs)
    return [(s, w / total) for s, w in pairs]


@dataclass
class Source:
    """One source of a mixture: its training tokens, weight (normalised) and held-out tail (None without one)."""

    name: str
    stream: TokenStream
    weight: float
    heldout: TokenStream | None = None


class MixtureBatcher:
    """Deterministic batches of `[batch_size, seq_len + 1]` windows drawn from weighted sources (see the module
    docstring); the same `windows` / `batch` interface as `WindowBatcher`, which the trainer uses.

    Args:
        sources: `(stream, weight)` pairs; weights need not be normalised.
        seq_len, batch_size: window length (plus one label token) and global batch size.
        seed: sets the Weyl phase and each source's window order.
    """

    def __init__(self, sources: list[tuple[TokenStream, float]], seq_len: int, batch_size: int, seed: int = 0):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        weights = np.array([w for _, w in sources], dtype=np.float64)
        if (weights <= 0).any():
            raise ValueError(f"mixture weights must be > 0, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        # each source's own window order, seeded apart from the others'
        self.sources = [WindowBatcher(s, seq_len, 1, seed=seed * 1_000_003 + k + 1) for k, (s, _) in enumerate(sources)]
        cumulative = np.cumsum(self.weights)[:-1]
        self._bounds = np.round(cumulative * 2**32).astype(np.uint64)
        self._phase = np.uint64(int(np.random.default_rng([seed, 0x6D6978]).integers(0, 2**32)))
        self._counted = 0  # counts of each source among samples [0, _counted), advanced as batches are requested
        self._counts = np.zeros(len(sources), dtype=np.int64)

    def source_of(self, samples: np.ndarray | int) -> np.ndarray:
        """Source index of each global sample index."""
        i = np.atleast_1d(np.asarray(samples, dtype=np.uint64))
        # uint64 arithmetic wraps modulo 2^64, a multiple of 2^32: the masked value is exact
        u = (self._phase + i * _WEYL_STEP) & _MASK32
        return np.searchsorted(self._bounds, u, side="right")

    def counts_before(self, sample: int) -> np.ndarray:
        """How many of the samples `[0, sample)` each source provided."""
        if sample < self._counted:
            self._counted, self._counts = 0, np.zeros_like(self._counts)
        chunk = 1 << 20
        while self._counted < sample:
            end = min(sample, self._counted + chunk)
            picks = self.source_of(np.arange(self._counted, end, dtype=np.uint64))
            self._counts += np.bincount(picks, minlength=len(self.sources))
            self._counted = end
        return self._counts.copy()

    def windows(self, step: int) -> list[tuple[int, int]]:
        """`(source, window)` of each sample of global batch `step`."""
        first = step * self.batch_size
        counts = self.counts_before(first)
        out = []
        for k in self.source_of(np.arange(first, first + self.batch_size, dtype=np.uint64)).tolist():
            out.append((k, self.sources[k].windows(int(counts[k]))[0]))
            counts[k] += 1
        return out

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank `rank`'s share (a contiguous slice) of global batch `step`: `[batch_size / world, seq_len + 1]`."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by the world size {world_size}")
        share = self.batch_size // world_size
        mine = self.windows(step)[rank * share : (rank + 1) * share]
        return torch.stack([self.sources[k].stream.tokens(w * self.seq_len, self.seq_len + 1) for k, w in mine])


@dataclass
class Mixture:
    """Resolved training data: one or more weighted sources (see `resolve_mixture`)."""

    sources: list[Source]
    weighted: bool

    def batcher(self, seq_len: int, batch_size: int, seed: int = 0) -> WindowBatcher | MixtureBatcher:
        """The batcher the trainer should use: the plain `WindowBatcher` for one unweighted source (bit-identical
        to passing that stream to the trainer), a `MixtureBatcher` otherwise."""
        if not self.weighted:
            return WindowBatcher(self.sources[0].stream, seq_len, batch_size, seed=seed)
        return MixtureBatcher([(s.stream, s.weight) for s in self.sources], seq_len, batch_size, seed=seed)

    def heldout(self) -> TokenStream | None:
        """Every source's held-out tail, concatenated (None when nothing was held out)."""
        tails = [s.heldout for s in self.sources if s.heldout is not None]
        if not tails:
            return None
        arrays = [np.asarray(t.array[t.start : t.end]) for t in tails]
        dtype = max((a.dtype for a in arrays), key=lambda d: d.itemsize)
        return TokenStream(np.concatenate([a.astype(dtype) for a in arrays]), name="heldout")

    def describe(self) -> list[dict]:
        return [{"source": s.name, "weight": round(s.weight, 6), "tokens": len(s.stream)} for s in self.sources]


def resolve_mixture(spec: str | None, tokenizer, teacher=None, teacher_eos: int | None = None, heldout_tokens: int = 0,
                    generated_tokens: int = 200_000, seed: int = 0, teacher_name: str = "teacher") -> Mixture:
    """Resolve a data spec that may be a weighted mixture (see the module docstring).

    Each source is resolved by `jetnas.train.data.resolve_data` (same arguments); `heldout_tokens` are held out of
    every source's tail. A spec without weights (or None: teacher-generated text) gives a one-source mixture.
    """
    pairs = parse_mixture(spec) if spec is not None else None
    entries = pairs if pairs is not None else [(spec, 1.0)]
    sources = []
    for name, weight in entries:
        stream, heldout = resolve_data(name, tokenizer, teacher=teacher, teacher_eos=teacher_eos,
                                       heldout_tokens=heldout_tokens, generated_tokens=generated_tokens, seed=seed,
                                       teacher_name=teacher_name)
        sources.append(Source("teacher-generated" if name is None else name, stream, weight, heldout))
    return Mixture(sources, weighted=pairs is not None)
