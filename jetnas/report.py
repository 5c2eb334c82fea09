"""The report of a `jetnas run`: one markdown file with every stage's tables and figures, and one JSON file.

It reads the stages' records (`jetnas.runner.results`, as `jetnas run` keeps them in pipeline.json), so it can be
written again from a run directory alone (`jetnas run --report-only`). Stages hand over what they wrote through
their record's `outputs` mapping (name -> path): markdown files are inlined, PNG figures embedded, everything else
linked. Evaluation and throughput are shown hybrid-vs-teacher.

What a reader needs before the numbers comes first: whether the run is a smoke test (`SMOKE_TOKENS`: stages 1 and 2
trained on fewer tokens than that, so the numbers show the pipeline, not the method), and which PostNAS steps ran,
which were skipped and why (step 3, the JetBlock design ablation, runs inside the block search only when its
candidates include JetBlock variants). Numbers are rounded to three significant digits (the short runs' noise is in
the second or third), accuracies come with the rows they were measured on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jetnas.evaluation.paired import choice_agreement, paired_bootstrap
from jetnas.files import write_json_atomic, write_text_atomic

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
SCALARS = ("steps", "tokens", "final_loss", "tokens_per_s", "seconds", "resumed_at_step", "seconds_this_process",
           "placement", "layer_types", "best", "chosen",
           "model_dir", "objective", "uniform_objective", "one_layer_objective", "cuda_graph")
#: a run whose stages 1 and 2 together trained on fewer tokens is a smoke test (the paper: 400B; the GPU recipe's
#: shortened run, whose findings the README reports, 18M)
SMOKE_TOKENS = 1_000_000
#: what each stage is, in the paper's numbering
STEPS = {
    "data": "training text",
    "supernet": "step 1a: super-network training",
    "placement": "step 1b: full-attention placement search",
    "blocks": "step 2: linear block selection",
    "step3": "step 3: JetBlock design ablation",
    "hardware": "step 4: hardware-aware shape search",
    "stage1": "stage 1: distillation, MLPs frozen",
    "stage2": "stage 2: full-model training",
    "eval": "evaluation, hybrid and teacher",
    "bench": "throughput, hybrid and teacher",
}
#: metrics not compared between the models: counts of rows (shown in a row's label), durations, a task's chance level
COUNTS = ("n", "seconds", "chance")


def _fmt(v) -> str:
    if isinstance(v, float):
        rounded = float(f"{v:.3g}")
        return f"{v:.3g}" if abs(rounded) < 1000 else f"{rounded:,.0f}"
    if isinstance(v, (dict, list)):
        return f"`{json.dumps(v)}`"
    return str(v)


def compact_layer_types(types: str) -> str:
    """`gla,gla,gla,attn,gla` -> `gla*3,attn,gla` (the layer-types grammar's own repetition)."""
    out: list[list] = []
    for t in types.split(","):
        if out and out[-1][0] == t:
            out[-1][1] += 1
        else:
            out.append([t, 1])
    return ",".join(t if n == 1 else f"{t}*{n}" for t, n in out)


def _scalar(key: str, value) -> str:
    """One result field as a reader wants it: layer types compacted, a placement as its layers, a shape in words."""
    from jetnas.nas.tables import layer_ranges

    if key == "layer_types" and isinstance(value, str):
        return f"`{compact_layer_types(value)}`"
    if key == "placement" and isinstance(value, dict) and "attn" in value:
        window = f" (window {value['swa_window']})" if value.get("swa") and value.get("swa_window") else ""
        return f"attn {layer_ranges(value['attn'])}; swa {layer_ranges(value.get('swa') or [])}{window}"
    if key == "chosen" and isinstance(value, dict) and "num_heads" in value:
        return f"{value['num_heads']} heads x d_k {value['head_k_dim']} x d_v {value['head_v_dim']}"
    return _fmt(value)


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


def _outputs_section(result: dict, out: Path, figures: bool = True) -> list[str]:
    """A stage's outputs: markdown inlined, figures embedded (linked when not `figures`), other files linked."""
    lines = []
    for name, path in (result.get("outputs") or {}).items():
        p = _local(path, out)
        if p is None:
            continue
        rel = os.path.relpath(p, out)
        if p.suffix == ".md":
            lines += [p.read_text().strip().replace("\n# ", "\n#### ").lstrip("# ").strip(), ""]
        elif p.suffix == ".png" and figures:
            lines += [f"![{name}]({rel})", ""]
        else:
            lines += [f"- {name}: [{rel}]({rel})"]
    return lines + [""]


def _is_count(metric: str) -> bool:
    """A count of rows (`n`, a retrieval distance bucket's `n@lo-hi`) or a duration: not compared."""
    return metric in COUNTS or metric.startswith("n@")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _side_by_side(hybrid: dict, teacher: dict, metric_source: str) -> list[str]:
    """A table of the hybrid's and the teacher's numbers for every metric both report. Row counts (`n`) are not
    compared (a ratio of 1 says nothing): they go into the task's label, and accuracies measured on few rows get
    their sampling error in a note below."""
    h = hybrid.get(metric_source, hybrid)
    t = teacher.get(metric_source, teacher)
    rows, few = [], []
    for key in h:
        if isinstance(h[key], dict):
            n = h[key].get("n")
            label = f"{key} ({n} rows)" if _number(n) else key
            for metric, value in h[key].items():
                other = t.get(key, {}).get(metric) if isinstance(t.get(key), dict) else None
                if _number(value) and not _is_count(metric):
                    rows.append((f"{label} {metric}", value, other))
                    if metric in ("acc", "acc_norm") and _number(n) and 0 < n < 400:
                        few.append((key, int(n)))
        elif _number(h[key]) and not _is_count(key):
            rows.append((key, h[key], t.get(key)))
    if not rows:
        return []
    lines = ["| | hybrid | teacher | hybrid / teacher |", "|---|---|---|---|"]
    for name, a, b in rows:
        ratio = f"{a / b:.3g}" if _number(b) and b != 0 else ""
        lines.append(f"| {name} | {_fmt(a)} | {'' if b is None else _fmt(b)} | {ratio} |")
    lines.append("")
    for key, n in dict.fromkeys(few):
        # the worst case of a binomial proportion's 95% interval, p = 1/2
        lines.append(f"{key}: an accuracy from {n} rows is known to about ±{100 * 0.98 / n ** 0.5:.0f} points (95%).")
    return lines + ([""] if few else [])


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
    if len(contexts) == 1:
        # a line through one point shows nothing the table does not
        return lines + [f"No figure: one context length was measured ({contexts[0]:,} tokens); a figure of "
                        f"throughput against context needs two or more (`stages.bench.context`).", ""]
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


def training_tokens(results: dict) -> tuple[int | None, str]:
    """Tokens stages 1 and 2 trained on together (else the super-network's), and which stages they are."""
    counted = [(stage, results[stage].get("tokens")) for stage in ("stage1", "stage2")
               if isinstance(results.get(stage), dict) and _number(results[stage].get("tokens"))]
    if not counted and isinstance(results.get("supernet"), dict) and _number(results["supernet"].get("tokens")):
        counted = [("supernet", results["supernet"]["tokens"])]
    if not counted:
        return None, ""
    names = {("stage1",): "stage 1", ("stage2",): "stage 2", ("stage1", "stage2"): "stages 1 and 2",
             ("supernet",): "the super-network"}
    return int(sum(t for _, t in counted)), names[tuple(s for s, _ in counted)]


def smoke_banner(results: dict) -> list[str]:
    """The report's first paragraph when the run is a smoke test (`SMOKE_TOKENS`), else nothing."""
    tokens, stages = training_tokens(results)
    if tokens is None or tokens >= SMOKE_TOKENS:
        return []
    return [f"> **A smoke test, not a result.** {stages[0].upper() + stages[1:]} trained on {tokens:,} tokens, "
            f"fewer than the {SMOKE_TOKENS:,} below which jetnas calls a run a smoke test (the paper: 400B). The "
            f"numbers below show that every stage runs and what the report holds; differences between candidates are "
            f"noise, and the hybrid cannot produce sensible text yet.", ""]


def _step3_status(recipe) -> str:
    """Whether the JetBlock design ablation (PostNAS step 3) ran: inside the block search, when its candidates hold
    JetBlock variants (`jet-static-qk`, `jet:qk_conv=...`; `jetnas.models.layer_types.JET_VARIANTS`)."""
    from jetnas.runner.fields import default_of
    from jetnas.runner.recipes import BlockSearchRecipe

    blocks = recipe.stages.get("blocks")
    if blocks is None:
        return "skipped: it runs inside step 2, which the recipe skips"
    candidates = [c.strip() for c in str(blocks.get("blocks", default_of(BlockSearchRecipe, "blocks"))).split(",")]
    variants = [c for c in candidates if c.startswith(("jet-", "jet:"))]
    if variants:
        return f"ran inside step 2: JetBlock variants {', '.join(variants)} against `jet`"
    return (f"not run: the block search's candidates ({', '.join(candidates)}) hold no JetBlock design variant; "
            f"add some, e.g. `--set stages.blocks.blocks={','.join(candidates)},jet-static-qk,jet-dyn-qk`")


def steps_table(recipe, state: dict) -> list[str]:
    """Every step: done (when, how long), skipped by the recipe, or not run, with what each step is."""
    lines = ["| stage | what | status | seconds |", "|---|---|---|---|"]
    for stage in ["data", *recipe.stages]:
        record = state["stages"].get(stage)
        if stage == "hardware":
            lines.append(f"| | {STEPS['step3']} | {_step3_status(recipe)} | |")
        what = STEPS.get(stage, "")
        if stage != "data" and recipe.stages.get(stage) is None:
            lines.append(f"| {stage} | {what} | skipped by the recipe | |")
        elif record:
            teacher = state["stages"].get(f"{stage}_teacher")
            seconds = record["seconds"] + (teacher["seconds"] if teacher else 0)
            lines.append(f"| {stage} | {what} | done {record['finished']} | {_fmt(float(seconds))} |")
        elif stage != "data":
            lines.append(f"| {stage} | {what} | not run (no record in pipeline.json) | |")
    return lines + [""]


#: chance accuracy of the shipped benchmark files' tasks (multiple choice: one over the options; cloze and
#: retrieval: 0), by the short name `task_name` gives; other tasks report their own `chance` (a multiple-choice file:
#: 1 / choices over its rows)
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "mmlu": 0.25, "piqa": 0.5, "lambada": 0.0}
#: short names of the shipped files whose stem says more than the task (LAMBADA's OpenAI text is "lambada")
ALIASES = {"lambada_openai": "lambada"}


