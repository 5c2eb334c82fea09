"""PostNAS step 1 end to end on a trained super-network: per-layer importance, beam search, baselines, report; and
reading its result back (`read_placement`: the placement the later steps fill with linear blocks)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jetnas.layers import ATTENTION_TYPES
from jetnas.models.layer_types import resolve_layer_types
from jetnas.nas.objectives import CandidateEvaluator, NormalizedObjective
from jetnas.nas.sampling import Budget
from jetnas.nas.search import (
    CachedScorer,
    beam_search,
    describe,
    make_candidate,
    one_layer_placement,
    uniform_placement,
)
from jetnas.nas.tables import comparison_table, heatmap


def run_placement_search(evaluator: CandidateEvaluator, budget: Budget, beam_width: int, out_dir: str | Path,
                         linear_type: str = "gla") -> dict:
    """Everything `jetnas search placement` writes, given an evaluator over super-network candidates:

    - `heatmap.png`: per task, the score with only layer i as full attention (all others linear);
    - `placements.json`: every final-level candidate of the beam search, ranked, with its per-task scores;
    - `comparison.md` / `comparison.json`: the searched placement against uniform placement and one-layer ranking
      on the same budget, plus the all-linear and teacher references.
    Returns a summary dict (the chosen placement and the output paths).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L = evaluator.supernet.num_layers
    start = time.perf_counter()
    objective = NormalizedObjective(evaluator)
    scorer = CachedScorer(objective)
    names = [t.name for t in evaluator.tasks]

    def log(msg):
        print(f"[search {time.perf_counter() - start:7.1f}s, {evaluator.evaluations} evaluations] {msg}",
              file=sys.stderr, flush=True)

    log(f"references: all-linear {_metrics(evaluator, ('linear',) * L)}; teacher {_metrics(evaluator, ('attn',) * L)}")
    kinds = [kind for kind in ("attn", "swa") if getattr(budget, kind) or kind == "attn"]
    one_layer = [make_candidate(L, **{kind: [i]}) for kind in kinds for i in range(L)]
    for c in one_layer:
        evaluator.results(c)
    flat = objective.fall_back_where_flat(one_layer)
    if flat:
        log(f"no one-layer network moves the primary metric of {', '.join(flat)} from all-linear's: ranking "
            f"{', '.join(f'{t.name} by {t.metric}' for t in evaluator.tasks if t.name in flat)} instead")
    single = {kind: [objective.per_task(make_candidate(L, **{kind: [i]})) for i in range(L)] for kind in kinds}
    log("one-layer scores done")
    rows = {name: [s[name] for s in single["attn"]] for name in names}
    if len(names) > 1:
        rows["combined"] = [objective(make_candidate(L, attn=[i]))[0] for i in range(L)]
    probe = evaluator.describe() if hasattr(evaluator, "describe") else None
    probed = (f"\n{', '.join(probe['tasks'])}: teacher, other layers windowed to {probe['window']} + "
              f"{probe['sinks']} sinks" if probe else "")
    heat = heatmap(rows, out / "heatmap.png", f"Per-layer importance ({len(names)} task(s), {L} layers): "
                                              f"score with only that layer as full attention{probed}")

    def on_level(level, ranked):
        best, score = ranked[0]
        log(f"level {level + 1}/{budget.total}: {len(ranked)} candidates, best {describe(best)} -> {score[0]:.3f}")

    ranked = beam_search(L, budget, scorer, beam_width, on_level)
    searched = ranked[0][0]
    combined_single = {kind: [objective((make_candidate(L, **{kind: [i]})))[0] for i in range(L)] for kind in single}
    baselines = {
        "searched (beam)": searched,
        "uniform": uniform_placement(L, budget),
        "one-layer ranking": one_layer_placement(combined_single["attn"], combined_single.get("swa"), budget),
        "all linear": ("linear",) * L,
        "teacher (all attention)": ("attn",) * L,
    }
    entries = {}
    for label, cand in baselines.items():
        res = evaluator.results(cand)
        entries[label] = {**describe(cand), "metrics": {t.name: res[t.name][t.metric] for t in evaluator.tasks},
                          "fractions": objective.per_task(cand), "combined": objective(cand)[0],
                          "layer_types": [_layer_type(c, linear_type) for c in cand]}
    table = comparison_table(entries, names)
    (out / "comparison.md").write_text(
        f"# Placement search: budget {budget}, beam width {beam_width}\n\n"
        f"Metrics: {', '.join(f'{t.name} -> {t.metric}' for t in evaluator.tasks)}; in brackets the fraction of the "
        f"all-linear -> teacher gap closed.{_fallback_note(evaluator, flat)}{_probe_note(probe)}\n\n{table}\n")
    (out / "comparison.json").write_text(json.dumps(entries, indent=2))
    placements = [{"rank": r + 1, **describe(c), "objective": list(score), "fractions": objective.per_task(c),
                   "layer_types": ",".join(_layer_type(x, linear_type) for x in c)}
                  for r, (c, score) in enumerate(ranked)]
    (out / "placements.json").write_text(json.dumps({
        "budget": str(budget), "beam_width": beam_width, "tasks": [t.name for t in evaluator.tasks],
        "metrics": {t.name: t.metric for t in evaluator.tasks}, "evaluations": evaluator.evaluations,
        "one_layer": {kind: s for kind, s in single.items()}, "ranked": placements,
        "fallback_to_secondary": flat, **({"retrieval_probe": probe} if probe else {}),
    }, indent=2))
    log("done")
    print(table, file=sys.stderr)
    return {
        "placement": describe(searched),
        "layer_types": ",".join(_layer_type(c, linear_type) for c in searched),
        "objective": ranked[0][1][0],
        "uniform_objective": entries["uniform"]["combined"],
        "one_layer_objective": entries["one-layer ranking"]["combined"],
        "evaluations": evaluator.evaluations,
        # layer passes computed / what running every sub-network from its first layer would take (prefix reuse)
        "layer_passes": getattr(evaluator, "layers_run", None),
        "outputs": {"placements": str(out / "placements.json"), "heatmap": str(heat),
                    "comparison": str(out / "comparison.md")},
    }


