"""Retrieval-bearing training documents built from natural text (issue 19): documents in which later tokens can
only be predicted by looking far back, so that the few attention layers of a hybrid learn (or keep) long-range
lookups. Nothing in plain Wikipedia forces that, and the first SmolLM2-135M hybrid lost all retrieval (needle@4096
0.00 against the teacher's 1.00).

Two kinds of document, each exactly `doc_tokens` tokens long (the last one the end-of-document id):

- **quote**: a stretch of article text (one article or consecutive ones, joined by a blank line), then a short
  header ("Lines repeated from above:" and the like) and `queries` lines `"\\n>" + sentence`, each repeating a
  sentence of the text above verbatim. The first tokens of the repeated sentence (its *prefix*: 4 to 16 tokens, as
  few as make it occur only once in the document before that point) pick out the sentence; the tokens after it,
  up to `answer_tokens` and the sentence's end, are the *answer*: a copy of tokens at a chosen distance back.
- **glossary**: article text with a glossary block inserted at a sentence boundary (a header, then `entries`
  lines `"\\n<article title>: <defining phrase>."`, the phrase taken from that article's first sentence, e.g.
  "Anarchism: political philosophy."), more article text, and at the end a second header and `queries` of the
  same lines again in another order; the answer is the defining phrase, which only the glossary above gives.

The answer of every query sits at a token distance from its source in `[min_distance, max_distance]` (drawn
uniformly per query, within what the layout allows); the tokens of the answer are the source's tokens, so the
copy is exact in token space. Lines are assembled from token pieces (article text tokenised once per article,
markers tokenised alone), so a few boundaries are not the tokenizer's own split of the joined text; the answers are.

**Disjoint from the evaluation's retrieval tasks** (`jetnas.evaluation.tasks.RetrievalTask`: kv, needle, mqar):

- templates: the eval's fixed phrases ("The special code for", "What is the special magic number for", "Now
  recall", ...) are not written here by hand: `eval_template_phrases` generates rows of every eval kind with the
  eval's own generators and cuts out keys, values and filler. No marker of this module contains one; articles that
  contain one, or one of the eval's filler sentences, are left out of the corpus; and `find_eval_overlap` checks
  any text for them (the tests run it on generated documents). There are no questions ("What is ...?"), no
  "X is V." statements, and no bare query prompts: queries are quotations and glossary lines.
- keys: the eval's keys are city names (kv, needle) and adjective + noun pairs (mqar). A glossary key is an article
  title sharing no word (case-insensitively) with the eval's cities, adjectives or nouns; quote queries have no key
  but the sentence's own opening words. Article text may of course mention Lisbon or a red door: only the keys are
  constructed, and none of them comes from those lists.
- values: the eval's values are bare digit strings (4 digits, 7 digits, 2 digits). A glossary value is a phrase of
  2-8 words with no digit; a quote answer is a span of a natural sentence with at least two words of letters
  (a year inside it is text, never a bare number as the whole answer).

Output (`build_recall_bin`): a token `.bin` (uint16 for vocabularies up to 65,535 ids, else uint32, with the dtype
sidecar of `jetnas.train.data.TokenStream.save`) that enters a weighted mixture like any token file
(`data="web.bin:0.8,recall.bin:0.2"`), plus `<bin>.spans.npy` (`int64 [M, 4]`: answer start, answer end, source
start, kind index, as positions in the `.bin`) and `<bin>.recall.json` (the configuration and counts). It is a
pure function of (corpus, tokenizer, configuration, seed).

**Alignment with the training windows.** The batchers cut a stream into windows starting at multiples of
`seq_len`: documents line up with the windows (so no window holds a query without its source) only when `seq_len`
is a multiple of `doc_tokens` and held-out tails (`heldout_tokens`) are multiples of `doc_tokens` too (the stage
default, 16,384, is a multiple of every power of two up to 16K). Build with `doc_tokens = seq_len` (or a divisor of it).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from jetnas.evaluation import tasks as eval_tasks
from jetnas.files import atomic_path, write_json_atomic
from jetnas.train.data import TokenStream

KINDS = ("quote", "glossary")
QUOTE_HEADERS = ("Lines repeated from above:", "Passages quoted from earlier in this text:",
                 "Excerpts from the preceding paragraphs:", "Quoted again, from the text above:")
GLOSSARY_HEADERS = ("Related articles, with short descriptions:", "Entries referred to in this article:",
                    "Glossary of related topics:")
REVIEW_HEADERS = ("The related articles again:", "Descriptions, repeated:", "The entries once more:")
QUOTE_MARKER = "\n>"
MIN_PREFIX, MAX_PREFIX, MIN_ANSWER = 4, 16, 4
_ABBREVIATIONS = {"Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "No", "vs", "Co", "Inc", "Ltd", "Gen", "Col", "Lt",
                  "Sgt", "Prof", "Rev", "Mt", "Ft", "Jan", "Feb", "Aug", "Sept", "Oct", "Nov", "Dec", "ca", "c"}
_GLOSS = re.compile(r"\b(?:is|was|are|were) (?:an?|the) (.+?)(?=[,;:.()\"]| that\b| which\b| who\b| whose\b"
                    r"| where\b|$)")
_KEY = re.compile(r"[A-Za-z][A-Za-z' -]{1,40}")
_PHRASE = re.compile(r"[A-Za-z][A-Za-z' -]*")
# a phrase cut at 8 words must not end on one of these ("region of the.")
_DANGLING = {"a", "an", "the", "of", "in", "on", "at", "by", "for", "to", "from", "with", "and", "or", "as", "into"}
# the multiple-choice prompts of the evaluation are "Question: ...\nAnswer:" (tasks.mc_prompt): no glossary line
# may look like one
_PROMPT_WORDS = {"question", "answer"}


# ---------------------------------------------------------------------------------------------------------------
# what the evaluation uses, derived from its own generators


class _WordCounter:
    """Stands in for a language model in `RetrievalTask.make_rows`, which only counts tokens (`encode`)."""

    @staticmethod
    def encode(text: str) -> list[str]:
        return text.split()


def eval_keys() -> set[str]:
    """The eval's keys: its city names and every adjective + noun pair of mqar."""
    return set(eval_tasks._CITIES) | {f"{a} {n}" for a in eval_tasks._ADJ for n in eval_tasks._NOUNS}