def task_name(spec: str) -> str:
    """`mc:../bench/arc_easy_test.jsonl` -> `arc_easy`, `retrieval:needle@4096` -> `needle@4096`: a task's short name
    (file stem without its split suffix and extensions). A retrieval task's row count and seed (`?n=100&seed=1`)
    choose rows of the same task, so they are dropped; any other option stays in the name."""
    kind, _, rest = spec.partition(":")
    if kind == "retrieval":
        task, _, options = rest.partition("?")
        kept = [o for o in options.split("&") if o and o.partition("=")[0] not in ("n", "seed")]
        return task + ("?" + "&".join(kept) if kept else "")
    stem = Path(rest).name.split(".")[0] if rest else spec
    for split in ("_test", "_val", "_validation", "_dev", "_train"):
        if stem.endswith(split):
            stem = stem[: -len(split)]
            break
    return ALIASES.get(stem, stem)


def _context_row(bench: dict, context: int) -> dict | None:
    rows = [r for r in (bench.get("rows") or []) if r.get("context_length") == context]
    return rows[0] if rows else None


def retention(hybrid_eval: dict, teacher_eval: dict, hybrid_bench: dict | None = None,
              teacher_bench: dict | None = None, cache_context: int = 8192, hybrid_outcomes: dict | None = None,
              teacher_outcomes: dict | None = None) -> dict:
    """How much of the teacher a hybrid keeps, in the form issue 19 asks for (`retention.json`):
    `{"tasks": {name: {"teacher", "hybrid", "chance", "kept"}}, "cache_ratio_8k", "heldout_nll_gap"}`.

    Accuracies are fractions (`acc`); `kept` is the share of the teacher's margin over chance the hybrid keeps,
    (hybrid - chance) / (teacher - chance) (None when the teacher is at chance). Multiple-choice tasks also carry
    the same three figures by `acc_norm` (per-character log-likelihood, which the paper's released evaluation
    configs and most linear-attention papers report for HellaSwag and ARC) under `"acc_norm"`; `acc` stays the
    headline. Where both evaluations kept their per-item outcomes (`outcomes.json`, by task spec), each share also
    gets a paired 95% bootstrap interval over the rows (`kept_ci95`; `jetnas.evaluation.paired`), with the interval
    of the accuracy difference (`difference_ci95`) and the share of items the two models disagree on; a
    multiple-choice task with each choice's log-likelihood also gets the share of rows where the hybrid's top choice
    is the teacher's (`agree`, `agree_ci95`) and the mean KL between their distributions over the choices
    (`choice_kl`; `jetnas.evaluation.paired.choice_agreement`). The held-out gap is the hybrid's
    perplexity task's mean nll less the teacher's (nats per token); the cache ratio is the teacher's cache bytes per
    sequence over the hybrid's at `cache_context` tokens, from the two throughput benchmarks (None when either
    lacks that context). `hybrid_eval` / `teacher_eval` map task specs to metrics (eval.json's `tasks`)."""
    tasks, gaps = {}, {}
    for spec, metrics in hybrid_eval.items():
        other = teacher_eval.get(spec)
        if not isinstance(metrics, dict) or not isinstance(other, dict):
            continue
        name = task_name(spec)
        if spec.startswith("ppl:"):
            if _number(metrics.get("nll")) and _number(other.get("nll")):
                gaps[name] = metrics["nll"] - other["nll"]
            continue
        if not (_number(metrics.get("acc")) and _number(other.get("acc"))):
            continue
        # the benchmark's standard figure where there is one (ARC's few 3- and 5-way rows are left out of it, as
        # papers do), else the task's own (a multiple-choice file's 1 / choices), else 0 (cloze, retrieval)
        chance = CHANCE[name] if name in CHANCE else metrics.get("chance", 0.0)
        margin = other["acc"] - chance
        tasks[name] = {"teacher": other["acc"], "hybrid": metrics["acc"], "chance": chance,
                       "kept": (metrics["acc"] - chance) / margin if margin > 0 else None, "n": metrics.get("n")}
        if _number(metrics.get("acc_norm")) and _number(other.get("acc_norm")):
            norm_margin = other["acc_norm"] - chance
            tasks[name]["acc_norm"] = {"teacher": other["acc_norm"], "hybrid": metrics["acc_norm"],
                                       "kept": (metrics["acc_norm"] - chance) / norm_margin if norm_margin > 0
                                       else None}
        h_rows, t_rows = (hybrid_outcomes or {}).get(spec), (teacher_outcomes or {}).get(spec)
        if h_rows and t_rows:
            for metric, row in (("acc", tasks[name]), ("acc_norm", tasks[name].get("acc_norm"))):
                paired = paired_bootstrap(h_rows, t_rows, metric, chance) if row is not None else None
                if paired is not None:
                    row.update({k: paired[k] for k in ("kept_ci95", "difference_ci95", "disagree")})
            # multiple choice: how often the hybrid picks the teacher's choice, and how closely it weighs them
            choices = choice_agreement(h_rows, t_rows)
            if choices is not None:
                tasks[name].update({k: choices[k] for k in ("agree", "agree_ci95", "choice_kl")})
    cache_ratio = None
    h = _context_row(hybrid_bench or {}, cache_context)
    t = _context_row(teacher_bench or {}, cache_context)
    if h and t and h.get("cache_bytes_per_sequence") and t.get("cache_bytes_per_sequence"):
        cache_ratio = t["cache_bytes_per_sequence"] / h["cache_bytes_per_sequence"]
    gap = next(iter(gaps.values()), None)
    return {"tasks": tasks, "cache_ratio_8k" if cache_context == 8192 else f"cache_ratio_{cache_context}": cache_ratio,
            "heldout_nll_gap": gap, "heldout_nll_gaps": gaps}


