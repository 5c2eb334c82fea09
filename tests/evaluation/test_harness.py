"""The lm-evaluation-harness route against the built-in scorer on the same rows (the embedded teacher), the
offline task configs, and the paper's task groups."""

import json

import pytest

pytest.importorskip("lm_eval")

from jetnas.evaluation.harness import PAPER_TASK_GROUPS, render_local_tasks, resolve_tasks, run_harness  # noqa: E402
from jetnas.evaluation.scoring import LanguageModel  # noqa: E402
from jetnas.evaluation.tasks import ClozeTask, MultipleChoiceTask  # noqa: E402

pytestmark = pytest.mark.slow

MMLU = [
    ("astronomy", "Which planet is closest to the Sun?", ["Venus", "Mercury", "Earth", "Mars"], 1),
    ("astronomy", "What is a light-year a unit of?", ["Time", "Brightness", "Distance", "Mass"], 2),
    ("astronomy", "Which object is at the center of our solar system?", ["The Moon", "Jupiter", "The Sun", "Earth"], 2),
    ("nutrition", "Which vitamin does sunlight help the body make?", ["Vitamin C", "Vitamin D", "Vitamin A", "Vitamin K"], 1),
    ("nutrition", "Which nutrient is the main source of energy?", ["Carbohydrates", "Water", "Minerals", "Fiber"], 0),
    ("nutrition", "Iron deficiency commonly causes which condition?", ["Scurvy", "Rickets", "Anemia", "Goiter"], 2),
]
MMLU_DEV = [
    ("astronomy", "How many moons does Earth have?", ["None", "One", "Two", "Three"], 1),
    ("astronomy", "What do we call a group of stars forming a pattern?", ["Galaxy", "Nebula", "Constellation", "Comet"], 2),
    ("nutrition", "Which food is a good source of protein?", ["Lettuce", "Eggs", "Apples", "Rice"], 1),
    ("nutrition", "Which mineral is important for strong bones?", ["Calcium", "Sodium", "Zinc", "Iodine"], 0),
]
ARC = [
    ("Which gas do plants take in from the air to make food?", ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"], 1),
    ("What happens to water when it freezes?", ["It becomes a gas", "It becomes a solid", "It disappears", "It boils"], 1),
    ("Which tool is used to measure temperature?", ["A ruler", "A scale", "A thermometer", "A clock"], 2),
    ("What force pulls objects toward the Earth?", ["Magnetism", "Friction", "Gravity", "Wind"], 2),
    ("Which part of the plant takes in water from the soil?", ["Leaves", "Roots", "Flowers", "Seeds"], 1),
    ("What is the main source of light for the Earth?", ["The Moon", "Street lamps", "The Sun", "Stars"], 2),
]
LAMBADA = [
    ("She opened the door of the old house and called out her brother's name. There was no answer, so she called", "again"),
    ("The children ran down to the beach and jumped into the cold water of the", "sea"),
    ("He had studied for weeks, so when the results came he was glad to see that he had", "passed"),
    ("After dinner they sat by the fire and the grandmother began to tell them a", "story"),
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    mc = lambda task, i, q, c, label, **kw: {"id": f"{task}-{i}", "task": task, "question": q, "choices": c,  # noqa: E731
                                             "label": label, **kw}
    write(d / "mmlu_test.jsonl", [mc("mmlu", i, q, c, a, subject=s) for i, (s, q, c, a) in enumerate(MMLU)])
    write(d / "mmlu_dev.jsonl", [mc("mmlu", 100 + i, q, c, a, subject=s) for i, (s, q, c, a) in enumerate(MMLU_DEV)])
    write(d / "arc_easy_test.jsonl", [mc("arc_easy", i, q, c, a) for i, (q, c, a) in enumerate(ARC)])
    write(d / "lambada.jsonl", [{"id": f"l{i}", "context": c, "target": t} for i, (c, t) in enumerate(LAMBADA)])
    import gzip

    for name, src in (("mmlu_test.jsonl.gz", "mmlu_test.jsonl"), ("lambada_openai_test.jsonl.gz", "lambada.jsonl")):
        with gzip.open(d / name, "wt") as f:
            f.write((d / src).read_text())
    return d


@pytest.mark.parametrize("shots", [0, 2], ids=["0shot", "2shot"])
def test_mmlu_builtin_and_harness_agree(teacher, bench_dir, shots):
    model, tok, _ = teacher
    builtin = MultipleChoiceTask(str(bench_dir / "mmlu_test.jsonl.gz"), shots=shots,
                                 fewshot=str(bench_dir / "mmlu_dev.jsonl")).evaluate(LanguageModel.from_hf(model, tok))
    harness = run_harness(model, tok, ["jetnas_mmlu"], num_fewshot=shots, data_dir=str(bench_dir))
    print(f"mmlu {shots}-shot: built-in {builtin}, harness {harness['jetnas_mmlu']}")
    assert harness["jetnas_mmlu"]["acc"] == pytest.approx(builtin["acc"])
    assert harness["jetnas_mmlu"]["acc_norm"] == pytest.approx(builtin["acc_norm"])


def test_arc_and_lambada_builtin_and_harness_agree(teacher, bench_dir):
    model, tok, _ = teacher
    lm = LanguageModel.from_hf(model, tok)
    arc = MultipleChoiceTask(str(bench_dir / "arc_easy_test.jsonl")).evaluate(lm)
    cloze = ClozeTask(str(bench_dir / "lambada_openai_test.jsonl.gz")).evaluate(lm)
    harness = run_harness(model, tok, ["jetnas_arc_easy", "jetnas_lambada_openai"], data_dir=str(bench_dir))
    print(f"arc_easy: built-in {arc}, harness {harness['jetnas_arc_easy']}; "
          f"lambada: built-in {cloze}, harness {harness['jetnas_lambada_openai']}")
    assert harness["jetnas_arc_easy"]["acc"] == pytest.approx(arc["acc"])
    assert harness["jetnas_arc_easy"]["acc_norm"] == pytest.approx(arc["acc_norm"])
    assert harness["jetnas_lambada_openai"]["acc"] == pytest.approx(cloze["acc"])
    assert harness["jetnas_lambada_openai"]["perplexity"] == pytest.approx(cloze["ppl"], rel=1e-4)


def test_local_configs_and_paper_groups(tmp_path, bench_dir):
    made = render_local_tasks(bench_dir, tmp_path)
    assert {"jetnas_mmlu", "jetnas_mmlu_astronomy", "jetnas_arc_easy", "jetnas_lambada_openai"} <= set(made)
    assert "jetnas_piqa" not in made  # no file for it
    tasks, metrics = resolve_tasks(["commonsense", "retrieval", "gsm8k"])
    assert tasks[:2] == ["arc_challenge", "arc_easy"] and metrics["fda"] == "contains,none" and "gsm8k" in tasks
    assert set(PAPER_TASK_GROUPS) == {"mmlu", "mmlu_pro", "bbh", "math", "commonsense", "retrieval", "code",
                                      "longbench"}
    with pytest.raises(ValueError, match="--data-dir"):
        run_harness(None, None, ["jetnas_mmlu"], data_dir=None)


def test_an_unreachable_hub_ends_in_one_line(monkeypatch, capsys):
    """Offline with lm-evaluation-harness installed: its datasets' ConnectionError, deep in a traceback, becomes one
    line saying what reads local files instead; the network notice came first."""
    import lm_eval

    from jetnas.validation import InputError
    from tests.utils import tiny_lm

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    lm, model = tiny_lm()
    with pytest.raises(InputError, match=r"^hellaswag: Couldn't reach 'Rowan/hellaswag' on the Hub .* \(offline\?\): "
                                         r"the built-in tasks \(mc:, cloze:, ppl:\)"):
        run_harness(model, lm.tokenizer, ["hellaswag"])
    assert "needs the network" in capsys.readouterr().err
