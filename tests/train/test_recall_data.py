"""Retrieval-bearing documents from natural-looking text: deterministic from the seed, exactly `doc_tokens` long and
aligned with the training windows, every answer a copy of tokens at the requested distance back (a quote's prefix
picking out one place only), and disjoint from the evaluation's retrieval tasks (its templates, filler, keys and
value formats), with a corpus salted with the very things that must be kept out."""

import gzip
import json
import random
import re

import numpy as np
import pytest

from jetnas.evaluation import tasks as eval_tasks
from jetnas.train.data import TokenStream
from jetnas.train.mixture import resolve_mixture
from jetnas.train.recall_data import (
    GLOSSARY_HEADERS,
    KINDS,
    QUOTE_HEADERS,
    QUOTE_MARKER,
    REVIEW_HEADERS,
    RecallConfig,
    _WordCounter,
    build_recall_bin,
    eval_key_words,
    eval_keys,
    eval_template_phrases,
    find_eval_overlap,
    load_spans,
    make_documents,
    prepare_corpus,
)

DOC = 512
EOS = 0

# the salt: articles that would leak the eval into training if the filters failed
SALTED = [
    {"title": "Lisbon", "text": "Lisbon\n\nLisbon is the capital city of a coastal country. It has old bridges."},
    {"title": "Golden Harbor Line", "text": "Golden Harbor Line\n\nGolden Harbor Line is a railway company of note."},
    {"title": "Answer", "text": "Answer\n\nAnswer is a reply to a question. It can be short."},
    {"title": "Velmora Film", "text": "Velmora Film\n\nVelmora Film is a 1990 film by a director. It ran long."},
    {"title": "Trosk Codes",
     "text": "Trosk Codes\n\nTrosk Codes is a cipher manual. The special code for Oslo is 4821."},
    {"title": "Brant Valley", "text": "Brant Valley\n\nBrant Valley is a farming district. The farmer walked along the "
                                      "stone wall before the sun went down."},
]


COMMON_OPENINGS = ["The council of the region decided that", "In the same year the", "According to the records"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(["ka", "lo", "ve", "ri", "stan", "mor", "quel", "tib", "dra", "sen", "pu", "gor", "xi",
                               "nal", "bre", "fo"]) for _ in range(rng.randint(1, 3)))


