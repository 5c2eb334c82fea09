"""Paired uncertainty of accuracies measured on the same rows: how sure a difference between two models is.

Two models evaluated on the same test rows differ far less by chance than two independent samples would: most rows
both get right or both get wrong, and only the rows they disagree on carry the difference. An evaluation keeps each
task's per-row outcomes (`outcomes.json` beside `eval.json`, from `Task.evaluate_rows`):

    {"acc": [1, 0, 1, ...], "acc_norm": [...], "group": [0, 0, 0, 1, ...]}

one entry per scored item. `group` is present where several items share one row (a retrieval row's queries share
its document); a row is then the unit that is resampled, as the items of one row are not independent.

`paired_bootstrap` resamples rows with replacement, the same rows for both models, and returns percentile
intervals of the difference and of the share of the teacher's margin over chance that the other model keeps
(`(a - chance) / (b - chance)`, issue 19's `kept`): the percentile bootstrap of Efron & Tibshirani (1993), with
rows resampled jointly for both models; Dror et al. (2018) survey such tests for NLP test sets.
"""

from __future__ import annotations

import numpy as np

#: resamples of `paired_bootstrap`: on a HellaSwag-sized pair (5,021 rows, 20% of them redrawn), each end of the kept
#: interval moved within 9% of its width over ten seeds
RESAMPLES = 2000


