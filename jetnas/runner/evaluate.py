"""Evaluation of one model as a run: built-in tasks and lm-evaluation-harness tasks, one report (eval.json,
eval.md), resumable task by task."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from jetnas.runner.models import load_model_and_tokenizer, resolve_device, resolve_dtype
from jetnas.runner.recipes import EvalRecipe
from jetnas.runner.results import EvalResult


def _apply_limit(task, limit: int | None):
    """`--limit` for a built-in task: rows for mc/cloze/retrieval, 1024-token windows for perplexity."""
    from jetnas.evaluation.tasks import ClozeTask, MultipleChoiceTask, PerplexityTask, RetrievalTask

    if limit is None:
        return task
    if isinstance(task, (MultipleChoiceTask, ClozeTask)) and task.limit is None:
        task.limit = limit
    elif isinstance(task, RetrievalTask):
        task.n = min(task.n, limit)
    elif isinstance(task, PerplexityTask) and task.tokens is None:
        task.tokens = limit * task.window
    return task


def model_identity(model: str) -> str:
    """What says two evaluations saw the same weights: for a model directory, its weight files' names, sizes and
    modification times (a retrained model at the same path differs; hashing gigabytes would cost seconds);
    otherwise the name (a teacher, a preset)."""
    path = Path(model)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.gguf")) if path.is_dir() else []
    if not files:
        return model
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _previous_results(path: Path, model: str, identity: str, limit: int | None) -> dict[str, dict]:
    """Per-task results of an earlier run into the same folder, when it evaluated the same weights (see
    `model_identity`; 2026-12-02: a stage-2 model retrained at the same path kept the old model's first three
    tasks) with the same limit."""
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    # files from before model_id existed: a name (teacher, preset) is its own identity, a directory is unknown
    if (previous.get("model") != model or previous.get("model_id", model) != identity
            or previous.get("limit") != limit):
        return {}
    return dict(previous.get("tasks", {}))


def _previous_outcomes(path: Path, identity: str, limit: int | None, kept: dict) -> dict[str, dict]:
    """The per-item outcomes of the tasks `kept` from an earlier run into the same folder (same weights, limit)."""
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    if previous.get("model_id") != identity or previous.get("limit") != limit:
        return {}
    return {name: rows for name, rows in previous.get("tasks", {}).items() if name in kept}


def markdown_table(model: str, results: dict[str, dict]) -> str:
    keys = ["acc", "acc_norm", "correct_nll", "nll", "ppl", "bits_per_byte", "target_nll", "n"]
    shown = [k for k in keys if any(k in r for r in results.values())]
    lines = [f"| task ({model}) | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for name, metrics in results.items():
        cells = []
        for k in shown:
            v = metrics.get(k)
            cells.append("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_eval(recipe: EvalRecipe) -> EvalResult:
    """Evaluate `recipe.model` on its tasks; writes eval.json (after every task) and eval.md under out_dir, and
    outcomes.json: each built-in accuracy task's per-item outcomes, for paired intervals between two models on the
    same rows (`jetnas.evaluation.paired`)."""
    import torch

    from jetnas.evaluation.names import check_harness_available, is_builtin
    from jetnas.evaluation.scoring import LanguageModel
    from jetnas.evaluation.tasks import parse_task
    from jetnas.files import write_json_atomic, write_text_atomic

    r = recipe
    specs = [t for t in r.tasks.split(",") if t]
    check_harness_available(specs)
    builtin = [parse_task(s) for s in specs if is_builtin(s)]  # parse first: bad names fail before loading
    harness = [s for s in specs if not is_builtin(s)]
    dev = resolve_device(r.device)
    net, tok = load_model_and_tokenizer(r.model, r.tokenizer, dev, resolve_dtype(r.dtype, dev))
    lm = LanguageModel.from_hf(net, tok, max_length=r.max_length, batch_size=r.batch_size, name=r.model)
    out = Path(r.out_dir or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    identity = model_identity(r.model)
    results = _previous_results(out / "eval.json", r.model, identity, r.limit) if r.resume else {}
    outcomes = _previous_outcomes(out / "outcomes.json", identity, r.limit, results) if r.resume else {}
    device_name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    start = time.perf_counter()

    def write():
        write_json_atomic(out / "eval.json", {
            "model": r.model, "model_id": identity, "device": device_name, "dtype": str(next(net.parameters()).dtype),
            "limit": r.limit, "tasks": results, "seconds": round(time.perf_counter() - start, 1)})
        if outcomes:  # compact: thousands of 0/1 a task
            write_text_atomic(out / "outcomes.json", json.dumps(
                {"model": r.model, "model_id": identity, "limit": r.limit, "tasks": outcomes}, separators=(",", ":")))

    for task in builtin:
        if task.name in results:
            print(f"{task.name}: kept from {out / 'eval.json'}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        metrics, rows = _apply_limit(task, r.limit).evaluate_rows(lm, progress=True)
        results[task.name] = {**metrics, "seconds": round(time.perf_counter() - t0, 2)}
        if rows is not None:
            outcomes[task.name] = rows
        print(f"{task.name}: {results[task.name]}", file=sys.stderr)
        write()
    if harness:
        from jetnas.evaluation.harness import run_harness

        harness_results = run_harness(net, tok, harness, limit=r.limit, num_fewshot=r.num_fewshot,
                                      batch_size=r.batch_size, data_dir=r.data_dir, max_length=r.max_length)
        results.update({k: v for k, v in harness_results.items() if isinstance(v, dict)})
    write()
    table = markdown_table(r.model, results)
    (out / "eval.md").write_text(table + "\n")
    print(table, file=sys.stderr)
    return EvalResult(model=r.model, out_dir=str(out),
                      results={k: {m: v for m, v in res.items() if m != "seconds"} for k, res in results.items()})