def synthetic_articles(n: int = 70, seed: int = 0) -> list[dict]:
    """Wikipedia-shaped articles (title, blank line, defining first sentence, paragraphs) of made-up words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        title = " ".join(_word(rng).capitalize() for _ in range(rng.randint(1, 2)))
        gloss = " ".join(_word(rng) for _ in range(rng.randint(2, 5)))
        paragraphs = [f"{title} is a {gloss} of the {_word(rng)} region. It was known for {_word(rng)}."]
        for _ in range(rng.randint(4, 8)):
            sentences = []
            for _ in range(rng.randint(3, 7)):
                words = [_word(rng) for _ in range(rng.randint(7, 18))]
                if rng.random() < 0.3:
                    words.insert(rng.randrange(len(words)), f"in {rng.randint(1200, 2020)}")
                sentence = " ".join(words).capitalize() + "."
                if rng.random() < 0.3:
                    # openings shared by many sentences: a quote needs a longer prefix to pick out one of them
                    sentence = f"{rng.choice(COMMON_OPENINGS)} {sentence[0].lower()}{sentence[1:]}"
                sentences.append(sentence)
                if rng.random() < 0.2:
                    # a short sentence ending in a long number: an answer cut from it could be digits alone
                    sentences.append(f"The tally was {rng.randint(10**9, 10**10)}.")
            paragraphs.append(" ".join(sentences))
        rows.append({"title": title, "text": title + "\n\n" + "\n".join(paragraphs)})
    return rows


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("recall")
    rows = synthetic_articles()
    rows[5:5] = SALTED
    path = root / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path, rows


@pytest.fixture(scope="module")
def tokenizer(corpus_file):
    """A byte-level BPE trained on the corpus (so every word is a few tokens and " Word" pieces exist)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    texts = [r["text"] for r in corpus_file[1]]
    tok.train_from_iterator(texts + list(QUOTE_HEADERS + GLOSSARY_HEADERS + REVIEW_HEADERS), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def corpus(corpus_file, tokenizer):
    return prepare_corpus(corpus_file[1], tokenizer)


@pytest.fixture(scope="module")
def docs(corpus, tokenizer):
    return make_documents(corpus, tokenizer, RecallConfig(documents=24, doc_tokens=DOC, queries=3, entries=6), EOS)


def doc_spans(docs, d: int) -> np.ndarray:
    return docs.spans[docs.spans[:, 0] // DOC == d]


def test_documents_are_deterministic_in_the_seed(corpus, tokenizer, docs):
    again = make_documents(corpus, tokenizer, RecallConfig(documents=24, doc_tokens=DOC, queries=3, entries=6), EOS)
    assert np.array_equal(again.tokens, docs.tokens) and np.array_equal(again.spans, docs.spans)
    other = make_documents(corpus, tokenizer, RecallConfig(documents=24, doc_tokens=DOC, queries=3, entries=6,
                                                           seed=1), EOS)
    assert not np.array_equal(other.tokens, docs.tokens)
    # document i depends on (seed, i) only: a shorter run is a prefix
    fewer = make_documents(corpus, tokenizer, RecallConfig(documents=5, doc_tokens=DOC, queries=3, entries=6), EOS)
    assert np.array_equal(fewer.tokens, docs.tokens[: 5 * DOC])


def test_every_document_has_its_length_both_kinds_and_only_one_eos(docs):
    assert len(docs.tokens) == 24 * DOC
    tokens = docs.tokens.reshape(24, DOC)
    assert (tokens[:, -1] == EOS).all() and not (tokens[:, :-1] == EOS).any()
    kinds = {int(doc_spans(docs, d)[0, 3]) for d in range(24)}
    assert kinds == {0, 1}  # quote and glossary both drawn
    assert all(len(doc_spans(docs, d)) >= 1 for d in range(24))


def test_every_answer_copies_tokens_at_the_requested_distance(docs, tokenizer):
    marker = tokenizer(QUOTE_MARKER, add_special_tokens=False)["input_ids"]
    lo, hi = docs.config.min_distance, docs.config.max_distance
    hi = DOC if hi is None else hi
    for a, b, s, kind in docs.spans.tolist():
        assert a // DOC == s // DOC, "source and answer in different documents"
        assert lo <= a - s <= hi
        assert b - a >= 2 and np.array_equal(docs.tokens[a:b], docs.tokens[s : s + b - a])
        if KINDS[kind] == "quote":
            # the quote line: marker, prefix, answer; the prefix occurs once before the line, right before the source
            start = a - 1
            while not np.array_equal(docs.tokens[start - len(marker) : start], marker):
                start -= 1
            prefix = docs.tokens[start:a]
            earlier = docs.tokens[a // DOC * DOC : start - len(marker)]
            hits = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(earlier, len(prefix)).__eq__(prefix)
                                  .all(1)) + a // DOC * DOC
            assert hits.tolist() == [s - len(prefix)]
    distances = docs.distances()
    assert distances.max() - distances.min() > DOC // 3  # spread over the range, not bunched at one end


def test_documents_line_up_with_training_windows_in_a_mixture(tmp_path, corpus_file, tokenizer):
    path = build_recall_bin(corpus_file[0], tokenizer, tmp_path / "recall.bin",
                            RecallConfig(documents=12, doc_tokens=DOC, queries=3, entries=6), eos_id=EOS)
    stream = TokenStream.from_file(path)
    assert stream.array.dtype == np.dtype("<u2") and len(stream) == 12 * DOC
    web = tmp_path / "web.bin"
    TokenStream((np.arange(20 * DOC) % 50 + 3).astype("<u2")).save(web)
    mixture = resolve_mixture(f"{web}:0.8,{path}:0.2", tokenizer, teacher_eos=EOS, heldout_tokens=2 * DOC)
    batcher = mixture.batcher(DOC, 8, seed=0)
    recall = [w for step in range(4) for k, w in batcher.windows(step) if k == 1]
    assert recall
    spans = load_spans(path)
    for w in recall:
        # window w is document w plus the next document's first token: every answer in it has its source in it
        in_window = spans[(spans[:, 0] >= w * DOC) & (spans[:, 0] < (w + 1) * DOC)]
        assert len(in_window) and (in_window[:, 2] >= w * DOC).all()
    meta = json.loads((tmp_path / "recall.bin.recall.json").read_text())
    assert meta["answers"] == len(spans) and meta["tokens"] == 12 * DOC
    # the same inputs write the same bytes
    again = build_recall_bin(corpus_file[0], tokenizer, tmp_path / "again.bin",
                             RecallConfig(documents=12, doc_tokens=DOC, queries=3, entries=6), eos_id=EOS)
    assert again.read_bytes() == path.read_bytes()


def test_the_eval_phrases_come_from_the_eval_generators_and_are_found():
    phrases = eval_template_phrases()
    assert {"The special code for", "The special magic number for", "Now recall"} <= set(phrases)
    for kind in eval_tasks.RETRIEVAL_KINDS:
        row = eval_tasks.RetrievalTask(kind, 200, n=1, seed=3).make_rows(_WordCounter())[0]
        text = "".join(t for t, _ in row)
        assert find_eval_overlap(text), kind  # the check would catch an eval prompt in a training document
    assert find_eval_overlap("A tired traveler cleaned the harvest without saying a word.")  # any filler sentence
    assert find_eval_overlap("the SPECIAL magic number for") and not find_eval_overlap("a special issue of a code")


def test_documents_share_no_template_key_or_value_format_with_the_eval(corpus, docs, tokenizer):
    for header in (*QUOTE_HEADERS, *GLOSSARY_HEADERS, *REVIEW_HEADERS, QUOTE_MARKER):
        assert not find_eval_overlap(header) and "recall" not in header.lower()
    # the salted articles: the two with eval text are left out of the stream, the others give no key
    assert corpus.excluded == 2
    for d in range(24):
        text = tokenizer.decode(docs.tokens[d * DOC : (d + 1) * DOC].tolist())
        assert find_eval_overlap(text) == [], d
        assert not re.search(r"\bis \d+\.", text.split("\n\n")[-1])  # no "X is 42." statements in the queries
    keys = [k for k, _ in corpus.entries]
    assert len(keys) >= 50
    assert not set(keys) & eval_keys()
    assert not {w.lower() for k in keys for w in re.split(r"[ '-]+", k)} & eval_key_words()
    assert not {"Lisbon", "Golden Harbor Line", "Answer", "Velmora Film"} & set(keys)
    for _, gloss in corpus.entries:
        assert not re.search(r"\d", gloss)
    for a, b, _, _ in docs.spans.tolist():
        answer = tokenizer.decode(docs.tokens[a:b].tolist())
        assert not re.fullmatch(r"\s*\d+\s*\.?\s*", answer), answer  # never a bare number, the eval's value format
        assert len(re.findall(r"[A-Za-z]{2,}", answer)) >= 2  # natural text: two words of letters at least


def test_distances_that_cannot_fit_are_refused(corpus, tokenizer):
    with pytest.raises(ValueError, match=r"do not fit documents of 512 tokens"):
        make_documents(corpus, tokenizer, RecallConfig(documents=1, doc_tokens=DOC, max_distance=DOC), EOS)
    with pytest.raises(ValueError, match=r"max_distance=10 < min_distance=128"):
        RecallConfig(documents=1, doc_tokens=DOC, max_distance=10)
    with pytest.raises(ValueError, match=r"kinds="):
        RecallConfig(documents=1, kinds={"needle": 1.0})
