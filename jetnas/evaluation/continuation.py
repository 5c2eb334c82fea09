"""A development task in HellaSwag's form, built from held-out articles: which sentence comes next?

Each row: an article's title and one to three consecutive sentences of a paragraph as the context, the sentence
that follows them as the right ending, and three sentences from elsewhere in the same article (at least three
sentences away from the context, 0.5-2x the right ending's length) as the wrong ones. Scored as HellaSwag is
(`mc:PATH` with the rows' task "continuation": the context itself, each ending after a space; `acc` by total
log-likelihood, `acc_norm` per character).

Why: HellaSwag is the one fidelity target the SmolLM2 hybrids miss (issue 19: 84-88% of the teacher's margin over
eight runs) and the shipped data has no development split for it (the file is half the validation set, used as
the test). Stage 2's held-out KL on Wikipedia does not track it (the aw4-lm25 run, 2026-12-07). This task asks for
the same skill on text no stage trains on: telling the way a text goes on from sentences of the same topic. Built
from the corpus's validation articles (`val.jsonl`), which no recipe trains on (training reads `train.jsonl`'s
articles and `train.bin`), so it can steer recipes without touching a test set. It is a proxy: whether the hybrid
keeps the same share of the teacher's margin here as on HellaSwag is to be measured, not assumed.

    python -m jetnas.evaluation.continuation ../shared/data/corpus/val.jsonl data/dev/continuation_wiki_val.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from jetnas.validation import iter_jsonl

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"'][.!?])\s+(?=[A-Z\"'(])")
MIN_CHARS, MAX_CHARS = 30, 300


def sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences: split after ".", "!" or "?" that ends a word and comes before a capital (a crude
    rule: "Dr. Smith" splits, "e.g. the" does not); sentences outside 30-300 characters are dropped by the caller."""
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def article_rows(article: dict, rng: random.Random, per_article: int, choices: int = 4) -> list[dict]:
    """Up to `per_article` rows from one article (`{"id", "title", "text"}` as the corpus's jsonl)."""
    title = article.get("title") or ""
    # paragraphs: the text's lines after the title, without headings ("History.": short lines)
    paragraphs = [line for line in article["text"].split("\n")[1:] if len(line) > 80]
    spans = []  # each paragraph's sentences
    flat = []  # (paragraph index, sentence index, sentence) of every usable sentence, in order
    for p, paragraph in enumerate(paragraphs):
        sents = sentences(paragraph)
        spans.append(sents)
        flat += [(p, i, s) for i, s in enumerate(sents) if MIN_CHARS <= len(s) <= MAX_CHARS]
    candidates = [(p, i) for p, sents in enumerate(spans) for i in range(1, len(sents))
                  if MIN_CHARS <= len(sents[i]) <= MAX_CHARS and all(len(s) <= MAX_CHARS for s in sents[max(0, i - 3):i])]
    rng.shuffle(candidates)
    rows = []
    for p, i in candidates[:per_article * 3]:
        if len(rows) == per_article:
            break
        before = rng.randint(1, min(3, i))
        context = " ".join(spans[p][i - before:i])
        right = spans[p][i]
        wrong = [s for q, j, s in flat if (q != p or abs(j - i) >= 3 + before) and s != right
                 and 0.5 <= len(s) / len(right) <= 2.0]
        if len(wrong) < choices - 1:
            continue
        endings = rng.sample(wrong, choices - 1)
        label = rng.randrange(choices)
        endings.insert(label, right)
        rows.append({"id": f"{article['id']}-{p}-{i}", "task": "continuation", "question": f"{title}: {context}",
                     "choices": endings, "label": label})
    return rows


def build_rows(corpus: str | Path, n: int, seed: int = 0, per_article: int = 8) -> list[dict]:
    """`n` rows from the articles of `corpus` (a jsonl(.gz) of `{"id", "title", "text"}`), at most `per_article`
    from each, articles in a seeded random order; fewer than `n` if the articles run out."""
    rng = random.Random(seed)
    articles = [row for _, row in iter_jsonl(Path(corpus))]
    rng.shuffle(articles)
    rows = []
    for article in articles:
        rows += article_rows(article, rng, per_article)[: n - len(rows)]
        if len(rows) >= n:
            break
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jetnas.evaluation.continuation", description=__doc__.split("\n")[0])
    parser.add_argument("corpus", help="articles, jsonl(.gz) of {id, title, text} that no training stage reads")
    parser.add_argument("out", help="the task file to write (jsonl), for `mc:OUT`")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-article", type=int, default=8)
    args = parser.parse_args(argv)
    rows = build_rows(args.corpus, args.rows, args.seed, args.per_article)
    if not rows:
        print(f"jetnas: error: no rows could be built from {args.corpus!r}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    tmp.replace(out)
    print(json.dumps({"rows": len(rows), "articles": len({r["id"].rsplit("-", 2)[0] for r in rows}), "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
