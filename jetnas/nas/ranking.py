"""Ranking the candidates of a block or shape search: each task's metric min-max normalised among the candidates
(1 = best on that task, direction-aware), averaged over the tasks that tell them apart; ties go to the faster one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskMetric:
    """The metric of a task that tables show and the search ranks by."""

    task: str
    metric: str
    higher_is_better: bool = True


def candidate_scores(records: Mapping[str, dict], metrics: Sequence[TaskMetric]) -> dict[str, float]:
    """Per candidate, the mean over tasks of its min-max normalised metric among the candidates (1 = best, 0 =
    worst on that task, direction-aware). Tasks on which all candidates tie cannot rank and are left out; with
    none left every score is 0."""
    scores = {name: 0.0 for name in records}
    used = 0
    for m in metrics:
        values = {name: r["tasks"][m.task][m.metric] for name, r in records.items()}
        lo, hi = min(values.values()), max(values.values())
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            continue
        used += 1
        for name, v in values.items():
            frac = (v - lo) / (hi - lo)
            scores[name] += frac if m.higher_is_better else 1 - frac
    return {name: s / used if used else 0.0 for name, s in scores.items()}


def rank(records: Mapping[str, dict], scores: Mapping[str, float]) -> list[str]:
    """Names best first: by score, then decode throughput, then training throughput, then name."""
    def key(name):
        r = records[name]
        return (-scores[name], -(r.get("decode_tokens_per_s") or 0.0), -(r.get("train_tokens_per_s") or 0.0), name)

    return sorted(records, key=key)
