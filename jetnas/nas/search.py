"""Full-attention placement search (PostNAS step 1): beam search over which layers stay attention, under a budget.

Pure bookkeeping: candidates are per-layer choices ("attn", "swa", "linear") and the search only calls a
`score(candidate) -> comparable` function (higher is better), so it is tested with synthetic objectives and knows
nothing of models or training. Scores are cached: every candidate is evaluated once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from jetnas.nas.sampling import Budget

Candidate = tuple[str, ...]


def make_candidate(num_layers: int, attn: Iterable[int] = (), swa: Iterable[int] = ()) -> Candidate:
    """All-linear except the given attention / sliding-window layers."""
    choice = ["linear"] * num_layers
    for kind, layers in (("attn", attn), ("swa", swa)):
        for i in layers:
            if not 0 <= i < num_layers:
                raise ValueError(f"layer {i} is outside 0..{num_layers - 1}")
            if choice[i] != "linear":
                raise ValueError(f"layer {i} is given twice")
            choice[i] = kind
    return tuple(choice)


def describe(candidate: Candidate) -> dict[str, list[int]]:
    """`{"attn": [...], "swa": [...]}` layer indices of a candidate."""
    return {k: [i for i, c in enumerate(candidate) if c == k] for k in ("attn", "swa")}


@dataclass
class CachedScorer:
    """Memoises `score` and counts evaluations."""

    score: Callable[[Candidate], object]
    cache: dict = field(default_factory=dict)

    def __call__(self, candidate: Candidate):
        if candidate not in self.cache:
            self.cache[candidate] = self.score(candidate)
        return self.cache[candidate]


def beam_search(num_layers: int, budget: Budget, score: Callable[[Candidate], object], beam_width: int = 4,
                on_level: Callable[[int, list], None] | None = None) -> list[tuple[Candidate, object]]:
    """Beam search from the all-linear network, adding one attention or sliding-window layer per level until the
    budget is spent; each level keeps the `beam_width` best candidates.

    Returns every final-level candidate that was scored, best first (ties broken by the candidate, so results are
    deterministic). `on_level(level, ranked)` is called after each level (progress reporting).
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if budget.total > num_layers:
        raise ValueError(f"budget {budget} needs more layers than the model's {num_layers}")
    if budget.total == 0:
        start = make_candidate(num_layers)
        return [(start, score(start))]
    frontier = [make_candidate(num_layers)]
    ranked: list[tuple[Candidate, object]] = []
    for level in range(budget.total):
        expansions: dict[Candidate, None] = {}
        for cand in frontier:
            for kind, allowed in (("attn", budget.attn), ("swa", budget.swa)):
                if cand.count(kind) >= allowed:
                    continue
                for i, c in enumerate(cand):
                    if c == "linear":
                        expansions[cand[:i] + (kind,) + cand[i + 1:]] = None
        ranked = sorted(((c, score(c)) for c in expansions), key=lambda cs: (_neg(cs[1]), cs[0]))
        frontier = [c for c, _ in ranked[:beam_width]]
        if on_level is not None:
            on_level(level, ranked)
    return ranked


def _neg(score):
    """Sort key for 'higher is better' scores, numbers or tuples of numbers."""
    return tuple(-s for s in score) if isinstance(score, tuple) else -score


def exhaustive_search(num_layers: int, budget: Budget, score: Callable[[Candidate], object]
                      ) -> list[tuple[Candidate, object]]:
    """Every placement within the budget, best first (for tests and tiny models)."""
    from itertools import combinations

    ranked = []
    for attn in combinations(range(num_layers), budget.attn):
        rest = [i for i in range(num_layers) if i not in attn]
        for swa in combinations(rest, budget.swa):
            cand = make_candidate(num_layers, attn, swa)
            ranked.append((cand, score(cand)))
    return sorted(ranked, key=lambda cs: (_neg(cs[1]), cs[0]))


def uniform_placement(num_layers: int, budget: Budget) -> Candidate:
    """The baseline: the budget's layers evenly spread over depth, attention layers evenly among them."""
    total = budget.total
    positions = [min(num_layers - 1, int((j + 0.5) * num_layers / total)) for j in range(total)]
    attn_slots = {min(total - 1, int((a + 0.5) * total / budget.attn)) for a in range(budget.attn)} if budget.attn else set()
    attn = [p for j, p in enumerate(positions) if j in attn_slots]
    swa = [p for j, p in enumerate(positions) if j not in attn_slots]
    return make_candidate(num_layers, attn, swa)


def one_layer_placement(attn_scores: list, swa_scores: list | None, budget: Budget) -> Candidate:
    """The other baseline (layer-by-layer restoration, as in fla's hybrid-distillation): rank layers by the score
    of the network with only that layer restored to attention, keep the best `budget.attn`; then the best
    `budget.swa` of the rest by their sliding-window scores."""
    L = len(attn_scores)
    attn = sorted(range(L), key=lambda i: (_neg(attn_scores[i]), i))[: budget.attn]
    swa = []
    if budget.swa:
        if swa_scores is None:
            raise ValueError("a budget with swa layers needs the per-layer sliding-window scores")
        rest = [i for i in range(L) if i not in attn]
        swa = sorted(rest, key=lambda i: (_neg(swa_scores[i]), i))[: budget.swa]
    return make_candidate(L, attn, swa)
