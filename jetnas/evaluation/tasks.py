"""Built-in tasks that need no network, named the same way everywhere (`jetnas eval`, the searches, recipes):

| name | what | metrics |
|---|---|---|
| `ppl:PATH` | perplexity of a text file (`.jsonl[.gz]` with "text", `.txt`) or token file (`.bin`, uint16) | nll, ppl, bits_per_byte |
| `mc:PATH` | multiple choice rows `{"question", "choices", "label"}` | acc, acc_norm, correct_nll |
| `cloze:PATH` | LAMBADA-style rows `{"context", "target"}` | acc (greedy exact match), ppl |
| `retrieval:KIND@LENGTH` | synthetic retrieval (`kv`, `needle`, `mqar`) at LENGTH tokens of context | acc, target_nll |

Task files are validated as they are read (`jetnas.validation`): an empty file, a row without its fields or with
a label outside its choices, invalid JSON, or a token id beyond the model's vocabulary is an `InputError` naming the
file, line, field and value, never a score of 0 over nothing.

Options follow a `?`: `mc:mmlu_test.jsonl.gz?shots=5&fewshot=mmlu_dev.jsonl&limit=200`, `retrieval:kv@4096?n=50&seed=1`,
`ppl:val.bin?tokens=100000&window=1024&stride=512`. Multiple-choice prompts follow lm-evaluation-harness's tasks (MMLU as
lettered questions, ARC/PIQA as "Question: ...\\nAnswer:", HellaSwag as the context itself), chosen by each row's
"task" field, so built-in and harness scores agree.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import math
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch

from jetnas.evaluation.names import is_builtin  # noqa: F401 - where callers have found it
from jetnas.evaluation.scoring import LanguageModel, Score, score_continuations, token_nll
from jetnas.validation import InputError, check_token_ids, iter_jsonl, open_token_file, read_texts, show

LETTERS = "ABCDEFGHIJ"


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows (JSON objects) of a `.jsonl(.gz)` task file; an empty file or a bad line is an `InputError`."""
    return [row for _, row in _numbered_rows(path)]