def _outcomes(evaluation: dict, out: Path) -> dict:
    """The per-item outcomes an evaluation wrote beside its eval.json (`outcomes.json`), by task; {} if none."""
    folder = evaluation.get("out_dir")
    path = _local(str(Path(folder) / "outcomes.json"), out) if folder else None
    return json.loads(path.read_text()).get("tasks", {}) if path is not None else {}


def _bench_files(bench: dict | None, out: Path) -> tuple[dict | None, dict | None]:
    """The hybrid's and the teacher's bench.json of a run's throughput stage (None where absent)."""
    found = []
    for who in ("hybrid", "teacher"):
        path = _local(((bench or {}).get(who, {}).get("outputs") or {}).get("json"), out)
        found.append(json.loads(path.read_text()) if path is not None else None)
    return found[0], found[1]


def retention_table(summary: dict) -> list[str]:
    """Markdown: per task the teacher, the hybrid, chance and the share of the teacher's margin kept."""
    if not summary["tasks"]:
        return []
    lines = ["Share of the teacher's margin over chance the hybrid keeps ((hybrid - chance) / (teacher - chance)), by "
             "`acc` and, for multiple choice, by `acc_norm`:",
             "", "| task | hybrid | teacher | chance | kept | kept, acc_norm |", "|---|---|---|---|---|---|"]
    def share(row: dict | None) -> str:
        if row is None or row.get("kept") is None:
            return ""
        ci = row.get("kept_ci95")
        return f"{100 * row['kept']:.0f}%" + (f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f}%)" if ci else "")

    if any(row.get("kept_ci95") for row in summary["tasks"].values()):
        lines[0] += " (in brackets: a paired 95% bootstrap interval over the rows)"
    for name, row in summary["tasks"].items():
        lines.append(f"| {name} | {row['hybrid']:.3f} | {row['teacher']:.3f} | {row['chance']:g} | "
                     f"{share(row)} | {share(row.get('acc_norm'))} |")
    extra = [f"held-out nll gap (hybrid - teacher): {summary['heldout_nll_gap']:+.3f} nats"
             if summary["heldout_nll_gap"] is not None else None]
    ratio = summary.get("cache_ratio_8k")
    extra.append(f"cache per sequence at 8K: {ratio:.1f}x smaller than the teacher's" if ratio else None)
    return lines + [""] + [f"- {e}" for e in extra if e] + [""]


