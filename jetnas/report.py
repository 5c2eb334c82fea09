"""The report of a `jetnas run`: one markdown file with every stage's tables and figures, and one JSON file.

Stages hand over what they wrote through their result's `outputs` mapping (name -> path): markdown files are
inlined, PNG figures embedded, everything else linked. Evaluation and throughput are shown hybrid-vs-teacher.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TITLES = {
    "data": "Training data",
    "supernet": "Step 1a: super-network training",
    "placement": "Step 1b: full-attention placement search",
    "blocks": "Step 2: linear block selection",
    "hardware": "Step 4: hardware-aware search of the block shape",
    "stage1": "Stage 1: distillation with frozen MLPs",
    "stage2": "Stage 2: full-model training",
    "eval": "Evaluation: the hybrid against its teacher",
    "bench": "Throughput: the hybrid against its teacher",
}
SCALARS = ("steps", "tokens", "final_loss", "tokens_per_s", "seconds", "placement", "layer_types", "best", "chosen",
           "model_dir", "objective", "uniform_objective", "one_layer_objective")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return f"`{json.dumps(v)}`"
    return str(v)


def _outputs_section(result: dict, out: Path) -> list[str]:
    lines = []
    for name, path in (result.get("outputs") or {}).items():
        p = Path(path)
        if not p.exists():
            continue
        rel = os.path.relpath(p, out)
        if p.suffix == ".md":
            lines += [p.read_text().strip().replace("\n# ", "\n#### ").lstrip("# ").strip(), ""]
        elif p.suffix == ".png":
            lines += [f"![{name}]({rel})", ""]
        else:
            lines += [f"- {name}: [{rel}]({rel})"]
    return lines + [""]


def _side_by_side(hybrid: dict, teacher: dict, metric_source: str) -> list[str]:
    """A table of the hybrid's and the teacher's numbers for every metric both report."""
    h = hybrid.get(metric_source, hybrid)
    t = teacher.get(metric_source, teacher)
    rows = []
    for key in h:
        if isinstance(h[key], dict):
            for metric, value in h[key].items():
                other = t.get(key, {}).get(metric) if isinstance(t.get(key), dict) else None
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append((f"{key} {metric}", value, other))
        elif isinstance(h[key], (int, float)) and not isinstance(h[key], bool):
            rows.append((key, h[key], t.get(key)))
    if not rows:
        return []
    lines = ["| | hybrid | teacher | hybrid / teacher |", "|---|---|---|---|"]
    for name, a, b in rows:
        ratio = f"{a / b:.3g}" if isinstance(b, (int, float)) and b not in (0, None) else ""
        lines.append(f"| {name} | {_fmt(a)} | {'' if b is None else _fmt(b)} | {ratio} |")
    return lines + [""]


def write_pipeline_report(recipe, results: dict, state: dict, out: Path) -> dict:
    """`out/report.md` and `out/report.json`; returns their paths."""
    lines = [f"# jetnas run: {recipe.name}", "", f"Teacher `{recipe.teacher}`, recipe `{recipe.source}`, "
             f"seed {recipe.seed}, device {recipe.device or 'auto'}.", ""]
    stage_lines = ["| stage | status | seconds |", "|---|---|---|"]
    for stage in ["data", *recipe.stages]:
        record = state["stages"].get(stage)
        if stage != "data" and recipe.stages.get(stage) is None:
            stage_lines.append(f"| {stage} | skipped | |")
        elif record:
            stage_lines.append(f"| {stage} | done {record['finished']} | {record['seconds']} |")
    lines += stage_lines + [""]
    for stage, title in TITLES.items():
        result = results.get(stage)
        if not result:
            continue
        lines += [f"## {title}", ""]
        if stage in ("eval", "bench"):
            source = "results" if stage == "eval" else "summary"
            lines += _side_by_side(result["hybrid"], result["teacher"], source)
            lines += _outputs_section(result["hybrid"], out)
            continue
        shown = [(k, result[k]) for k in SCALARS if result.get(k) is not None]
        if shown:
            lines += [f"- {k}: {_fmt(v)}" for k, v in shown] + [""]
        lines += _outputs_section(result, out)
    md, js = out / "report.md", out / "report.json"
    md.write_text("\n".join(lines).rstrip() + "\n")
    js.write_text(json.dumps({"recipe": recipe.name, "teacher": recipe.teacher, "results": results,
                              "stages": {k: {"seconds": v.get("seconds"), "finished": v.get("finished")}
                                         for k, v in state["stages"].items()}}, indent=2, default=str))
    return {"report": str(md), "report_json": str(js)}
