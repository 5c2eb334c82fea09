"""Built-in evaluation on a tiny random model with a tiny in-memory tokenizer: the scores are what they claim."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from jetnas.cli import main
from jetnas.evaluation.scoring import encode_pair, score_continuations, token_nll
from jetnas.evaluation.tasks import (MultipleChoiceTask, RetrievalTask, distance_bucket, parse_task,
                                    source_distance)
from tests.utils import tiny_lm, tiny_tokenizer

MC_ROWS = [
    {"id": f"q{i}", "task": task, "question": q, "choices": ["Paris", "Lisbon", "a fox", "4821"], "label": i % 4,
     "subject": "geography"}
    for i, (task, q) in enumerate([("mmlu", "What is the capital of France?"), ("arc_easy", "Which animal jumps?"),
                                   ("piqa", "How do I remember a code?"), ("hellaswag", "The farmer walked along"),
                                   ("mmlu", "Which city is in Portugal?"), ("arc_easy", "What is 4821?")])
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_scores_are_exact_log_likelihoods():
    lm, model = tiny_lm()
    ctx, cont = "Question: what is the capital of France?\nAnswer:", " Paris"
    [score] = score_continuations(lm, [(ctx, cont)])
    c, x = encode_pair(lm, ctx, cont)
    with torch.no_grad():
        logits = model(torch.tensor([c + x])).logits[0]
    logp = F.log_softmax(logits[len(c) - 1 : -1], -1)
    manual = logp.gather(-1, torch.tensor(x)[:, None]).sum().item()
    assert score.logprob == pytest.approx(manual, rel=1e-5) and score.num_tokens == len(x)
    assert score.is_greedy == bool((logp.argmax(-1) == torch.tensor(x)).all())


def test_batching_and_padding_do_not_change_scores():
    requests = [(f"Question: item {i} is", f" code {i * 7}") for i in range(9)]
    one = score_continuations(tiny_lm(batch_size=1)[0], requests)
    many = score_continuations(tiny_lm(batch_size=8)[0], requests)
    for a, b in zip(one, many):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-5, abs=1e-5) and a.is_greedy == b.is_greedy


def test_trailing_context_space_moves_to_the_continuation():
    lm, _ = tiny_lm()
    assert encode_pair(lm, "Answer: ", "Paris") == encode_pair(lm, "Answer:", " Paris")


def test_token_nll_counts_every_token_once():
    lm, model = tiny_lm()
    tokens = torch.randint(0, 320, (300,))
    for window, stride in [(64, None), (64, 16), (300, None)]:
        nll, count = token_nll(lm, tokens, window, stride)
        assert count == 299
    with torch.no_grad():
        logp = F.log_softmax(model(tokens[None, :-1]).logits[0], -1)
    exact = -logp.gather(-1, tokens[1:, None]).sum().item()
    assert token_nll(lm, tokens, 300)[0] == pytest.approx(exact, rel=1e-5)


def test_multiple_choice_metrics_follow_the_scores(tmp_path):
    lm, _ = tiny_lm()
    task = MultipleChoiceTask(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS))
    result = task.evaluate(lm)
    correct = 0
    for row in MC_ROWS:
        from jetnas.evaluation.tasks import mc_prompt

        ctx, conts = mc_prompt(row)
        scores = [s.logprob for s in score_continuations(lm, [(task.context(row), c) for c in conts])]
        correct += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    assert result["acc"] == pytest.approx(correct / len(MC_ROWS)) and result["n"] == len(MC_ROWS)
    assert 0 < result["correct_nll"] < 50
    assert result["chance"] == pytest.approx(sum(1 / len(r["choices"]) for r in MC_ROWS) / len(MC_ROWS))
    # the per-row outcomes behind the metrics (paired intervals between models): one 0/1 per row, same means
    metrics, outcomes = task.evaluate_rows(lm)
    assert metrics == result and set(outcomes) == {"acc", "acc_norm", "ll"}
    assert [max(range(4), key=ll.__getitem__) == row["label"] for ll, row in zip(outcomes["ll"], MC_ROWS)] == \
        [bool(x) for x in outcomes["acc"]]
    assert len(outcomes["acc"]) == len(MC_ROWS) and set(outcomes["acc"]) <= {0, 1}
    assert sum(outcomes["acc"]) / len(MC_ROWS) == pytest.approx(result["acc"])
    assert sum(outcomes["acc_norm"]) / len(MC_ROWS) == pytest.approx(result["acc_norm"])


def test_mmlu_prompts_are_lettered_with_a_description_and_shots(tmp_path):
    task = MultipleChoiceTask(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS), shots=1)
    ctx = task.context(MC_ROWS[4])
    assert ctx.startswith("The following are multiple choice questions (with answers) about geography.\n\n")
    assert "\nA. Paris\nB. Lisbon\nC. a fox\nD. 4821\nAnswer: A\n\n" in ctx  # the shot, with its answer
    assert ctx.endswith("Which city is in Portugal?\nA. Paris\nB. Lisbon\nC. a fox\nD. 4821\nAnswer:")


@pytest.mark.parametrize("kind", ["kv", "needle", "mqar"])
def test_retrieval_rows_are_deterministic_and_fill_the_length(kind):
    lm, _ = tiny_lm(max_length=1024)
    task = RetrievalTask(kind, 400, n=3, seed=5)
    rows, again = task.make_rows(lm), RetrievalTask(kind, 400, n=3, seed=5).make_rows(lm)
    assert rows == again and rows != RetrievalTask(kind, 400, n=3, seed=6).make_rows(lm)
    for segments in rows:
        text = "".join(t for t, _ in segments)
        assert 0.7 * 400 < len(lm.encode(text)) <= 400
        answers = [t for t, is_answer in segments if is_answer]
        assert answers and all(a.startswith(" ") for a in answers)
        if kind != "mqar":
            assert text.count(answers[0].strip()) >= 2  # stated in the context, then given as the answer


def test_distance_buckets():
    assert [distance_bucket(d) for d in (0, 127, 128, 255, 256, 1023, 1024, 5000)] == [
        (0, 127), (0, 127), (128, 255), (128, 255), (256, 511), (512, 1023), (1024, 2047), (4096, 8191)]


@pytest.mark.parametrize("kind", ["kv", "needle", "mqar"])
def test_retrieval_accuracy_by_distance_adds_up(kind):
    """Every answer's source statement is found, at a distance the tokenizer confirms, and the buckets' accuracies
    weighted by their counts give the overall accuracy."""
    lm, _ = tiny_lm(max_length=1024)
    task = RetrievalTask(kind, 600, n=3, seed=2)
    for segments in task.make_rows(lm):
        first = segments[0][0]
        body = first[: first.rfind("\n")]  # the statements / filler with the facts, before the first question
        context = ""
        for text, is_answer in segments:
            if is_answer:
                statement = re.split(r"\n|\? ", context)[-1] + text  # e.g. "red apple is 42"
                assert statement in body
                distance = source_distance(lm, context, text)
                # the source lies in the body: further back than the questions, within the context
                assert len(lm.encode(context[len(body):])) <= distance <= len(lm.encode(context))
            context += text
    result, outcomes = task.evaluate_rows(lm)
    # one outcome per answer, grouped by the row (document) it belongs to
    assert len(outcomes["acc"]) == len(outcomes["group"]) == result["n"]
    assert sorted(set(outcomes["group"])) == list(range(3))
    assert sum(outcomes["acc"]) == pytest.approx(result["acc"] * result["n"])
    counts = {k[2:]: v for k, v in result.items() if k.startswith("n@")}
    assert sum(counts.values()) == result["n"] and counts
    assert sum(result[f"acc@{b}"] * n for b, n in counts.items()) == pytest.approx(result["acc"] * result["n"])
    if kind == "mqar":  # statements spread over the whole context: several buckets
        assert len(counts) >= 2


@pytest.mark.parametrize("kind, length", [("needle", 300), ("kv", 260), ("mqar", 200)])
def test_rows_are_built_as_the_one_line_at_a_time_bisection_builds_them(kind, length, monkeypatch):
    """`_fill` encodes lines a block at a time and `_fit` gallops from an estimate; both must give the rows the
    plain loops give (the evaluation's rows are fixed by their seed: committed results were scored on them)."""
    from jetnas.evaluation import tasks

    lm, _ = tiny_lm(max_length=1024)

    def fill_one_at_a_time(self, rng, lm, make_line):
        lines, used = [], 0
        while used < self.length:
            lines.append(make_line(rng))
            used += len(lm.encode(" " + lines[-1]))
        return lines

    fast = RetrievalTask(kind, length, n=12, seed=5)
    rows = fast.make_rows(lm)
    monkeypatch.setattr(tasks, "_ROWS", {})
    monkeypatch.setattr(RetrievalTask, "_fill", fill_one_at_a_time)
    monkeypatch.setattr(RetrievalTask, "_fit", RetrievalTask._fit_reference)
    assert RetrievalTask(kind, length, n=12, seed=5).make_rows(lm) == rows


def test_retrieval_rows_are_built_once_per_task_and_tokenizer(monkeypatch):
    from jetnas.evaluation import tasks

    monkeypatch.setattr(tasks, "_ROWS", {})
    lm, _ = tiny_lm(max_length=1024)
    rows = RetrievalTask("needle", 300, n=3, seed=4).make_rows(lm)
    rows[0].append(("changed by a caller", False))                   # the caller's copy, not the kept rows
    calls = []
    monkeypatch.setattr(RetrievalTask, "_needle", lambda self, rng, lm: calls.append(1) or [("built", False)])
    again = RetrievalTask("needle", 300, n=3, seed=4).make_rows(tiny_lm(max_length=1024)[0])  # another tokenizer object
    assert not calls and again == [r for r in RetrievalTask("needle", 300, n=3, seed=4).make_rows(lm)]
    assert ("changed by a caller", False) not in again[0]
    assert RetrievalTask("needle", 300, n=3, seed=5).make_rows(lm) == [[("built", False)]] * 3  # another seed: built


def test_task_names_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    assert parse_task(f"mc:{path}?shots=2&limit=3").shots == 2
    assert parse_task("retrieval:needle@4096?n=7").n == 7
    with pytest.raises(ValueError, match="unknown built-in task kind 'qa'"):
        parse_task("qa:x")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['shot'\]"):
        parse_task(f"mc:{path}?shot=2")
    with pytest.raises(ValueError, match="needs KIND@LENGTH"):
        parse_task("retrieval:kv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_task(f"mc:{tmp_path}/missing.jsonl")


def test_eval_cli_writes_json_and_markdown(tmp_path, capsys):
    lm, model = tiny_lm()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    cloze = write_jsonl(tmp_path / "cloze.jsonl", [{"context": "The quick brown fox jumps over the lazy", "target": "dog"}])
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    tasks = f"mc:{mc},cloze:{cloze},ppl:{text}?window=64,retrieval:needle@200?n=2"
    assert main(["eval", "--model", str(tmp_path / "model"), "--tasks", tasks, "--out-dir", str(tmp_path / "out"),
                 "--max-length", "256"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["results"]) == set(tasks.split(","))
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["tasks"][f"mc:{mc}"]["n"] == len(MC_ROWS)
    assert math.isfinite(saved["tasks"][f"ppl:{text}?window=64"]["ppl"])
    assert "| task (" in (tmp_path / "out" / "eval.md").read_text()
    # per-item outcomes of the accuracy tasks (not perplexity), agreeing with eval.json
    outcomes = json.loads((tmp_path / "out" / "outcomes.json").read_text())
    assert set(outcomes["tasks"]) == {f"mc:{mc}", f"cloze:{cloze}", "retrieval:needle@200?n=2"}
    assert outcomes["model_id"] == saved["model_id"]
    for name, rows in outcomes["tasks"].items():
        assert sum(rows["acc"]) / len(rows["acc"]) == pytest.approx(saved["tasks"][name]["acc"])


def test_eval_cli_keeps_finished_tasks_and_resumes(tmp_path, capsys):
    _, model = tiny_lm()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    out = tmp_path / "out"
    args = ["eval", "--model", str(tmp_path / "model"), "--out-dir", str(out), "--max-length", "256"]
    assert main(args + ["--tasks", f"mc:{mc}"]) == 0
    saved = json.loads((out / "eval.json").read_text())
    saved["tasks"][f"mc:{mc}"]["acc"] = -1.0  # a marker: a resumed run must keep, not recompute, this task
    (out / "eval.json").write_text(json.dumps(saved))
    assert main(args + ["--tasks", f"mc:{mc},retrieval:needle@200?n=2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["results"][f"mc:{mc}"]["acc"] == -1.0 and "retrieval:needle@200?n=2" in result["results"]
    # a kept task keeps its outcomes too
    assert set(json.loads((out / "outcomes.json").read_text())["tasks"]) == {f"mc:{mc}", "retrieval:needle@200?n=2"}
    assert main(args + ["--tasks", f"mc:{mc}", "--no-resume"]) == 0
    assert json.loads((out / "eval.json").read_text())["tasks"][f"mc:{mc}"]["acc"] >= 0
    # the same path with new weights (a retrained model): nothing is kept
    saved = json.loads((out / "eval.json").read_text())
    saved["tasks"][f"mc:{mc}"]["acc"] = -1.0
    (out / "eval.json").write_text(json.dumps(saved))
    model.save_pretrained(tmp_path / "model")
    assert main(args + ["--tasks", f"mc:{mc}"]) == 0
    assert json.loads((out / "eval.json").read_text())["tasks"][f"mc:{mc}"]["acc"] >= 0


@pytest.mark.parametrize("rows, message", [
    ([], r"empty.jsonl: no rows \(an empty task file\)"),
    ([MC_ROWS[0], {"question": "q", "choices": ["a", "b"]}], r"line 2: no 'label' field"),
    ([MC_ROWS[0], {**MC_ROWS[1], "label": 4}], r"line 2: label=4: must be the index of the answer among its 4 "
                                               r"choices"),
    ([{**MC_ROWS[0], "label": True}], r"line 1: label=True: must be the index"),
    ([{**MC_ROWS[0], "choices": "Paris"}], r"line 1: choices='Paris': must be a list of at least 2 strings"),
    ([{**MC_ROWS[0], "question": None}], r"line 1: question=None: must be a string"),
], ids=["empty", "no-label", "label-out-of-range", "label-bool", "choices-string", "question-none"])
def test_multiple_choice_files_are_validated_row_by_row(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "empty.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        parse_task(f"mc:{path}")


def test_cloze_and_perplexity_files_are_validated(tmp_path):
    lm, _ = tiny_lm()
    path = write_jsonl(tmp_path / "cloze.jsonl", [{"context": "The quick brown", "target": "fox"}, {"context": "x"}])
    with pytest.raises(ValueError, match=r"cloze.jsonl line 2: no 'target' field: cloze rows need non-empty"):
        parse_task(f"cloze:{path}")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "cut')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not valid JSON"):
        parse_task(f"ppl:{tmp_path / 'bad.jsonl'}").evaluate(lm)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"odd.bin: 3 bytes is not a whole number of 2-byte token ids"):
        parse_task(f"ppl:{tmp_path / 'odd.bin'}").evaluate(lm)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.bin: the token file is empty"):
        parse_task(f"ppl:{tmp_path / 'empty.bin'}").evaluate(lm)
    torch.tensor([1, 2, 3, 60000], dtype=torch.int32).numpy().astype("<u2").tofile(tmp_path / "far.bin")
    with pytest.raises(ValueError, match=rf"far.bin: token id 60000 at position 3 is outside the model's vocabulary "
                                         rf"of {lm.vocab_size}"):
        parse_task(f"ppl:{tmp_path / 'far.bin'}").evaluate(lm)
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(ValueError, match=r"one.txt: 1 token\(s\): perplexity needs at least 2"):
        parse_task(f"ppl:{tmp_path / 'one.txt'}").evaluate(lm)
    with pytest.raises(ValueError, match=r"option limit=-3: must be an integer >= 1"):
        parse_task(f"mc:{write_jsonl(tmp_path / 'mc.jsonl', MC_ROWS)}?limit=-3")


class RecordingBar:
    """Stands in for tqdm: records the total and every update."""

    made: list = []

    def __init__(self, total=None, **kwargs):
        self.total, self.n, self.updates, self.kwargs = total, 0, [], kwargs
        RecordingBar.made.append(self)

    def update(self, k=1):
        self.n += k
        self.updates.append(k)

    def refresh(self):
        pass

    def close(self):
        pass


def test_the_progress_bar_counts_rows_not_answer_choices(tmp_path, monkeypatch):
    from jetnas.evaluation import scoring

    monkeypatch.setattr(scoring, "tqdm", RecordingBar)
    RecordingBar.made = []
    lm, _ = tiny_lm(batch_size=3)  # batches of 3 requests cut the rows' 4 answers apart
    MultipleChoiceTask(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)).evaluate(lm, progress=True)
    bar = RecordingBar.made[-1]
    assert bar.total == len(MC_ROWS) and bar.n == len(MC_ROWS) and bar.kwargs["unit"] == "row"
    with pytest.raises(ValueError, match="rows gives 1 row numbers for 2 requests"):
        score_continuations(lm, [("a", " b"), ("c", " d")], rows=[0])
