"""Paired bootstrap intervals between two models' per-item outcomes on the same rows."""

import math

import numpy as np
import pytest

from jetnas.evaluation.paired import choice_agreement, paired_bootstrap


def test_identical_outcomes_differ_by_nothing():
    rows = {"acc": [1, 0, 1, 1, 0] * 40}
    p = paired_bootstrap(rows, rows, chance=0.25)
    assert p["difference"] == 0 and p["difference_ci95"] == [0, 0] and p["disagree"] == 0
    assert p["kept"] == pytest.approx(1.0) and p["kept_ci95"] == pytest.approx([1.0, 1.0])


def test_the_interval_matches_the_paired_standard_error():
    """a gets 60 of 2,000 rows right that b gets wrong, and nothing else differs: the per-row difference is 0 or 1,
    so its 95% interval is about d +- 1.96 sqrt(d (1 - d) / n), far narrower than two independent samples' would be
    (sqrt(2 p (1 - p) / n))."""
    rng = np.random.default_rng(1)
    b = (rng.random(2000) < 0.4).astype(int)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:60]] = 1
    p = paired_bootstrap({"acc": a.tolist()}, {"acc": b.tolist()})
    d, n = 60 / 2000, 2000
    assert p["difference"] == pytest.approx(d) and p["disagree"] == pytest.approx(d)
    lo, hi = p["difference_ci95"]
    half = 1.96 * math.sqrt(d * (1 - d) / n)
    assert lo < d < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.2)
    assert (hi - lo) / 2 < 0.5 * 1.96 * math.sqrt(2 * 0.4 * 0.6 / n)


def test_kept_and_its_interval():
    rng = np.random.default_rng(2)
    b = (rng.random(4000) < 0.33).astype(int)  # a teacher at 33% on a 4-way task (chance 25%)
    a = np.where(rng.random(4000) < 0.1, (rng.random(4000) < 0.3).astype(int), b)  # a hybrid that mostly agrees
    p = paired_bootstrap({"acc": a.tolist()}, {"acc": b.tolist()}, chance=0.25)
    kept = (a.mean() - 0.25) / (b.mean() - 0.25)
    assert p["kept"] == pytest.approx(kept)
    lo, hi = p["kept_ci95"]
    assert lo < kept < hi and hi - lo < 0.5
    # a teacher at chance has no margin: no share and no interval
    flat = paired_bootstrap({"acc": [1, 0, 0, 0] * 50}, {"acc": [1, 0, 0, 0] * 50}, chance=0.25)
    assert flat["kept"] is None and flat["kept_ci95"] is None


def test_grouped_items_are_resampled_by_row():
    """Retrieval: each row's answers share one document. Resampling rows, not answers, widens the interval when the
    answers of a row move together."""
    group = [r for r in range(50) for _ in range(8)]
    b = [0] * 400
    a = [1 if r % 5 == 0 else 0 for r in group]  # a is right on every answer of 10 whole rows
    grouped = paired_bootstrap({"acc": a, "group": group}, {"acc": b, "group": group})
    flat = paired_bootstrap({"acc": a}, {"acc": b})
    assert grouped["rows"] == 50 and flat["rows"] == 400
    assert grouped["difference"] == flat["difference"] == pytest.approx(0.2)
    width = lambda p: p["difference_ci95"][1] - p["difference_ci95"][0]
    assert width(grouped) > 2 * width(flat)


def test_outcomes_that_cannot_be_paired():
    assert paired_bootstrap({"acc": [1, 0]}, {"acc": [1, 0, 1]}) is None              # other rows
    assert paired_bootstrap({"acc": [1, 0]}, {"acc_norm": [1, 0]}) is None            # no such metric
    assert paired_bootstrap({"acc": [1, 0], "group": [0, 1]}, {"acc": [1, 0], "group": [0, 0]}) is None
    with pytest.raises(ValueError, match="3 values of 'acc' but 2 group ids"):
        paired_bootstrap({"acc": [1, 0, 1], "group": [0, 1]}, {"acc": [1, 0, 1], "group": [0, 1]})


def test_the_command_compares_two_evaluations(tmp_path, capsys):
    import json

    from jetnas.evaluation.paired import main

    for name, rows in (("a", [1, 1, 0, 1] * 25), ("b", [1, 0, 0, 1] * 25)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "outcomes.json").write_text(json.dumps({"tasks": {"mc:x": {"acc": rows},
                                                                             f"only_{name}": {"acc": [1]}}}))
    assert main([str(tmp_path / "a"), str(tmp_path / "b" / "outcomes.json")]) == 0
    table = capsys.readouterr().out
    assert "| mc:x | acc | 0.7500 | 0.5000 | +0.2500 |" in table and "only_" not in table
    assert table.splitlines()[-1] == "1 of 1 differences are told from 0 by their paired 95% interval: mc:x acc +0.2500"
    # a run folder: its hybrid's evaluation is eval/; --out keeps the numbers
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "outcomes.json").write_text((tmp_path / "a" / "outcomes.json").read_text())
    assert main([str(tmp_path / "run"), str(tmp_path / "a"), "--out", str(tmp_path / "same.json")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "all 2 differences are within their paired 95% intervals of 0"
    assert json.loads((tmp_path / "same.json").read_text())["apart"] == []
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mc:x acc"]["disagree"] == pytest.approx(0.25)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), str(tmp_path / "missing")])
    assert "no outcomes.json there" in capsys.readouterr().err


def test_choice_agreement_reads_each_rows_choice_log_likelihoods():
    """The share of rows with the same top choice (with its interval) and the mean KL between the two models'
    distributions over a row's choices: 0 for the same scores, larger as the weights part, None without `ll`."""
    import math

    ll = [[-1.0, -2.0, -3.0, -4.0], [-2.0, -1.0, -5.0, -5.0], [-3.0, -3.5, -1.0, -9.0], [-1.0, -1.5]]
    same = choice_agreement({"ll": ll}, {"ll": ll})
    assert same["agree"] == 1.0 and same["agree_ci95"] == [1.0, 1.0] and same["choice_kl"] == pytest.approx(0.0)
    # the last row's top choice flips; its KL is the two-way softmax's
    other = ll[:3] + [[-1.5, -1.0]]
    flip = choice_agreement({"ll": other}, {"ll": ll})
    p, q = 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5))     # b = softmax(-1, -1.5), a = softmax(-1.5, -1)
    want = (p * math.log(p / q) + q * math.log(q / p)) / 4
    assert flip["agree"] == 0.75 and flip["choice_kl"] == pytest.approx(want) and flip["rows"] == 4
    assert choice_agreement({"acc": [1]}, {"ll": ll}) is None                   # no scores on one side
    assert choice_agreement({"ll": ll[:3]}, {"ll": ll}) is None                 # other rows
    assert choice_agreement({"ll": ll[:3] + [[-1.0, -1.5, -2.0]]}, {"ll": ll}) is None   # other choices
