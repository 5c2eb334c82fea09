"""Linear block selection (PostNAS steps 2 and 3; paper, sections 2.3-2.4 and Table 1): every candidate block (and
JetBlock design variant) trained in the same placement with the same recipe, ranked, and reported.

Bookkeeping only: the candidates and their run-once cache are `jetnas.nas.candidates`, the ranking
`jetnas.nas.ranking`, the table and figure `jetnas.nas.tables`; training, evaluating and measuring one candidate is
the callable `run` passed in (`jetnas.runner.candidates.CandidateRunner` in a real search, a fake in the tests).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from jetnas.files import write_json_atomic
from jetnas.models.layer_types import BlockSpec
from jetnas.nas.candidates import fingerprint, log_progress, run_candidates
from jetnas.nas.ranking import TaskMetric, candidate_scores, rank
from jetnas.nas.tables import block_table, search_figure


def run_block_search(candidates: Sequence[BlockSpec], run: Callable[[BlockSpec, Path], dict],
                     metrics: Sequence[TaskMetric], out_dir: str | Path, recipe: Mapping,
                     reference: Callable[[Path], dict] | None = None, context_length: int | None = None,
                     log: Callable[[str], None] = log_progress) -> dict:
    """PostNAS step 2 (and 3, with JetBlock variants among the candidates): run every candidate with the same
    recipe, rank them, and write `blocks.md` (Table-1-like), `blocks.json` and `blocks.png` under `out_dir`.

    Args:
        candidates: from `parse_candidates`.
        run: `(candidate, directory) -> record` (trains, evaluates and measures one candidate).
        metrics: the task metrics ranked by (`candidate_scores`).
        recipe: everything that decides a record; a finished candidate is reused only under the same recipe.
        reference: `(directory) -> record` for the teacher (same tasks, same measurement), shown for comparison.
        context_length: the context of the throughput and cache columns (for the headers).
    Returns a summary: `best` (candidate name), its `block_type` and `options`, the ranking and the outputs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = run_candidates(candidates, run, out, recipe, log)
    ref = None
    if reference is not None:
        ref_dir = out / "teacher"
        ref_path = ref_dir / "result.json"
        stamp = fingerprint({"recipe": recipe, "reference": "teacher"})
        if ref_path.exists() and json.loads(ref_path.read_text()).get("fingerprint") == stamp:
            ref = json.loads(ref_path.read_text())["record"]
        else:
            ref_dir.mkdir(parents=True, exist_ok=True)
            log("teacher reference: evaluating")
            ref = reference(ref_dir)
            write_json_atomic(ref_path, {"fingerprint": stamp, "record": ref})
    scores = candidate_scores(records, metrics)
    order = rank(records, scores)
    table = block_table(records, metrics, scores, ref, context_length)
    (out / "blocks.md").write_text(
        f"# Linear block selection (PostNAS step 2)\n\nSame placement, data, tokens, learning rate and seed for every "
        f"candidate. Score: mean over tasks of the min-max normalised metric among the candidates (1 = best).\n\n"
        f"{table}\n")
    write_json_atomic(out / "blocks.json", {
        "metrics": [vars(m) for m in metrics], "ranked": order, "scores": scores, "records": records,
        "teacher": ref, "recipe": recipe})
    points = [(n, scores[n], records[n].get("decode_tokens_per_s") or records[n].get("train_tokens_per_s"))
              for n in order]
    measured = any(records[n].get("decode_tokens_per_s") for n in order)
    figure = search_figure(out / "blocks.png", "Linear block candidates: quality vs speed", points, metrics, records,
                           ref, "decode tokens/s" if measured else "training tokens/s")
    print(table, file=sys.stderr)
    best = records[order[0]]
    return {"best": order[0], "block_type": best["block_type"], "options": best["options"], "ranked": order,
            "scores": scores,
            "outputs": {"table": str(out / "blocks.md"), "json": str(out / "blocks.json"), "figure": str(figure)}}