def _fallback_note(evaluator: CandidateEvaluator, flat: list[str]) -> str:
    if not flat:
        return ""
    return (" " + "; ".join(f"{t.name} ranks by {t.metric}: its {t.secondary} was the all-linear network's for every "
                            f"one-layer network" for t in evaluator.tasks if t.name in flat) + ".")


def _probe_note(probe: dict | None) -> str:
    if not probe:
        return ""
    return (f" {', '.join(probe['tasks'])}: scored by the windowed-teacher probe, not the super-network: the "
            f"teacher with full attention in the candidate's attn layers and its own attention limited to "
            f"{probe['window']} tokens plus the first {probe['sinks']} in every other layer (swa layers: "
            f"{probe['swa_window']}), on rows of seed {probe['seed']} (not the evaluation's); so \"all linear\" is "
            f"every layer windowed there.")


def _layer_type(choice: str, linear_type: str) -> str:
    return linear_type if choice == "linear" else choice


def _metrics(evaluator: CandidateEvaluator, cand) -> dict:
    res = evaluator.results(cand)
    return {t.name: round(res[t.name][t.metric], 4) for t in evaluator.tasks}


@dataclass
class Placement:
    """Which layers stay softmax attention: per layer "attn", "swa" or "linear", and where it came from."""

    choices: list[str]
    source: str
    swa_window: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def attn(self) -> list[int]:
        return [i for i, c in enumerate(self.choices) if c == "attn"]

    @property
    def swa(self) -> list[int]:
        return [i for i, c in enumerate(self.choices) if c == "swa"]

    def layer_types(self, block_type: str) -> list[str]:
        """The placement with `block_type` in every linear layer."""
        return [block_type if c == "linear" else c for c in self.choices]

    def describe(self) -> dict:
        return {"source": self.source, "attn": self.attn, "swa": self.swa, "swa_window": self.swa_window,
                **self.info}


def _supernet_window(path: Path) -> int | None:
    """The sliding window of the super-network a placements.json was searched on, when it sits where `jetnas search
    placement` (`<supernet>/search-*/`) or `jetnas run` (`<run>/supernet/`, `<run>/placement/`) put it."""
    for candidate in (path.parent.parent / "supernet.json", path.parent.parent / "supernet" / "supernet.json"):
        if candidate.exists():
            return json.loads(candidate.read_text()).get("spec", {}).get("swa_window")
    return None


def read_placement(placement: str, num_layers: int, swa_window: int | None = None,
                   default_window: int | None = None) -> Placement:
    """The placement to fill: a `placements.json` written by `jetnas search placement` (its best-ranked entry), or
    a layer-types string (`attn`/`swa` entries kept, every other entry becomes linear).

    `swa_window` (when the placement has `swa` layers): given, else the placements file's own, else that of the
    super-network the file was searched on (found next to it), else `default_window` (the caller's documented
    default, `jetnas.models.convert.default_swa_window` of the teacher), else an error.
    """
    path = Path(placement).expanduser()
    if placement.endswith(".json") or path.is_file():
        if not path.exists():
            raise FileNotFoundError(f"placement file {placement!r} does not exist")
        data = json.loads(path.read_text())
        ranked = data.get("ranked") or []
        if ranked:
            best = ranked[0]
            spec = best.get("layer_types")
            info = {"budget": data.get("budget"), "rank": best.get("rank", 1)}
        elif "layer_types" in data:
            spec, info = data["layer_types"], {}
        else:
            raise ValueError(f"placement file {placement!r} has neither 'ranked' placements nor 'layer_types'")
        if isinstance(spec, list):
            spec = ",".join(spec)
        types = [t.strip() for t in spec.split(",")] if spec else []
        choices = [t if t in ATTENTION_TYPES else "linear" for t in types]
        window = swa_window or data.get("swa_window") or _supernet_window(path)
        source = str(path)
    else:
        types, _ = resolve_layer_types(placement, num_layers)
        choices = [t if t in ATTENTION_TYPES else "linear" for t in types]
        window, info, source = swa_window, {}, "layer types"
    if len(choices) != num_layers:
        raise ValueError(f"placement {placement!r} has {len(choices)} layers but the teacher has {num_layers}")
    if "swa" in choices and not window and default_window:
        window, info = default_window, {**info, "swa_window_is_default": True}
    if "swa" in choices and not window:
        layers = [i for i, c in enumerate(choices) if c == "swa"]
        raise ValueError(f"placement {placement!r} has sliding-window layers {layers} but no window size: pass "
                         f"--swa-window")
    return Placement(choices, source, int(window) if window and "swa" in choices else None, info)