def _numbered_rows(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task data file {str(path)!r} does not exist")
    rows = list(iter_jsonl(path))
    if not rows:
        raise InputError(f"{path}: no rows (an empty task file)")
    return rows


def _check_mc_row(path, lineno: int, row: dict) -> None:
    where = f"{path} line {lineno}"
    for key in ("question", "choices", "label"):
        if key not in row:
            raise InputError(f"{where}: no {key!r} field (multiple-choice rows need question, choices, label; "
                             f"this one has {', '.join(sorted(row)) or 'none'})")
    if not isinstance(row["question"], str):
        raise InputError(f"{where}: question={show(row['question'])}: must be a string")
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise InputError(f"{where}: choices={show(choices)}: must be a list of at least 2 strings")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise InputError(f"{where}: label={show(label)}: must be the index of the answer among its "
                         f"{len(choices)} choices")


class Task(ABC):
    """A named evaluation: `evaluate(lm)` returns a flat dict of metrics."""

    name: str

    @abstractmethod
    def evaluate(self, lm: LanguageModel, progress: bool = False) -> dict[str, float]:
        """Run the task on `lm`; metrics are floats, plus `n` (rows scored)."""

    def evaluate_rows(self, lm: LanguageModel, progress: bool = False) -> tuple[dict[str, float], dict | None]:
        """`evaluate`'s metrics and the per-item outcomes behind them (`jetnas.evaluation.paired`'s format: one
        0/1 per scored item for each accuracy metric, `group` where items share a row), or None where the task has
        no per-item accuracy (perplexity)."""
        return self.evaluate(lm, progress), None

    @property
    def primary_metric(self) -> str:
        """The metric reports and searches rank by."""
        return "acc"

    @property
    def higher_is_better(self) -> bool:
        return True


class _RowsTask(Task):
    """A task whose metrics come from per-item outcomes: it implements `evaluate_rows`, and `evaluate` is that
    without the outcomes."""

    def evaluate(self, lm: LanguageModel, progress: bool = False) -> dict[str, float]:
        return self.evaluate_rows(lm, progress)[0]

    @abstractmethod
    def evaluate_rows(self, lm: LanguageModel, progress: bool = False) -> tuple[dict[str, float], dict]:
        """The metrics and the per-item outcomes behind them (see `Task.evaluate_rows`)."""


# ---------------------------------------------------------------------------------------------------------------
# multiple choice


def mc_prompt(row: dict) -> tuple[str, list[str]]:
    """Context and continuations of a multiple-choice row, in lm-evaluation-harness's format for its task."""
    task = row.get("task", "")
    if task == "mmlu":
        lines = [row["question"].strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
        return "\n".join(lines) + "\nAnswer:", [f" {LETTERS[i]}" for i in range(len(row["choices"]))]
    if task in ("hellaswag", "continuation"):  # continuation: jetnas.evaluation.continuation's development task
        return row["question"], [f" {c}" for c in row["choices"]]
    return f"Question: {row['question']}\nAnswer:", [f" {c}" for c in row["choices"]]


def _mmlu_description(row: dict) -> str:
    subject = row.get("subject", "")
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n" \
        if row.get("task") == "mmlu" and subject else ""


@dataclass
class MultipleChoiceTask(_RowsTask):
    """Multiple choice by log-likelihood of each answer.

    Metrics: `acc` (highest total log-probability), `acc_norm` (per character of the answer, as the harness),
    `correct_nll` (mean negative log-likelihood per token of the correct answer: PostNAS's objective for
    knowledge tasks, smooth where accuracy is coarse).
    """

    path: str
    shots: int = 0
    fewshot: str | None = None
    limit: int | None = None
    name: str = ""

    def __post_init__(self):
        self.name = self.name or f"mc:{Path(self.path).name}"
        _check_options(self.name, shots=(self.shots, 0), limit=(self.limit, 1))
        numbered = _numbered_rows(self.path)
        for lineno, row in numbered:
            _check_mc_row(self.path, lineno, row)
        self._rows = [row for _, row in numbered]
        if self.fewshot:
            pool = _numbered_rows(self.fewshot)
            for lineno, row in pool:
                _check_mc_row(self.fewshot, lineno, row)
            self._shots_pool = [row for _, row in pool]
        else:
            self._shots_pool = self._rows
        self._by_subject: dict | None = None

    def rows(self) -> list[dict]:
        return self._rows[: self.limit] if self.limit else self._rows

    def context(self, row: dict) -> str:
        """The full context of a row: task description (MMLU), few-shot examples, the question."""
        shots = []
        if self.shots:
            # the first `shots` rows of the pool on the row's subject, the row itself excluded; the pool is indexed
            # by subject once (scanning it whole for every row was quadratic: MMLU's test set as its own pool)
            if self._by_subject is None:
                self._by_subject = {}
                for r in self._shots_pool:
                    self._by_subject.setdefault(r.get("subject"), []).append(r)
            same = []
            for r in self._by_subject.get(row.get("subject"), []):
                if len(same) == self.shots:
                    break
                if r is not row and r.get("id") != row.get("id"):
                    same.append(r)
            for ex in same:
                ctx, conts = mc_prompt(ex)
                shots.append(ctx + conts[ex["label"]])
        ctx, _ = mc_prompt(row)
        return _mmlu_description(row) + "".join(s + "\n\n" for s in shots) + ctx

    def evaluate_rows(self, lm: LanguageModel, progress: bool = False) -> tuple[dict[str, float], dict]:
        rows = self.rows()
        requests, spans, owners = [], [], []
        for number, row in enumerate(rows):
            ctx = self.context(row)
            conts = mc_prompt(row)[1]
            spans.append((len(requests), len(conts)))
            requests += [(ctx, c) for c in conts]
            owners += [number] * len(conts)
        scores = score_continuations(lm, requests, progress=self.name if progress else None, rows=owners)
        outcomes = mc_outcomes(rows, requests, scores, spans)
        n = max(len(rows), 1)
        # `chance`: a random pick's expected accuracy, 1 / choices averaged over the rows (what `retention` measures
        # margins from, for files it has no standard figure for)
        metrics = {"acc": sum(outcomes["acc"]) / n, "acc_norm": sum(outcomes["acc_norm"]) / n,
                   "correct_nll": sum(outcomes.pop("correct_nll")) / n, "n": len(rows),
                   "chance": sum(1 / count for _, count in spans) / n}
        return metrics, outcomes


def mc_outcomes(rows, requests, scores: list[Score], spans) -> dict[str, list]:
    """Per row: `acc` and `acc_norm` (1 if the answer ranks first), the answer's NLL per token, and every choice's
    total log-likelihood (`ll`, 4 decimals: where two models' discrimination differs, row by row)."""
    out = {"acc": [], "acc_norm": [], "correct_nll": [], "ll": []}
    for row, (start, n) in zip(rows, spans):
        s = scores[start : start + n]
        ll = np.array([x.logprob for x in s])
        # the harness normalises by the answer's length in characters, leading delimiter excluded
        chars = np.array([max(len(requests[start + i][1].lstrip(" ")), 1) for i in range(n)])
        out["acc"].append(int(ll.argmax() == row["label"]))
        out["acc_norm"].append(int((ll / chars).argmax() == row["label"]))
        out["correct_nll"].append(-s[row["label"]].logprob / s[row["label"]].num_tokens)
        out["ll"].append([round(float(x), 4) for x in ll])
    return out


# ---------------------------------------------------------------------------------------------------------------
# cloze


@dataclass
class ClozeTask(_RowsTask):
    """Predict the last word (LAMBADA): `acc` = greedy decoding reproduces `" " + target` exactly; `ppl` of the
    target tokens."""

    path: str
    limit: int | None = None
    name: str = ""

    def __post_init__(self):
        self.name = self.name or f"cloze:{Path(self.path).name}"
        _check_options(self.name, limit=(self.limit, 1))
        numbered = _numbered_rows(self.path)
        for lineno, row in numbered:
            for key in ("context", "target"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    what = f"{key}={show(row[key])}" if key in row else f"no {key!r} field"
                    raise InputError(f"{self.path} line {lineno}: {what}: cloze rows need non-empty context and "
                                     f"target strings")
        self._rows = [row for _, row in numbered]

    def evaluate_rows(self, lm: LanguageModel, progress: bool = False) -> tuple[dict[str, float], dict]:
        rows = self._rows[: self.limit] if self.limit else self._rows
        scores = score_continuations(lm, [(r["context"], " " + r["target"]) for r in rows],
                                     progress=self.name if progress else None)
        n = max(len(rows), 1)
        hits = [int(s.is_greedy) for s in scores]
        return ({"acc": sum(hits) / n, "ppl": math.exp(-sum(s.logprob for s in scores) / n), "n": len(rows)},
                {"acc": hits})


# ---------------------------------------------------------------------------------------------------------------
# perplexity


def read_tokens(path: str | Path, lm: LanguageModel, max_tokens: int | None) -> tuple[torch.Tensor, int | None]:
    """Token stream of a file and, for text, its UTF-8 byte count (for bits per byte)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    if path.suffix == ".bin":
        data = open_token_file(path)
        n = len(data) if max_tokens is None else min(len(data), max_tokens)
        if lm.vocab_size is not None:
            check_token_ids(data[:n], lm.vocab_size, str(path))
        return torch.from_numpy(np.asarray(data[:n], dtype=np.int64)), None
    texts = read_texts(path)
    ids, used = [], 0
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    for text in texts:
        piece = lm.encode(text)
        ids += piece + ([eos] if eos is not None and len(texts) > 1 else [])
        used += len(text.encode("utf-8"))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens else ids
    return torch.tensor(ids), used if max_tokens is None or len(ids) < max_tokens else None


@dataclass
class PerplexityTask(Task):
    """Language-model loss on held-out text: `nll` per token, `ppl`, and for text `bits_per_byte`."""

    path: str
    tokens: int | None = None
    window: int = 1024
    stride: int | None = None
    name: str = ""

    def __post_init__(self):
        self.name = self.name or f"ppl:{Path(self.path).name}"
        _check_options(self.name, tokens=(self.tokens, 2), window=(self.window, 1), stride=(self.stride, 1))

    @property
    def primary_metric(self) -> str:
        return "nll"

    @property
    def higher_is_better(self) -> bool:
        return False

    def evaluate(self, lm: LanguageModel, progress: bool = False) -> dict[str, float]:
        ids, nbytes = read_tokens(self.path, lm, self.tokens)
        if len(ids) < 2:
            raise InputError(f"{self.path}: {len(ids)} token(s): perplexity needs at least 2 (the file holds "
                             f"almost no text)")
        nll, count = token_nll(lm, ids, min(self.window, lm.max_length), self.stride,
                               progress=self.name if progress else None)
        out = {"nll": nll / max(count, 1), "ppl": math.exp(nll / max(count, 1)), "n": count}
        if nbytes:
            out["bits_per_byte"] = nll / math.log(2) / nbytes
        return out


# ---------------------------------------------------------------------------------------------------------------
# synthetic retrieval

_ADJ = ["red", "blue", "green", "silver", "golden", "quiet", "northern", "ancient", "hidden", "narrow", "bright",
        "wooden", "broken", "hollow", "royal", "painted", "frozen", "distant", "little", "crowded"]
_NOUNS = ["door", "garden", "tower", "bridge", "library", "harbor", "market", "chapel", "cellar", "gate", "mill",
          "station", "orchard", "palace", "theater", "workshop", "cabin", "lighthouse", "museum", "stable"]
_CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Hanoi", "Dublin", "Nairobi", "Quito", "Kyoto", "Tunis", "Riga",
           "Perth", "Havana", "Bergen", "Porto", "Seville", "Tallinn", "Bogota", "Accra", "Krakow"]
_SUBJECTS = ["The farmer", "A young teacher", "The old sailor", "My neighbor", "The committee", "A tired traveler",
             "The museum guide", "Her brother", "The baker", "A local historian", "The river", "The small village"]
_VERBS = ["walked along", "wrote about", "looked at", "talked about", "remembered", "painted", "visited",
          "described", "carried water to", "waited near", "cleaned", "photographed"]
_OBJECTS = ["the stone wall", "the harvest", "the evening market", "a long letter", "the winter storm", "the hills",
            "the old railway", "a quiet street", "the fishing boats", "the school garden", "the city square",
            "the church bells"]
_TAILS = ["before the sun went down.", "while the rain kept falling.", "for most of the afternoon.",
          "and then went home.", "with great care.", "as people passed by.", "on a cold morning in spring.",
          "without saying a word.", "during the long summer.", "near the edge of the forest."]


def _filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"


def _insert(lines: list[str], facts: list[tuple[float, str]]) -> list[str]:
    """Filler lines with each fact inserted at its relative depth (0 = start, 1 = end)."""
    out = list(lines)
    for depth, fact in sorted(facts, reverse=True):
        out.insert(round(depth * len(lines)), fact)
    return out


RETRIEVAL_KINDS = ("kv", "needle", "mqar")

#: `RetrievalTask.make_rows`'s rows, by task and tokenizer (the rows of one evaluation are ~1-4 MB of text)
_ROWS: dict[tuple, list] = {}


def _tokenizer_key(tokenizer) -> str | None:
    """What makes two tokenizer objects encode alike: a fast tokenizer's full serialisation, hashed once per
    object (the teacher's and the hybrid's evaluations load separate copies of the same tokenizer); None (rows not
    kept) for anything else."""
    key = getattr(tokenizer, "_jetnas_rows_key", None)
    if key is None and tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:  # not a fast tokenizer: nothing to fingerprint, so its rows are not kept
            return None
        key = hashlib.sha256(backend.to_str().encode()).hexdigest()
        with contextlib.suppress(AttributeError):  # an object without a __dict__: hashed again next time
            tokenizer._jetnas_rows_key = key
    return key


@dataclass
class RetrievalTask(_RowsTask):
    """Synthetic retrieval over a long context, deterministic from `seed`.

    - `kv`: `keys` facts "The special code for <city> is <4 digits>." spread through filler prose; one is asked
      for at the end (several similar keys: harder than the needle).
    - `needle`: "The special magic number for <city> is <7 digits>." hidden at a random depth in filler prose;
      asked for at the end.
    - `mqar`: multi-query associative recall: "<word> is <number>" pairs, then several of them queried in turn.

    Each row fills `length` tokens of the model's tokenizer. `acc` is the fraction of answers that greedy
    decoding reproduces exactly; `target_nll` the mean per-token NLL of the answers. `acc@<lo>-<hi>` (with
    `n@<lo>-<hi>` answers) is the accuracy of the answers whose source statement starts `lo` to `hi` tokens before
    the answer (buckets doubling from 128): where a model's retrieval gives out, e.g. beyond a sliding window.
    """

    kind: str
    length: int
    n: int = 20
    seed: int = 0
    queries: int = 8
    keys: int = 8
    name: str = ""
    rows: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.kind not in RETRIEVAL_KINDS:
            raise ValueError(f"retrieval kind must be one of {RETRIEVAL_KINDS}, got {self.kind!r}")
        if self.length < 64:
            raise ValueError(f"retrieval length must be >= 64 tokens, got {self.length}")
        _check_options(f"retrieval:{self.kind}@{self.length}", n=(self.n, 1), queries=(self.queries, 1),
                       keys=(self.keys, 1), seed=(self.seed, 0))
        self.name = self.name or f"retrieval:{self.kind}@{self.length}"

    def make_rows(self, lm: LanguageModel) -> list[list[tuple[str, bool]]]:
        """Rows as text segments `(text, is_answer)`, the answers starting with a space. Built once per process
        for the same task and tokenizer (`_ROWS`): an evaluation of the teacher after the hybrid's, and a training
        stage's development rows at every evaluation, reuse them (needle@4096's 100 rows: ~13 s of tokenizing)."""
        tokenizer = _tokenizer_key(getattr(lm, "tokenizer", None))  # any object with `encode` will do
        key = (self.kind, self.length, self.n, self.seed, self.queries, self.keys, tokenizer)
        rows = _ROWS.get(key) if tokenizer is not None else None
        if rows is None:
            maker = {"kv": self._kv, "needle": self._needle, "mqar": self._mqar}[self.kind]
            rows = [maker(random.Random(f"{self.seed}-{i}"), lm) for i in range(self.n)]
            if tokenizer is not None:
                _ROWS[key] = rows
        return [list(row) for row in rows]

    def _fill(self, rng, lm, make_line) -> tuple[list[str], list[int]]:
        """Lines from `make_line` until they alone take `length` tokens (trimmed to fit later), and each line's
        token count. Lines are drawn in blocks and encoded a block at a time; the lines past the one that reaches
        `length` are dropped, so the result is the one-line-at-a-time loop's (`rng` is not used after filling)."""
        lines, counts, used = [], [], 0
        while used < self.length:
            block, error = [], None
            for _ in range(max(8, (self.length - used) // 8)):
                try:
                    block.append(make_line(rng))
                except ValueError as err:  # mqar's keys ran out: an error only if the lines drawn fall short
                    error = err
                    break
            texts = [" " + x for x in block]
            encoded = lm.encode_many(texts) if hasattr(lm, "encode_many") else [lm.encode(t) for t in texts]
            for line, ids in zip(block, encoded):
                lines.append(line)
                counts.append(len(ids))
                used += len(ids)
                if used >= self.length:
                    break
            if used < self.length and error is not None:
                raise error
        return lines, counts

    def _fit(self, lm, filled: tuple[list[str], list[int]], build) -> list[tuple[str, bool]]:
        """`build(lines)` with as many leading filler lines as fit in `length` tokens, the whole row counted.

        The row's token count grows with the lines, so the longest fitting prefix is a boundary: it is searched
        from the estimate the lines' own counts give (the row's fixed text plus each line's tokens), galloping
        outward, then bisecting; 2-4 encodings of the row instead of a bisection's ~9 from scratch
        (`_fit_reference`, which this agrees with: tests/evaluation/test_tasks.py)."""
        lines, counts = filled
        n = len(lines)

        def fits(k: int) -> bool:
            return len(lm.encode("".join(t for t, _ in build(lines[:k])))) <= self.length

        budget = self.length - len(lm.encode("".join(t for t, _ in build([]))))
        guess = bisect.bisect_right(list(itertools.accumulate(counts)), budget)
        if fits(guess):  # lo fits; look up for the first prefix that does not
            lo, hi, step = guess, n, 1
            while lo + step <= n:
                if not fits(lo + step):
                    hi = lo + step - 1
                    break
                lo, step = lo + step, step * 2
        else:  # guess does not fit; look down for one that does (0 lines: taken as is, as the bisection does)
            lo, hi, step = 0, guess - 1, 1
            while guess - step > 0:
                if fits(guess - step):
                    lo = guess - step
                    break
                hi, step = guess - step - 1, step * 2
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return build(lines[:lo])

    def _fit_reference(self, lm, lines: list[str], build) -> list[tuple[str, bool]]:
        """`_fit` by plain bisection over every prefix length: the readable definition."""
        lo, hi = 0, len(lines)
        while lo < hi:  # the longest prefix of filler whose row fits
            mid = (lo + hi + 1) // 2
            if len(lm.encode("".join(t for t, _ in build(lines[:mid])))) <= self.length:
                lo = mid
            else:
                hi = mid - 1
        return build(lines[:lo])

    def _kv(self, rng, lm):
        cities = rng.sample(_CITIES, min(self.keys, len(_CITIES)))
        facts = [(rng.random(), f"The special code for {c} is {rng.randint(1000, 9999)}.") for c in cities]
        asked = rng.randrange(len(facts))
        city, code = cities[asked], facts[asked][1].rsplit(" ", 1)[1].rstrip(".")

        def build(lines):
            return [(" ".join(_insert(lines, facts)) +
                     f"\nWhat is the special code for {city}? The special code for {city} is", False), (" " + code, True)]

        return self._fit(lm, self._fill(rng, lm, _filler_sentence), build)

    def _needle(self, rng, lm):
        city, number = rng.choice(_CITIES), str(rng.randint(1_000_000, 9_999_999))
        facts = [(rng.random(), f"The special magic number for {city} is {number}.")]

        def build(lines):
            return [(" ".join(_insert(lines, facts)) + f"\nWhat is the special magic number for {city}? "
                     f"The special magic number for {city} is", False), (" " + number, True)]

        return self._fit(lm, self._fill(rng, lm, _filler_sentence), build)

    def _mqar(self, rng, lm):
        words = [f"{a} {b}" for a in _ADJ for b in _NOUNS]
        rng.shuffle(words)
        pairs = [(w, str(rng.randint(10, 99))) for w in words]
        order = list(range(len(pairs)))
        rng.shuffle(order)

        def build(lines):
            n = len(lines)
            segments = [(" ".join(f"{w} is {v}." for w, v in pairs[:n]) + "\nNow recall.", False)]
            for i in [i for i in order if i < n][: self.queries]:
                segments += [(f"\n{pairs[i][0]} is", False), (" " + pairs[i][1], True)]
            return segments

        statements = iter(f"{w} is {v}." for w, v in pairs)

        def statement(_):
            try:
                return next(statements)
            except StopIteration:
                raise ValueError(f"retrieval:mqar has {len(pairs)} distinct keys, fewer than {self.length} tokens "
                                 f"need; use kv or needle for longer contexts") from None

        return self._fit(lm, self._fill(rng, lm, statement), build)

    def evaluate_rows(self, lm: LanguageModel, progress: bool = False) -> tuple[dict[str, float], dict]:
        rows = self.make_rows(lm)
        # each answer is a continuation of everything before it (earlier answers given, teacher-forced)
        requests, owners = [], []
        for number, segments in enumerate(rows):
            context = ""
            for text, is_answer in segments:
                if is_answer:
                    requests.append((context, text))
                    owners.append(number)
                context += text
        scores = score_continuations(lm, requests, progress=self.name if progress else None, rows=owners)
        n = max(len(scores), 1)
        out = {"acc": sum(s.is_greedy for s in scores) / n,
               "target_nll": sum(-s.logprob / s.num_tokens for s in scores) / n, "n": len(scores)}
        buckets: dict[tuple[int, int], list[bool]] = {}
        for (context, answer), score in zip(requests, scores):
            distance = source_distance(lm, context, answer)
            if distance is not None:
                buckets.setdefault(distance_bucket(distance), []).append(score.is_greedy)
        for lo, hi in sorted(buckets):
            hits = buckets[lo, hi]
            out[f"acc@{lo}-{hi}"] = sum(hits) / len(hits)
            out[f"n@{lo}-{hi}"] = len(hits)
        # a row's answers share its document: the row is the unit a paired interval resamples
        return out, {"acc": [int(s.is_greedy) for s in scores], "group": owners}


def source_distance(lm: LanguageModel, context: str, answer: str) -> int | None:
    """How many tokens before the end of `context` the statement that holds `answer` starts: the statement is the
    question's last clause (after its last newline or "? ") followed by the answer, found as a whole phrase in the
    context (mqar's "red apple is 42.", the needle's "The special magic number for X is 1234567."); None if absent."""
    phrase = re.split(r"\n|\? ", context)[-1] + answer
    found = re.search(r"(?<![\w])" + re.escape(phrase) + r"(?![\w])", context)
    return None if found is None else len(lm.encode(context[found.start():]))


def distance_bucket(distance: int, first: int = 128) -> tuple[int, int]:
    """`(lo, hi)` of the doubling bucket holding `distance` tokens: [0, 127], [128, 255], [256, 511], ..."""
    if distance < first:
        return 0, first - 1
    lo = first
    while distance >= 2 * lo:
        lo *= 2
    return lo, 2 * lo - 1


# ---------------------------------------------------------------------------------------------------------------
# names


def _check_options(task: str, **options: tuple[int | None, int]) -> None:
    """Each option `name=(value, minimum)` is None or an integer >= minimum."""
    for name, (value, minimum) in options.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise InputError(f"task {task!r}: option {name}={show(value)}: must be an integer >= {minimum}")


def _options(text: str) -> dict[str, str]:
    return dict(parse_qsl(text, keep_blank_values=True, strict_parsing=True)) if text else {}


def _int(options: dict, key: str, spec: str) -> int | None:
    if key not in options:
        return None
    try:
        return int(options.pop(key))
    except ValueError as err:
        raise ValueError(f"task {spec!r}: option {key} must be an integer") from err


def parse_task(spec: str) -> Task:
    """Build a built-in task from its name (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"task {spec!r} is not of the form KIND:ARG (ppl:PATH, mc:PATH, cloze:PATH, "
                         f"retrieval:KIND@LENGTH)")
    target, _, query = rest.partition("?")
    options = _options(query)
    if kind == "mc":
        task = MultipleChoiceTask(target, shots=_int(options, "shots", spec) or 0, fewshot=options.pop("fewshot", None),
                                  limit=_int(options, "limit", spec), name=spec)
    elif kind == "cloze":
        task = ClozeTask(target, limit=_int(options, "limit", spec), name=spec)
    elif kind == "ppl":
        task = PerplexityTask(target, tokens=_int(options, "tokens", spec), window=_int(options, "window", spec) or 1024,
                              stride=_int(options, "stride", spec), name=spec)
    elif kind == "retrieval":
        which, at, length = target.partition("@")
        if not at or not length.isdigit():
            raise ValueError(f"task {spec!r}: retrieval needs KIND@LENGTH, e.g. retrieval:kv@4096")
        task = RetrievalTask(which, int(length), n=_int(options, "n", spec) or 20, seed=_int(options, "seed", spec) or 0,
                             queries=_int(options, "queries", spec) or 8, keys=_int(options, "keys", spec) or 8,
                             name=spec)
    else:
        raise ValueError(f"unknown built-in task kind {kind!r} in {spec!r}; known: ppl, mc, cloze, retrieval")
    if options:
        raise ValueError(f"task {spec!r}: unknown option(s) {sorted(options)}")
    return task