def _rows(outcomes: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the sum of the metric over its items and the number of items (rows are `group`s when given)."""
    values = np.asarray(outcomes[metric], dtype=np.float64)
    group = outcomes.get("group")
    if group is None:
        return values, np.ones_like(values)
    group = np.asarray(group)
    if len(group) != len(values):
        raise ValueError(f"outcomes: {len(values)} values of {metric!r} but {len(group)} group ids")
    _, index = np.unique(group, return_inverse=True)
    return np.bincount(index, weights=values), np.bincount(index).astype(np.float64)


def paired_bootstrap(a: dict, b: dict, metric: str = "acc", chance: float | None = None,
                     resamples: int = RESAMPLES, seed: int = 0) -> dict | None:
    """95% intervals for model `a` against model `b` on the same rows, or None when the outcomes cannot be paired
    (a metric missing, or different rows: a different count or grouping).

    Returns `{"a", "b", "difference", "difference_ci95", "disagree", "rows"}` and, with `chance` given,
    `"kept"` and `"kept_ci95"` (None where `b` is at or below chance; the interval drops the resamples in which it
    is, and is None when more than 5% of them are)."""
    if metric not in a or metric not in b or a.get("group") != b.get("group"):
        return None
    sa, na = _rows(a, metric)
    sb, nb = _rows(b, metric)
    if len(sa) != len(sb) or not np.array_equal(na, nb) or len(sa) == 0:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sa), size=(resamples, len(sa)))
    count = nb[picks].sum(axis=1)
    mean_a, mean_b = sa[picks].sum(axis=1) / count, sb[picks].sum(axis=1) / count
    point_a, point_b = sa.sum() / nb.sum(), sb.sum() / nb.sum()
    items_a, items_b = np.asarray(a[metric], dtype=np.float64), np.asarray(b[metric], dtype=np.float64)
    out = {"a": float(point_a), "b": float(point_b), "difference": float(point_a - point_b),
           "difference_ci95": [float(x) for x in np.percentile(mean_a - mean_b, [2.5, 97.5])],
           "disagree": float(np.mean(items_a != items_b)), "rows": len(sa)}
    if chance is not None:
        margin = point_b - chance
        out["kept"] = float((point_a - chance) / margin) if margin > 0 else None
        ok = mean_b - chance > 0
        if out["kept"] is None or ok.mean() < 0.95:
            out["kept_ci95"] = None
        else:
            kept = (mean_a[ok] - chance) / (mean_b[ok] - chance)
            out["kept_ci95"] = [float(x) for x in np.percentile(kept, [2.5, 97.5])]
    return out


def choice_agreement(a: dict, b: dict) -> dict | None:
    """How closely model `a` makes model `b`'s choices on the same multiple-choice rows, from each row's choice
    log-likelihoods (`ll`, as `jetnas.evaluation.tasks.mc_outcomes` keeps them): `agree`, the share of rows whose
    top choice is the same, with its 95% bootstrap interval over rows (`agree_ci95`); `choice_kl`, the mean over
    rows of KL(b || a) between the two softmax distributions over the row's choices (nats; 0 when `a` ranks and
    weighs the choices as `b` does), which moves with every row's scores where accuracy moves only with flips.
    None without `ll` on both sides or on other rows."""
    la, lb = a.get("ll"), b.get("ll")
    if not la or not lb or len(la) != len(lb) or any(len(x) != len(y) for x, y in zip(la, lb)):
        return None
    same, kl = [], []
    for x, y in zip(la, lb):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        same.append(float(x.argmax() == y.argmax()))
        px, py = x - np.logaddexp.reduce(x), y - np.logaddexp.reduce(y)
        kl.append(float(np.sum(np.exp(py) * (py - px))))
    same = np.asarray(same)
    picks = np.random.default_rng(0).integers(0, len(same), size=(RESAMPLES, len(same)))
    return {"agree": float(same.mean()),
            "agree_ci95": [float(v) for v in np.percentile(same[picks].mean(axis=1), [2.5, 97.5])],
            "choice_kl": float(np.mean(kl)), "rows": len(same)}


def compare(a: dict, b: dict, chance: dict[str, float] | None = None) -> dict[str, dict]:
    """Per task both outcome files hold (`outcomes.json`'s `tasks`), `paired_bootstrap` of `a` against `b` on each
    accuracy metric; `chance` by task name gives the `kept` share too."""
    out = {}
    for task, rows in a.items():
        if task not in b:
            continue
        for metric in ("acc", "acc_norm"):
            paired = paired_bootstrap(rows, b[task], metric, (chance or {}).get(task))
            if paired is not None:
                out[f"{task} {metric}"] = paired
        choices = choice_agreement(rows, b[task])
        if choices is not None and f"{task} acc" in out:
            out[f"{task} acc"]["choices"] = choices
    return out


def apart(rows: dict[str, dict]) -> list[str]:
    """The keys of `compare`'s rows whose paired 95% interval of the difference leaves out 0."""
    return [key for key, p in rows.items() if p["difference_ci95"][0] > 0 or p["difference_ci95"][1] < 0]


def main(argv: list[str] | None = None) -> int:
    """`python -m jetnas.evaluation.paired A B`: two evaluations' `outcomes.json` (the files, their folders, or a
    `jetnas run` folder, whose hybrid evaluation is `eval/`) on the same rows; prints a table of A against B with
    paired 95% intervals and, last, which differences those intervals tell from 0 (a rerun of the same recipe
    should have none, but for the ~1 in 20 a 95% interval misses by chance); with --json the numbers, with --out
    FILE also written there."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m jetnas.evaluation.paired", description=main.__doc__)
    parser.add_argument("a", help="outcomes.json of model A (or the evaluation folder holding it)")
    parser.add_argument("b", help="outcomes.json of model B, evaluated on the same rows")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON instead of a table")
    parser.add_argument("--out", default=None, help="also write the comparison as JSON to this file")
    args = parser.parse_args(argv)
    files = []
    for given in (args.a, args.b):
        path = Path(given)
        if path.is_dir():
            path = path / "outcomes.json" if (path / "outcomes.json").is_file() else path / "eval" / "outcomes.json"
        if not path.is_file():
            parser.error(f"{given!r}: no outcomes.json there (an evaluation writes it beside eval.json; a run "
                         f"folder holds its hybrid's in eval/)")
        files.append(json.loads(path.read_text()).get("tasks", {}))
    rows = compare(*files)
    if not rows:
        parser.error("the two evaluations share no task with outcomes on the same rows")
    if args.out:
        from jetnas.files import write_json_atomic

        write_json_atomic(args.out, {"a": args.a, "b": args.b, "rows": rows, "apart": apart(rows)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| task | metric | A | B | A - B | 95% interval (paired) | rows disagreeing | rows |")
    print("|---|---|---|---|---|---|---|---|")
    for key, p in rows.items():
        task, metric = key.rsplit(" ", 1)
        lo, hi = p["difference_ci95"]
        print(f"| {task} | {metric} | {p['a']:.4f} | {p['b']:.4f} | {p['difference']:+.4f} | "
              f"{lo:+.4f} to {hi:+.4f} | {100 * p['disagree']:.1f}% | {p['rows']} |")
    agreement = [(key.rsplit(" ", 1)[0], p["choices"]) for key, p in rows.items() if "choices" in p]
    if agreement:
        print()
        print("| task | same top choice | 95% interval | mean KL(B || A) over the choices | rows |")
        print("|---|---|---|---|---|")
        for task, c in agreement:
            lo, hi = c["agree_ci95"]
            print(f"| {task} | {100 * c['agree']:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% | {c['choice_kl']:.4f} | "
                  f"{c['rows']} |")
        print()
    told = apart(rows)
    if told:
        print(f"{len(told)} of {len(rows)} differences are told from 0 by their paired 95% interval: "
              + "; ".join(f"{k} {rows[k]['difference']:+.4f}" for k in told))
    else:
        print(f"all {len(rows)} differences are within their paired 95% intervals of 0")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
