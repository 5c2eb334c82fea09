"""The report of a `jetnas run`: one markdown file with every stage's tables and figures, and one JSON file.

It reads the stages' records (`jetnas.runner.results`, as `jetnas run` keeps them in pipeline.json), so it can be
written again from a run directory alone (`jetnas run --report-only`). Stages hand over what they wrote through
their record's `outputs` mapping (name -> path): markdown files are inlined, PNG figures embedded, everything else
linked. Evaluation and throughput are shown hybrid-vs-teacher.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jetnas.files import write_text_atomic

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


def _local(path: str | None, out: Path) -> Path | None:
    """`path` if it exists, else the same file found under `out` by its trailing parts (a run directory copied or
    moved since: its records keep the paths of the machine that wrote them), else None."""
    if not path:
        return None
    p = Path(path)
    if p.exists():
        return p
    parts = p.parts
    for i in range(1, len(parts)):
        candidate = out.joinpath(*parts[i:])
        if candidate.exists():
            return candidate
    return None


def _outputs_section(result: dict, out: Path) -> list[str]:
    lines = []
    for name, path in (result.get("outputs") or {}).items():
        p = _local(path, out)
        if p is None:
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


def _num(v) -> str:
    if v is None:
        return ""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


BENCH_COLUMNS = (("decode tok/s", "decode_tokens_per_s", True), ("prefill tok/s", "prefill_tokens_per_s", True),
                 ("batch", "batch_size", False), ("cache/seq (MB)", "cache_bytes_per_sequence", False),
                 ("roofline share", "roofline_fraction", False),
                 ("roofline share, reads + writes", "roofline_rw_fraction", False))


def _bench_comparison(hybrid: dict, teacher: dict, out: Path) -> list[str]:
    """Every context both benchmarks measured: a table of the two engines' rows side by side, and one figure of
    decode and prefill throughput against context for both (`out/bench_vs_teacher.png`)."""
    rows: dict[int, dict[str, dict]] = {}
    device = ""
    for who, result in (("hybrid", hybrid), ("teacher", teacher)):
        path = _local((result.get("outputs") or {}).get("json"), out)
        if path is None:
            return []
        bench = json.loads(path.read_text())
        device = device or bench.get("device", "")
        for r in bench.get("rows", []):
            if r.get("system") == "jetnas engine":
                rows.setdefault(int(r["context_length"]), {})[who] = r
    contexts = sorted(c for c, v in rows.items() if len(v) == 2)
    if not contexts:
        return []
    head = ["context"]
    for label, _, ratio in BENCH_COLUMNS:
        head += [f"{label} hybrid", "teacher"] + (["x"] if ratio else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in contexts:
        h, t = rows[c]["hybrid"], rows[c]["teacher"]
        cells = [str(c)]
        for _, key, ratio in BENCH_COLUMNS:
            a, b = h.get(key), t.get(key)
            if key == "cache_bytes_per_sequence":
                a, b = a / 1e6 if a is not None else None, b / 1e6 if b is not None else None
            cells += [_num(a), _num(b)]
            if ratio:
                cells.append(f"{a / b:.2f}x" if a and b else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the table says it all; the figure is a convenience
        return lines
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (label, key, _) in zip(axes, BENCH_COLUMNS[:2]):
        for who, style in (("hybrid", "o-"), ("teacher", "s--")):
            ax.plot(contexts, [rows[c][who][key] for c in contexts], style, label=who)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"hybrid vs teacher, {device}".rstrip(", "))
    fig.tight_layout()
    fig.savefig(out / "bench_vs_teacher.png", dpi=110)
    plt.close(fig)
    return lines + ["![hybrid vs teacher](bench_vs_teacher.png)", ""]


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
        if stage == "eval":
            lines += _side_by_side(result["hybrid"], result["teacher"], "results")
            lines += _outputs_section(result["hybrid"], out)
            continue
        if stage == "bench":
            lines += _bench_comparison(result["hybrid"], result["teacher"], out) or _side_by_side(
                result["hybrid"], result["teacher"], "summary")
            lines += _outputs_section(result["hybrid"], out)
            continue
        shown = [(k, result[k]) for k in SCALARS if result.get(k) is not None]
        if shown:
            lines += [f"- {k}: {_fmt(v)}" for k, v in shown] + [""]
        lines += _outputs_section(result, out)
    md, js = out / "report.md", out / "report.json"
    write_text_atomic(md, "\n".join(lines).rstrip() + "\n")
    write_text_atomic(js, json.dumps({"recipe": recipe.name, "teacher": recipe.teacher, "results": results,
                                      "stages": {k: {"seconds": v.get("seconds"), "finished": v.get("finished")}
                                                 for k, v in state["stages"].items()}}, indent=2, default=str))
    return {"report": str(md), "report_json": str(js)}