def eval_key_words() -> set[str]:
    """Every word of the eval's keys, lower-cased, and "question" / "answer" of its multiple-choice prompts: no
    glossary key may contain one."""
    return {w.lower() for key in eval_keys() for w in key.split()} | _PROMPT_WORDS


@lru_cache(maxsize=1)
def eval_template_phrases() -> tuple[str, ...]:
    """The fixed phrases (two words or more) of the eval's retrieval prompts: rows of every kind made by the eval's
    own generators, with keys and digit runs cut out and the text split at sentence ends; filler sentences are left
    out here (`find_eval_overlap` matches every filler combination by pattern instead)."""
    keys = sorted(eval_keys(), key=len, reverse=True)
    key_or_number = re.compile("|".join([re.escape(k) for k in keys] + [r"\d+"]))
    filler = _filler_pattern()
    phrases = set()
    for kind in eval_tasks.RETRIEVAL_KINDS:
        for row in eval_tasks.RetrievalTask(kind, 256, n=4).make_rows(_WordCounter()):
            text = key_or_number.sub("\0", "".join(t for t, _ in row))
            for sentence in re.split(r"[.?!\n]+", text):
                if filler.fullmatch(sentence.strip() + "."):
                    continue
                for piece in sentence.split("\0"):
                    piece = " ".join(piece.split())
                    if len(piece.split()) >= 2:
                        phrases.add(piece)
    return tuple(sorted(phrases))


@lru_cache(maxsize=1)
def _filler_pattern() -> re.Pattern:
    """Any filler sentence the eval's `_filler_sentence` can produce."""
    parts = [eval_tasks._SUBJECTS, eval_tasks._VERBS, eval_tasks._OBJECTS, eval_tasks._TAILS]
    return re.compile(" ".join("(?:" + "|".join(map(re.escape, p)) + ")" for p in parts))