def placements_retention_table(rows: dict[str, dict]) -> list[str]:
    """Markdown: per placement (`compare/placements.json`: name -> attn, swa, results; a "teacher" row) its layers,
    each task's accuracy with the share of the teacher's margin kept (`retention`), and the held-out nll gap."""
    teacher = rows.get("teacher", {}).get("results", {})
    kept = {name: retention(row["results"], teacher) for name, row in rows.items() if name != "teacher"}
    tasks = list(dict.fromkeys(task for summary in kept.values() for task in summary["tasks"]))
    header = ["placement", "attn", "swa"] + tasks + ["held-out nll gap"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, summary in kept.items():
        cells = [name] + [", ".join(map(str, rows[name].get(k) or [])) for k in ("attn", "swa")]
        for task in tasks:
            row = summary["tasks"].get(task)
            share = "" if row is None or row["kept"] is None else f" ({100 * row['kept']:.0f}%)"
            cells.append("" if row is None else f"{100 * row['hybrid']:.1f}{share}")
        gap = summary["heldout_nll_gap"]
        lines.append("| " + " | ".join(cells + ["" if gap is None else f"{gap:+.3f}"]) + " |")
    if "teacher" in rows:
        accs = {task: row["teacher"] for summary in kept.values() for task, row in summary["tasks"].items()}
        lines.append("| " + " | ".join(["teacher", "", ""] + [f"{100 * accs[t]:.1f}" if t in accs else ""
                                                           for t in tasks] + [""]) + " |")
    return lines


def write_pipeline_report(recipe, results: dict, state: dict, out: Path) -> dict:
    """`out/report.md` and `out/report.json`; returns their paths."""
    lines = [f"# jetnas run: {recipe.name}", ""] + smoke_banner(results)
    lines += [f"Teacher `{recipe.teacher}`, recipe `{recipe.source}`, seed {recipe.seed}, device "
              f"{recipe.device or 'auto'}.", ""]
    lines += steps_table(recipe, state)
    for stage, title in TITLES.items():
        result = results.get(stage)
        if not result:
            continue
        lines += [f"## {title}", ""]
        if stage == "eval":
            kept = retention(result["hybrid"].get("results", {}), result["teacher"].get("results", {}),
                             *_bench_files(results.get("bench"), out),
                             hybrid_outcomes=_outcomes(result["hybrid"], out),
                             teacher_outcomes=_outcomes(result["teacher"], out))
            write_json_atomic(out / "retention.json", kept)
            lines += retention_table(kept)
            lines += _side_by_side(result["hybrid"], result["teacher"], "results")
            lines += _outputs_section(result["hybrid"], out)
            continue
        if stage == "bench":
            compared = _bench_comparison(result["hybrid"], result["teacher"], out)
            lines += compared or _side_by_side(result["hybrid"], result["teacher"], "summary")
            # the hybrid's own figure repeats the comparison's hybrid half: link its files, embed nothing
            lines += _outputs_section(result["hybrid"], out, figures=not compared)
            continue
        shown = [(k, result[k]) for k in SCALARS if result.get(k) is not None]
        if shown:
            lines += [f"- {k}: {_scalar(k, v)}" for k, v in shown] + [""]
        lines += _outputs_section(result, out)
    compared = out / "compare" / "placements.json"
    if compared.exists():  # `compare_placements`: the other placements, trained and evaluated the same way
        lines += ["## Placements compared on final models", "",
                  "Each placement trained by the same stage 1 / stage 2 and evaluated the same way: accuracy (%) and, "
                  "in brackets, the share of the teacher's margin over chance it keeps; the held-out nll gap to the "
                  "teacher. Every metric: [compare/placements.md](compare/placements.md); each placement's stages "
                  "under `compare/<name>/`.", ""]
        lines += placements_retention_table(json.loads(compared.read_text())) + [""]
    md, js = out / "report.md", out / "report.json"
    write_text_atomic(md, "\n".join(lines).rstrip() + "\n")
    tokens, _ = training_tokens(results)
    write_text_atomic(js, json.dumps({"recipe": recipe.name, "teacher": recipe.teacher,
                                      "smoke_test": tokens is not None and tokens < SMOKE_TOKENS,
                                      "results": results,
                                      "stages": {k: {"seconds": v.get("seconds"), "finished": v.get("finished")}
                                                 for k, v in state["stages"].items()}}, indent=2, default=str))
    return {"report": str(md), "report_json": str(js)}
