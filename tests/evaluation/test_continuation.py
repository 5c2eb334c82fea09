"""The continuation development task (`jetnas.evaluation.continuation`): rows a multiple-choice task reads, whose
right ending is the sentence that follows the context in its article and whose wrong endings are other sentences
of that article, never the context's own neighbours; the same rows for the same seed."""

import json

import pytest

from jetnas.evaluation.continuation import build_rows, main, sentences
from jetnas.evaluation.tasks import mc_prompt, read_jsonl


def article(i: int, paragraphs: int = 4, per: int = 6) -> dict:
    body = "\n".join(" ".join(f"In paragraph {p} of article {i} this is sentence number {s} of the text."
                              for s in range(per)) for p in range(paragraphs))
    return {"id": f"a{i}", "title": f"Article {i}", "text": f"Article {i}\n\nHistory.\n{body}"}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(article(i)) + "\n" for i in range(5)))
    return path


def test_sentences_split_before_capitals_only():
    assert sentences("It rose in 1990. Then it fell, e.g. in Paris. Dr. Who left.") == \
        ["It rose in 1990.", "Then it fell, e.g. in Paris.", "Dr.", "Who left."]


def test_rows_are_next_sentence_against_same_article_sentences(corpus):
    rows = build_rows(corpus, 12, seed=3, per_article=3)
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    for row in rows:
        art, p, i = row["id"].rsplit("-", 2)
        n = art[1:]
        right = row["choices"][row["label"]]
        assert right == f"In paragraph {p} of article {n} this is sentence number {i} of the text."
        context = row["question"].split(": ", 1)[1]
        assert row["question"].startswith(f"Article {n}: ") and context.endswith(f"number {int(i) - 1} of the text.")
        for k, wrong in enumerate(row["choices"]):
            if k == row["label"]:
                continue
            assert f"of article {n} " in wrong and wrong not in context and wrong != right
            q, j = wrong.split("paragraph ")[1].split()[0], wrong.split("number ")[1].split()[0]
            before = context.count(".")
            assert q != p or abs(int(j) - int(i)) >= 3 + before
        # scored as HellaSwag is: the context itself, each ending after a space
        assert mc_prompt(row) == (row["question"], [f" {c}" for c in row["choices"]])
    assert build_rows(corpus, 12, seed=3, per_article=3) == rows != build_rows(corpus, 12, seed=4, per_article=3)


def test_cli_writes_a_task_file_the_mc_reader_accepts(corpus, tmp_path, capsys):
    out = tmp_path / "dev" / "cont.jsonl"
    assert main([str(corpus), str(out), "--rows", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 7
    assert len(read_jsonl(out)) == 7
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "x", "title": "X", "text": "X\n\nshort."}) + "\n")
    assert main([str(empty), str(tmp_path / "none.jsonl")]) == 2
    assert "no rows could be built" in capsys.readouterr().err