@lru_cache(maxsize=1)
def _overlap_pattern() -> re.Pattern:
    phrases = sorted(eval_template_phrases(), key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(map(re.escape, phrases)) + r")\b", re.IGNORECASE)


def find_eval_overlap(text: str) -> list[str]:
    """The eval template phrases (case-insensitive) and eval filler sentences found in `text` (empty: none)."""
    found = [m.group(0) for m in _overlap_pattern().finditer(text)]
    return found + [m.group(0) for m in _filler_pattern().finditer(text)]


# ---------------------------------------------------------------------------------------------------------------
# the corpus, tokenised once


@dataclass
class Corpus:
    """Articles tokenised into one stream (joined by a blank line), with what the builders need.

    Attributes:
        ids: `int64 [N]` token ids.
        sentence_starts: sorted indices of tokens that start a sentence inside a paragraph (a space and a capital
            letter after a sentence end).
        breaks: sorted indices where a sentence ends (the next sentence start or a newline token).
        entries: `(key, gloss)` glossary pairs (see the module docstring), one per usable article.
        articles, excluded: articles used, and left out for containing an eval phrase.
    """

    ids: np.ndarray
    sentence_starts: np.ndarray
    breaks: np.ndarray
    entries: list[tuple[str, str]]
    articles: int
    excluded: int

    def sentence_end(self, start: int) -> int:
        """The index after the last token of the sentence starting at `start`."""
        k = int(np.searchsorted(self.breaks, start, side="right"))
        return int(self.breaks[k]) if k < len(self.breaks) else len(self.ids)


def read_articles(path: str | Path, max_articles: int | None = None) -> list[dict]:
    """Rows `{"title"?, "text"}` of a `.jsonl` / `.jsonl.gz` corpus (the first `max_articles`)."""
    path = Path(path)
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        raise ValueError(f"corpus {str(path)!r} must be .jsonl or .jsonl.gz with a 'text' field")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if max_articles is not None and len(rows) >= max_articles:
                    break
    return rows


def glossary_entry(row: dict, banned_words: set[str] | None = None) -> tuple[str, str] | None:
    """`(title, defining phrase)` of an article, or None when it has no usable one: the title must be plain
    letters (at most 4 words, none of `banned_words`, by default the eval's key words), the phrase (what follows
    "is a/an/the" in the first sentence, cut at punctuation or a relative pronoun, at most 8 words, not ending on
    an article or preposition) 2+ words of letters, no digit."""
    banned = eval_key_words() if banned_words is None else banned_words
    title, text = row.get("title", ""), row["text"]
    if not _KEY.fullmatch(title) or len(title.split()) > 4:
        return None
    if {w.lower() for w in re.split(r"[ '-]+", title) if w} & banned:
        return None
    body = text.split("\n\n", 1)[1] if "\n\n" in text else text
    m = _GLOSS.search(body.split(". ", 1)[0].split("\n", 1)[0])
    if m is None:
        return None
    words = m.group(1).split()
    if len(words) > 8:
        words = words[:8]
        while words and words[-1].lower() in _DANGLING:
            words.pop()
    gloss = " ".join(words)
    if len(words) < 2 or not _PHRASE.fullmatch(gloss) or find_eval_overlap(gloss):
        return None
    return title, gloss


