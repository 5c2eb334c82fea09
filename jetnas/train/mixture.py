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

**Answer flags** (answer-weighted distillation, `jetnas.train.stages.StageConfig.answer_weight`): a source that is a
recall `.bin` with its answer spans beside it (`<bin>.spans.npy`, `jetnas.train.recall_data`) can carry a per-token
mask, 1 on the tokens inside an answer span `[start, end)`, built once from the spans (a uint8 array as long as the
source's token file: 16 MB for the 4K recipes' 16M-token recall documents) and cut with the very window offsets of
the tokens. A batcher asked for them (`Mixture.batcher(answers=True)`) returns each batch as one int64 tensor
`[B, 2, T + 1]`: the ids in channel 0, the flags (0 / 1, zeros for sources without spans) in channel 1, so the
trainer's batch stays one tensor (row slices for micro-batches and ranks, the static buffer of a captured step) and
nothing changes for a batcher not asked (`[B, T + 1]` ids, as always). `split_answer_flags` reads either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jetnas.train.data import _MASK32, _WEYL_STEP, TokenStream, WindowBatcher, check_doc_starts, resolve_data

_WEIGHTED = re.compile(r"^(?P<source>.+):(?P<weight>(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)$")


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


def split_answer_flags(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(ids [B, T + 1], flags [B, T + 1] or None)` of a batcher's batch: `[B, T + 1]` ids (no flags), or
    `[B, 2, T + 1]` ids and answer flags (see the module docstring; views, no copies)."""
    if batch.dim() == 2:
        return batch, None
    if batch.dim() == 3 and batch.shape[1] == 2:
        return batch[:, 0], batch[:, 1]
    raise ValueError(f"a batch is [B, T + 1] token ids or [B, 2, T + 1] ids and answer flags, got shape "
                     f"{list(batch.shape)}")


def data_sources(spec: str | None) -> list[str]:
    """The source specs of a data spec: each source of a weighted mixture, the spec itself otherwise (text files
    listed with commas are one corpus); [] for None (teacher-generated text)."""
    if spec is None:
        return []
    pairs = parse_mixture(spec)
    return [spec] if pairs is None else [name for name, _ in pairs]


def carries_answer_spans(source: str) -> bool:
    """Whether a source spec is a token `.bin` with answer spans beside it (`jetnas.train.recall_data.spans_path`)."""
    from jetnas.train.recall_data import spans_path

    path = Path(source).expanduser()
    return path.suffix == ".bin" and path.is_file() and spans_path(path).is_file()


def answer_token_mask(spans: np.ndarray, length: int, name: str = "spans") -> np.ndarray:
    """`uint8 [length]`: 1 on every token inside one of the answer spans `spans[:, 0] <= t < spans[:, 1]` (`[M, 2+]`
    int token offsets, as `jetnas.train.recall_data` writes them), 0 elsewhere. ValueError (naming `name`) for a span
    outside `[0, length]` or with its end before its start: spans of another token file."""
    spans = np.asarray(spans)
    if spans.ndim != 2 or spans.shape[1] < 2:
        raise ValueError(f"{name}: answer spans must be [M, >= 2] (start, end, ...), got shape {list(spans.shape)}")
    starts, ends = spans[:, 0].astype(np.int64), spans[:, 1].astype(np.int64)
    bad = np.flatnonzero((starts < 0) | (ends < starts) | (ends > length))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name}: {len(bad)} answer spans lie outside its {length} tokens or end before they "
                         f"start, e.g. span {i}: [{int(starts[i])}, {int(ends[i])}) (spans of another .bin?)")
    # +1 at each start, -1 at each end: the running sum counts the spans covering a token
    edges = np.zeros(length + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    return (np.cumsum(edges[:-1], dtype=np.int32) > 0).astype(np.uint8)


def load_answer_mask(source: str, length: int) -> np.ndarray:
    """`answer_token_mask` of a recall `.bin`'s spans over its `length` tokens."""
    from jetnas.train.recall_data import load_spans, spans_path

    path = Path(source).expanduser()
    return answer_token_mask(load_spans(path), length, str(spans_path(path)))


def _window_flags(stream: TokenStream, mask: np.ndarray | None, start: int, length: int) -> torch.Tensor:
    """The flags of `stream.tokens(start, length)`: the same offsets into the mask (over the stream's whole array),
    int64; zeros without a mask."""
    if mask is None:
        return torch.zeros(length, dtype=torch.int64)
    return torch.from_numpy(mask[stream.start + start : stream.start + start + length].astype(np.int64))


class AnswerWindowBatcher(WindowBatcher):
    """A `WindowBatcher` (the same windows, the same ids) whose batches carry the answer flags of its one source:
    `[batch / world, 2, seq_len + 1]` (see the module docstring). `answers`: the uint8 mask over `stream.array`."""

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, seed: int = 0, *, answers: np.ndarray):
        super().__init__(stream, seq_len, batch_size, seed=seed)  # recall documents keep the grid (no doc_starts)
        if len(answers) != len(stream.array):
            raise ValueError(f"{stream.name}: the answer mask covers {len(answers)} tokens, its token file "
                             f"{len(stream.array)}")
        self.answers = answers

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        ids = super().batch(step, rank, world_size)
        flags = torch.stack([_window_flags(self.stream, self.answers, s, self.seq_len + 1)
                             for s in self.share(step, rank, world_size)])
        return torch.stack([ids, flags], dim=1)


@dataclass
class Source:
    """One source of a mixture: its training tokens, weight (normalised), held-out tail (None without one) and
    answer mask (`answer_token_mask` over the token file, train and held-out parts; None when not loaded)."""

    name: str
    stream: TokenStream
    weight: float
    heldout: TokenStream | None = None
    answers: np.ndarray | None = None


class MixtureBatcher:
    """Deterministic batches of `[batch_size, seq_len + 1]` windows drawn from weighted sources (see the module
    docstring); the same `windows` / `batch` interface as `WindowBatcher`, which the trainer uses.

    Args:
        sources: `(stream, weight)` pairs; weights need not be normalised.
        seq_len, batch_size: window length (plus one label token) and global batch size.
        seed: sets the Weyl phase and each source's window order.
        answers: per source, its answer mask (uint8 over `stream.array`) or None: the batches then carry answer
            flags, `[B, 2, seq_len + 1]` (module docstring). None (default): `[B, seq_len + 1]` ids.
        doc_starts, eos_id: per source, the share of its samples that start at a document's first token
            (`WindowBatcher`; None: 0 for all), and the end-of-document id that marks them.
    """

    def __init__(self, sources: list[tuple[TokenStream, float]], seq_len: int, batch_size: int, seed: int = 0,
                 answers: list[np.ndarray | None] | None = None, doc_starts: list[float] | None = None,
                 eos_id: int | None = None):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        doc_starts = [0.0] * len(sources) if doc_starts is None else doc_starts
        if len(doc_starts) != len(sources):
            raise ValueError(f"doc_starts holds {len(doc_starts)} shares for {len(sources)} sources")
        if answers is not None:
            if len(answers) != len(sources):
                raise ValueError(f"answers holds {len(answers)} masks for {len(sources)} sources")
            for (stream, _), mask in zip(sources, answers):
                if mask is not None and len(mask) != len(stream.array):
                    raise ValueError(f"{stream.name}: the answer mask covers {len(mask)} tokens, its token file "
                                     f"{len(stream.array)}")
        self.answers = answers
        weights = np.array([w for _, w in sources], dtype=np.float64)
        if (weights <= 0).any():
            raise ValueError(f"mixture weights must be > 0, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        # each source's own window order, seeded apart from the others'
        self.sources = [WindowBatcher(s, seq_len, 1, seed=seed * 1_000_003 + k + 1, doc_starts=d, eos_id=eos_id)
                        for k, ((s, _), d) in enumerate(zip(sources, doc_starts))]
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
        """`(source, window)` of each sample of global batch `step`, on the sources' fixed grids (without document
        starts; `starts` gives the offsets)."""
        return [(k, self.sources[k].windows(c)[0]) for k, c in self._draws(step)]

    def starts(self, step: int) -> list[tuple[int, int]]:
        """`(source, token offset)` of each sample of global batch `step`."""
        return [(k, self.sources[k].start_of(c)) for k, c in self._draws(step)]

    def _draws(self, step: int) -> list[tuple[int, int]]:
        """`(source, how many samples that source gave before)` of each sample of global batch `step`."""
        first = step * self.batch_size
        counts = self.counts_before(first)
        out = []
        for k in self.source_of(np.arange(first, first + self.batch_size, dtype=np.uint64)).tolist():
            out.append((k, int(counts[k])))
            counts[k] += 1
        return out

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank `rank`'s share (a contiguous slice) of global batch `step`: `[batch_size / world, seq_len + 1]`
        (`[batch_size / world, 2, seq_len + 1]` with answer flags)."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by the world size {world_size}")
        share = self.batch_size // world_size
        mine = self.starts(step)[rank * share : (rank + 1) * share]
        ids = torch.stack([self.sources[k].stream.tokens(s, self.seq_len + 1) for k, s in mine])
        if self.answers is None:
            return ids
        flags = torch.stack([_window_flags(self.sources[k].stream, self.answers[k], s, self.seq_len + 1)
                             for k, s in mine])
        return torch.stack([ids, flags], dim=1)


@dataclass
class Mixture:
    """Resolved training data: one or more weighted sources (see `resolve_mixture`)."""

    sources: list[Source]
    weighted: bool

    def batcher(self, seq_len: int, batch_size: int, seed: int = 0, answers: bool = False, doc_starts: float = 0.0,
                eos_id: int | None = None) -> WindowBatcher | MixtureBatcher:
        """The batcher the trainer should use: the plain `WindowBatcher` for one unweighted source (bit-identical
        to passing that stream to the trainer), a `MixtureBatcher` otherwise. `answers`: its batches carry the
        sources' answer flags (`[B, 2, seq_len + 1]`, the same windows and ids); at least one source must have its
        answer mask loaded (`resolve_mixture(answer_spans=True)`), else ValueError naming the sources.
        `doc_starts`: the share of each text source's samples that start at a document's first token (after
        `eos_id`; `WindowBatcher`); recall documents (sources that carry answer spans) keep their grid, which
        their documents already line up with."""
        if answers and all(s.answers is None for s in self.sources):
            raise ValueError(f"answer flags need a source with answer spans (a recall .bin with its .spans.npy, "
                             f"resolved with answer_spans=True); the sources are {[s.name for s in self.sources]}")
        check_doc_starts(doc_starts)
        shares = [0.0 if carries_answer_spans(s.name) else doc_starts for s in self.sources]
        if doc_starts and not any(shares):
            raise ValueError(f"doc_starts={doc_starts} starts rows at text documents, but every source is recall "
                             f"documents (already aligned with the rows): {[s.name for s in self.sources]}")
        if not self.weighted:
            if answers:
                return AnswerWindowBatcher(self.sources[0].stream, seq_len, batch_size, seed=seed,
                                           answers=self.sources[0].answers)
            return WindowBatcher(self.sources[0].stream, seq_len, batch_size, seed=seed, doc_starts=shares[0],
                                 eos_id=eos_id)
        return MixtureBatcher([(s.stream, s.weight) for s in self.sources], seq_len, batch_size, seed=seed,
                              answers=[s.answers for s in self.sources] if answers else None, doc_starts=shares,
                              eos_id=eos_id)

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
                    generated_tokens: int = 200_000, seed: int = 0, teacher_name: str = "teacher",
                    answer_spans: bool = False) -> Mixture:
    """Resolve a data spec that may be a weighted mixture (see the module docstring).

    Each source is resolved by `jetnas.train.data.resolve_data` (same arguments); `heldout_tokens` are held out of
    every source's tail. A spec without weights (or None: teacher-generated text) gives a one-source mixture.
    `answer_spans`: also build the answer mask (`Source.answers`) of every source that carries answer spans
    (`carries_answer_spans`).
    """
    pairs = parse_mixture(spec) if spec is not None else None
    entries = pairs if pairs is not None else [(spec, 1.0)]
    sources = []
    for name, weight in entries:
        stream, heldout = resolve_data(name, tokenizer, teacher=teacher, teacher_eos=teacher_eos,
                                       heldout_tokens=heldout_tokens, generated_tokens=generated_tokens, seed=seed,
                                       teacher_name=teacher_name)
        answers = None
        if answer_spans and name is not None and carries_answer_spans(name):
            answers = load_answer_mask(name, len(stream.array))
        sources.append(Source("teacher-generated" if name is None else name, stream, weight, heldout, answers))
    return Mixture(sources, weighted=pairs is not None)