def _piece_tables(tokenizer, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per vocabulary id (those in `ids`): starts with a space and a capital letter; ends a sentence; is an
    abbreviation or a single capital (so a "." after it ends no sentence); is a lone "."; holds a newline."""
    size = int(ids.max()) + 1 if len(ids) else 1
    names = ("space_cap", "terminal", "abbrev", "dot", "newline")
    tables = {name: np.zeros(size, dtype=bool) for name in names}
    for i in np.unique(ids).tolist():
        piece = tokenizer.decode([i])
        word = piece.strip().rstrip(".")
        tables["space_cap"][i] = len(piece) > 1 and piece[0] == " " and piece[1].isupper()
        tables["terminal"][i] = piece.rstrip().rstrip("\"')").endswith((".", "!", "?"))
        tables["abbrev"][i] = word in _ABBREVIATIONS or (len(word) == 1 and word.isupper())
        tables["dot"][i] = piece.strip() == "."
        tables["newline"][i] = "\n" in piece
    return tables


def prepare_corpus(rows: list[dict], tokenizer, batch_size: int = 64) -> Corpus:
    """Tokenise articles (`rows` with "text", optionally "title") into a `Corpus`, leaving out every article in
    which `find_eval_overlap` finds an eval phrase."""
    clean = [r for r in rows if not find_eval_overlap(r["text"])]
    if not clean:
        raise ValueError(f"no usable article among {len(rows)}")
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    pieces = []
    for start in range(0, len(clean), batch_size):
        encoded = tokenizer([r["text"] for r in clean[start : start + batch_size]], add_special_tokens=False)
        for ids in encoded["input_ids"]:
            pieces += [ids, separator]
    ids = np.fromiter((t for p in pieces for t in p), dtype=np.int64)
    t = _piece_tables(tokenizer, ids)
    prev = np.concatenate([[0], ids[:-1]])
    prev2 = np.concatenate([[0, 0], ids[:-2]])
    # "... end. Next" starts a sentence; "U.S. Army", "Dr. Smith" do not (an abbreviation token ending in ".",
    # or an abbreviation followed by a lone ".")
    after_abbrev = t["abbrev"][prev] | (t["dot"][prev] & t["abbrev"][prev2])
    starts = t["space_cap"][ids] & t["terminal"][prev] & ~after_abbrev
    starts[0] = False
    breaks = np.flatnonzero(starts | t["newline"][ids])
    entries, seen = [], set()
    for row in clean:
        entry = glossary_entry(row)
        if entry is not None and entry[0] not in seen:
            seen.add(entry[0])
            entries.append(entry)
    return Corpus(ids, np.flatnonzero(starts), breaks, entries, len(clean), len(rows) - len(clean))


# ---------------------------------------------------------------------------------------------------------------
# documents


@dataclass
class RecallConfig:
    """What `make_documents` builds (written to `<bin>.recall.json`).

    Attributes:
        documents: how many documents.
        doc_tokens: tokens per document, end-of-document id included (see "Alignment with the training windows").
        min_distance, max_distance: token distance from an answer back to its source; None: `doc_tokens // 4`, and
            as far as the layout allows (`doc_tokens - 1 -` the longest possible quote section).
        kinds: weight of each kind (`quote`, `glossary`); a document's kind is drawn with these weights.
        queries: queries per document (quote lines, or glossary lines asked again).
        entries: glossary lines per glossary.
        answer_tokens: the longest quote answer (it also ends with its sentence).
        seed: every random choice; document i uses the generator seeded by (seed, i).
    """

    documents: int
    doc_tokens: int = 2048
    min_distance: int | None = None
    max_distance: int | None = None
    kinds: dict[str, float] = field(default_factory=lambda: {"quote": 0.5, "glossary": 0.5})
    queries: int = 4
    entries: int = 8
    answer_tokens: int = 12
    seed: int = 0

    def __post_init__(self):
        if self.documents < 1 or self.doc_tokens < 128:
            raise ValueError(f"documents={self.documents} must be >= 1 and doc_tokens={self.doc_tokens} >= 128")
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds or any(w < 0 for w in self.kinds.values()) or sum(self.kinds.values()) <= 0:
            raise ValueError(f"kinds={self.kinds!r}: weights >= 0 (not all 0) for kinds among {KINDS}")
        if self.queries < 1 or self.answer_tokens < MIN_ANSWER:
            raise ValueError(f"queries={self.queries} must be >= 1 and answer_tokens={self.answer_tokens} >= "
                             f"{MIN_ANSWER}")
        if self.kinds.get("glossary", 0) > 0 and self.entries < self.queries:
            raise ValueError(f"entries={self.entries} must be >= queries={self.queries} (each query asks one entry)")
        self.min_distance = self.doc_tokens // 4 if self.min_distance is None else self.min_distance
        if self.min_distance < 1:
            raise ValueError(f"min_distance={self.min_distance} must be >= 1")
        if self.max_distance is not None and self.max_distance < self.min_distance:
            raise ValueError(f"max_distance={self.max_distance} < min_distance={self.min_distance}")


@dataclass
class RecallDocuments:
    """Documents back to back: `tokens [documents * doc_tokens]` and `spans [M, 4]` (answer start, answer end,
    source start, kind index into `KINDS`), positions in `tokens`."""

    tokens: np.ndarray
    spans: np.ndarray
    doc_tokens: int
    config: RecallConfig

    def distances(self) -> np.ndarray:
        return self.spans[:, 0] - self.spans[:, 2]


class _Builder:
    def __init__(self, corpus: Corpus, tokenizer, config: RecallConfig, eos_id: int):
        self.corpus, self.tokenizer, self.config, self.eos = corpus, tokenizer, config, eos_id
        self._encoded: dict[str, list[int]] = {}
        longest_header = max(len(self.encode("\n\n" + h)) for h in QUOTE_HEADERS)
        # a quote section at its longest: header + queries x (marker + prefix + answer)
        self.quote_max = longest_header + config.queries * (len(self.encode(QUOTE_MARKER)) + MAX_PREFIX +
                                                             config.answer_tokens)
        room = config.doc_tokens - 1 - self.quote_max
        self.max_distance = room if config.max_distance is None else config.max_distance
        if self.max_distance > room or self.max_distance < config.min_distance:
            raise ValueError(f"distances [{config.min_distance}, {config.max_distance}] do not fit documents of "
                             f"{config.doc_tokens} tokens: answers can be at most {room} tokens from their source "
                             f"(after up to {self.quote_max} tokens of queries)")
        if len(corpus.ids) < 2 * config.doc_tokens:
            raise ValueError(f"the corpus has {len(corpus.ids)} tokens; documents of {config.doc_tokens} need at "
                             f"least {2 * config.doc_tokens}")
        if config.kinds.get("glossary", 0) > 0 and len(corpus.entries) < 2 * config.entries:
            raise ValueError(f"the corpus gives {len(corpus.entries)} glossary entries; glossaries of "
                             f"{config.entries} need at least {2 * config.entries} (or set kinds without glossary)")
        late = corpus.sentence_starts[corpus.sentence_starts >= config.doc_tokens]
        if len(late) == 0:
            raise ValueError("the corpus has no sentence start far enough in to end a document's text")
        self.ends = late

    def encode(self, text: str) -> list[int]:
        if text not in self._encoded:
            self._encoded[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._encoded[text]

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def document(self, index: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, index])
        names = [k for k in KINDS if cfg.kinds.get(k, 0) > 0]
        weights = np.array([cfg.kinds[k] for k in names], dtype=np.float64)
        kind = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        for _ in range(50):
            built = self._quote(rng) if kind == "quote" else self._glossary(rng)
            if built is not None:
                tokens, spans = built
                assert len(tokens) == cfg.doc_tokens
                return tokens, [(a, b, s, KINDS.index(kind)) for a, b, s in spans]
        raise RuntimeError(f"document {index}: no {kind} document found in 50 tries; widen the distance range or "
                           f"give a larger corpus")

    def _unique_prefix(self, s: int, end: int, before: np.ndarray) -> int | None:
        """The fewest tokens (MIN_PREFIX..MAX_PREFIX, leaving MIN_ANSWER) from `s` occurring once in `before`."""
        ids = self.corpus.ids
        for k in range(MIN_PREFIX, min(MAX_PREFIX, end - s - MIN_ANSWER) + 1):
            windows = sliding_window_view(before, k)
            if int((windows == ids[s : s + k]).all(1).sum()) == 1:
                return k
        return None

    def _natural(self, ids) -> bool:
        return len(re.findall(r"[A-Za-z]{2,}", self._decode(ids))) >= 2

    def _quote(self, rng):
        cfg, ids, corpus = self.config, self.corpus.ids, self.corpus
        e = int(self.ends[rng.integers(len(self.ends))])
        region = ids[e - cfg.doc_tokens : e]
        marker = self.encode(QUOTE_MARKER)
        recall = list(self.encode("\n\n" + QUOTE_HEADERS[rng.integers(len(QUOTE_HEADERS))]))
        found, used = [], set()
        for _ in range(cfg.queries):
            # the answer's distance is off + (e - s) whatever the prefix length: it starts the quote at s
            off = len(recall) + len(marker)
            target = e + off - int(rng.integers(cfg.min_distance, self.max_distance + 1))
            lo, hi = e + off - self.max_distance, e + off - cfg.min_distance
            cands = corpus.sentence_starts[np.searchsorted(corpus.sentence_starts, lo):
                                           np.searchsorted(corpus.sentence_starts, hi, side="right")]
            before = np.concatenate([region, np.asarray(recall, dtype=np.int64)])
            for s in cands[np.argsort(np.abs(cands - target), kind="stable")][:24].tolist():
                end = corpus.sentence_end(s)
                if s in used or end - s < MIN_PREFIX + MIN_ANSWER:
                    continue
                k = self._unique_prefix(s, end, before)
                if k is None:
                    continue
                n = min(cfg.answer_tokens, end - s - k)
                if not self._natural(ids[s + k : s + k + n]):
                    continue
                found.append((off + k, off + k + n, s + k))
                recall += marker + ids[s : s + k + n].tolist()
                used.add(s)
                break
        if not found:
            return None
        context = cfg.doc_tokens - 1 - len(recall)
        tokens = np.concatenate([ids[e - context : e], recall, [self.eos]])
        spans = [(context + a, context + b, src - (e - context)) for a, b, src in found]
        if min(src for _, _, src in spans) < 0:
            raise RuntimeError("a quote's source fell outside its document (the distance bound is wrong)")
        return tokens, spans

    def _lstrip(self, ids: np.ndarray) -> list[int]:
        """`ids` with the leading space of its first token dropped (text that opens a paragraph)."""
        first = self._decode(ids[:1])
        if first.startswith(" ") and first[1:].isascii() and first[1:]:
            return self.encode(first[1:]) + ids[1:].tolist()
        return ids.tolist()

    def _glossary(self, rng):
        cfg, ids, corpus = self.config, self.corpus.ids, self.corpus
        picked = rng.choice(len(corpus.entries), size=cfg.entries, replace=False).tolist()
        lines = [(self.encode(f"\n{key}:"), self.encode(f" {gloss}.")) for key, gloss in
                 (corpus.entries[i] for i in picked)]
        glossary = list(self.encode("\n\n" + GLOSSARY_HEADERS[rng.integers(len(GLOSSARY_HEADERS))]))
        value_at = []
        for key, value in lines:
            glossary += key
            value_at.append(len(glossary))
            glossary += value
        glossary += self.encode("\n\n")
        review = list(self.encode("\n\n" + REVIEW_HEADERS[rng.integers(len(REVIEW_HEADERS))]))
        asked = []
        for i in rng.choice(cfg.entries, size=cfg.queries, replace=False).tolist():
            review += lines[i][0]
            asked.append((i, len(review), len(lines[i][1])))
            review += lines[i][1]
        # distance of query q = (len(glossary) - value_at[i]) + len(text between) + its offset in the review
        extra = [len(glossary) - value_at[i] + at for i, at, _ in asked]
        lo = max(0, cfg.min_distance - min(extra))
        hi = min(self.max_distance - max(extra), cfg.doc_tokens - 1 - len(glossary) - len(review))
        if lo > hi:
            raise ValueError(f"glossaries of {cfg.entries} entries and {cfg.queries} queries span {max(extra)} "
                             f"tokens; distances [{cfg.min_distance}, {self.max_distance}] leave no room: widen them")
        e = int(self.ends[rng.integers(len(self.ends))])
        target = int(rng.integers(lo, hi + 1))
        starts = corpus.sentence_starts
        cands = starts[np.searchsorted(starts, e - hi):np.searchsorted(starts, e - lo, side="right")]
        for b0 in cands[np.argsort(np.abs(e - cands - target), kind="stable")][:8].tolist():
            between = self._lstrip(ids[b0:e])
            if not lo <= len(between) <= hi:
                continue
            before = cfg.doc_tokens - 1 - len(glossary) - len(between) - len(review)
            if before < 0 or b0 - before < 0:
                continue
            tokens = np.concatenate([ids[b0 - before : b0], glossary, between, review, [self.eos]])
            base = before + len(glossary) + len(between)
            spans = [(base + at, base + at + n, before + value_at[i]) for i, at, n in asked]
            return tokens, spans
        return None


def make_documents(corpus: Corpus, tokenizer, config: RecallConfig, eos_id: int) -> RecallDocuments:
    """Build `config.documents` documents (see the module docstring); deterministic in (corpus, config)."""
    builder = _Builder(corpus, tokenizer, config, eos_id)
    tokens, spans = [], []
    for index in range(config.documents):
        doc, doc_spans = builder.document(index)
        offset = index * config.doc_tokens
        tokens.append(doc)
        spans += [(a + offset, b + offset, s + offset, k) for a, b, s, k in doc_spans]
    return RecallDocuments(np.concatenate(tokens).astype(np.int64), np.array(spans, dtype=np.int64).reshape(-1, 4),
                           config.doc_tokens, config)


def build_recall_bin(corpus_path: str | Path, tokenizer, out_path: str | Path, config: RecallConfig,
                     eos_id: int | None = None, max_articles: int | None = None) -> Path:
    """Build documents from a `.jsonl(.gz)` corpus and write `out_path` (a `.bin` with its dtype sidecar),
    `<out>.spans.npy` and `<out>.recall.json`; returns `out_path`.

    Args:
        corpus_path: articles, one JSON object per line with "text" (and "title" for glossary keys).
        tokenizer: the teacher's tokenizer.
        config: what to build.
        eos_id: the end-of-document id (default: the tokenizer's; SmolLM2's corpus uses 0, see shared/data).
        max_articles: read only the first articles (tests, quick pilots).
    """
    out = Path(out_path)
    if out.suffix != ".bin":
        raise ValueError(f"out_path {str(out)!r} must end in .bin")
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise ValueError("the tokenizer has no eos id: pass eos_id")
    rows = read_articles(corpus_path, max_articles)
    corpus = prepare_corpus(rows, tokenizer)
    docs = make_documents(corpus, tokenizer, config, eos)
    dtype = np.dtype("<u2") if len(tokenizer) <= 65535 else np.dtype("<u4")
    out.parent.mkdir(parents=True, exist_ok=True)
    TokenStream(docs.tokens.astype(dtype), name=out.name).save(out)
    with atomic_path(spans_path(out)) as tmp, open(tmp, "wb") as f:
        np.save(f, docs.spans)
    distances = docs.distances()
    meta = {"config": asdict(config), "corpus": str(corpus_path), "max_articles": max_articles,
            "articles": corpus.articles, "articles_excluded_for_eval_phrases": corpus.excluded,
            "glossary_entries": len(corpus.entries), "tokens": len(docs.tokens), "answers": len(docs.spans),
            "answer_tokens": int((docs.spans[:, 1] - docs.spans[:, 0]).sum()),
            "answers_per_kind": {k: int((docs.spans[:, 3] == i).sum()) for i, k in enumerate(KINDS)},
            "distance": {"min": int(distances.min()), "median": float(np.median(distances)),
                         "max": int(distances.max())},
            "eos_id": int(eos), "tokenizer": getattr(tokenizer, "name_or_path", "")}
    write_json_atomic(out.with_name(out.name + ".recall.json"), meta)
    return out


def spans_path(bin_path: str | Path) -> Path:
    """Where the answer spans of a recall `.bin` are written: `<bin>.spans.npy` beside it."""
    return Path(bin_path).with_name(Path(bin_path).name + ".spans.npy")


def load_spans(bin_path: str | Path) -> np.ndarray:
    """The `[M, 4]` answer spans written beside a recall `.bin` (see the module docstring)."""
    return np.load(spans_path(bin_path))
