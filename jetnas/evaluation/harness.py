"""lm-evaluation-harness adapter: harness tasks on an in-memory model, offline local tasks, the paper's task groups.

- `run_harness(model, tokenizer, tasks)` runs mainline `lm_eval` (optional dependency: `pip install 'jetnas[eval]'`)
  on any transformers causal LM object, ours included, through its `HFLM` (no reloading, no remote code).
- `jetnas_*` tasks read local benchmark files (the format of `shared/data/bench`: MMLU, ARC, HellaSwag, PIQA,
  LAMBADA) so the paper's commonsense and MMLU evaluations run offline. Their prompts are those of
  `jetnas.evaluation.tasks.mc_prompt`, so the harness and the built-in scorer agree row for row.
- `PAPER_TASK_GROUPS`: the paper's groups with their mainline harness task names and the metric it reports.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jetnas.evaluation.tasks import read_jsonl
from jetnas.validation import InputError


@dataclass(frozen=True)
class HarnessTask:
    name: str
    metric: str


# From the released Jet-Nemotron evaluation configs (NVlabs/Jet-Nemotron, jetai/evaluation/configs), with
# their forked task names mapped to mainline lm-eval (0.4.13): evalplus_* -> mbpp_plus / humaneval_plus,
# longbench_few_shot / single_doc / multi_doc -> longbench_fewshot / single / multi.
PAPER_TASK_GROUPS: dict[str, dict] = {
    "mmlu": {"tasks": [HarnessTask("mmlu", "acc,none")], "num_fewshot": 5, "max_length": 4096},
    "mmlu_pro": {"tasks": [HarnessTask("mmlu_pro", "exact_match,custom-extract")], "max_length": 4096,
                 "max_new_tokens": 2048},
    "bbh": {"tasks": [HarnessTask("bbh", "exact_match,get-answer")], "max_length": 4096, "max_new_tokens": 1024},
    "math": {"tasks": [HarnessTask("gsm8k", "exact_match,flexible-extract"),
                       HarnessTask("hendrycks_math", "exact_match,none"),
                       HarnessTask("gpqa_main_generative_n_shot", "exact_match,flexible-extract"),
                       HarnessTask("mmlu_stem", "acc,none"), HarnessTask("mathqa", "acc_norm,none")],
             "max_length": 4096, "max_new_tokens": 1024},
    "commonsense": {"tasks": [HarnessTask("arc_challenge", "acc_norm,none"), HarnessTask("arc_easy", "acc_norm,none"),
                              HarnessTask("piqa", "acc_norm,none"), HarnessTask("winogrande", "acc,none"),
                              HarnessTask("openbookqa", "acc_norm,none"), HarnessTask("boolq", "acc,none"),
                              HarnessTask("truthfulqa_mc2", "acc,none")], "max_length": 4096},
    "retrieval": {"tasks": [HarnessTask("fda", "contains,none"), HarnessTask("swde", "contains,none"),
                            HarnessTask("squad_completion", "contains,none")], "max_length": 4096},
    "code": {"tasks": [HarnessTask("mbpp_plus", "pass_at_1,none"), HarnessTask("humaneval_plus", "pass@1,create_test"),
                       HarnessTask("cruxeval_input_cot", "pass_at_5,default"),
                       HarnessTask("cruxeval_output_cot", "pass_at_5,default")], "max_length": 4096,
             "max_new_tokens": 768},
    "longbench": {"tasks": [HarnessTask(f"longbench_{n}", "score,none")
                            for n in ("code", "fewshot", "summarization", "single", "multi")],
                  "max_length": 262144, "max_new_tokens": 512},
}

# offline tasks: name -> (file, output type, prompt); MMLU is split per subject (see _render_mmlu)
_LOCAL_MC = {
    "jetnas_arc_easy": "arc_easy_test.jsonl",
    "jetnas_arc_challenge": "arc_challenge_test.jsonl",
    "jetnas_piqa": "piqa_val.jsonl",
    "jetnas_hellaswag": "hellaswag_val.jsonl.gz",
}
_MC_TEXT = {"jetnas_hellaswag": "{{question}}"}
_DEFAULT_MC_TEXT = "Question: {{question}}\\nAnswer:"
_MMLU_TEXT = ("{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}"
              "\\nAnswer:")
LOCAL_TASKS = ("jetnas_mmlu", *_LOCAL_MC, "jetnas_lambada_openai")


def resolve_tasks(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Expand paper group names into harness task names; returns (task names, {task: reported metric})."""
    tasks, metrics = [], {}
    for name in names:
        if name in PAPER_TASK_GROUPS:
            for t in PAPER_TASK_GROUPS[name]["tasks"]:
                tasks.append(t.name)
                metrics[t.name] = t.metric
        else:
            tasks.append(name)
    return tasks, metrics


def _yaml(fields: dict) -> str:
    # JSON is valid YAML: no YAML library needed and no quoting surprises in the Jinja templates
    return json.dumps(fields, indent=1)


def _local_dataset(path: Path) -> dict:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test"}


def render_local_tasks(data_dir: str | Path, into: str | Path) -> list[str]:
    """Write the offline task configs for the benchmark files present in `data_dir` into `into`; returns the
    names of the tasks (and groups) made."""
    data_dir, into = Path(data_dir), Path(into)
    made = []
    for name, file in _LOCAL_MC.items():
        if not (data_dir / file).exists():
            continue
        (into / f"{name}.yaml").write_text(_yaml({
            "task": name, **_local_dataset(data_dir / file), "output_type": "multiple_choice",
            "doc_to_text": _MC_TEXT.get(name, _DEFAULT_MC_TEXT).replace("\\n", "\n"),
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        }))
        made.append(name)
    if (data_dir / "lambada_openai_test.jsonl.gz").exists():
        (into / "jetnas_lambada_openai.yaml").write_text(_yaml({
            "task": "jetnas_lambada_openai", **_local_dataset(data_dir / "lambada_openai_test.jsonl.gz"),
            "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{' ' + target}}",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }))
        made.append("jetnas_lambada_openai")
    if (data_dir / "mmlu_test.jsonl.gz").exists():
        made += _render_mmlu(data_dir, into)
    return made


def _render_mmlu(data_dir: Path, into: Path) -> list[str]:
    """One task per subject (so few-shot examples come from the same subject's dev rows, first n, as the harness
    and our built-in scorer both do) and a group `jetnas_mmlu` averaging them by size."""
    test = read_jsonl(data_dir / "mmlu_test.jsonl.gz")
    dev = read_jsonl(data_dir / "mmlu_dev.jsonl") if (data_dir / "mmlu_dev.jsonl").exists() else []
    subjects = sorted({r["subject"] for r in test})
    names = []
    for subject in subjects:
        files = {}
        for split, rows in (("test", test), ("dev", dev)):
            keep = [r for r in rows if r["subject"] == subject]
            if keep:
                files[split] = into / f"mmlu_{subject}_{split}.jsonl"
                files[split].write_text("".join(json.dumps(r) + "\n" for r in keep))
        name = f"jetnas_mmlu_{subject}"
        fields = {"task": name, "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}}, "test_split": "test",
                  "output_type": "multiple_choice", "doc_to_text": _MMLU_TEXT.replace("\\n", "\n"),
                  "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{label}}",
                  "description": f"The following are multiple choice questions (with answers) about "
                                 f"{subject.replace('_', ' ')}.\n\n",
                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                  {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
        if "dev" in files:
            fields.update(fewshot_split="dev", fewshot_config={"sampler": "first_n"})
        (into / f"{name}.yaml").write_text(_yaml(fields))
        names.append(name)
    (into / "jetnas_mmlu.yaml").write_text(_yaml({
        "group": "jetnas_mmlu", "task": names,
        "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True}
                                  for m in ("acc", "acc_norm")],
    }))
    return ["jetnas_mmlu", *names]


def run_harness(model, tokenizer, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None,
                batch_size: int = 8, data_dir: str | None = None, max_length: int | None = None) -> dict:
    """Run lm-evaluation-harness tasks on an in-memory causal LM.

    Args:
        model: a transformers causal LM object (eval mode); any device.
        tokenizer: its tokenizer.
        tasks: harness task names, `jetnas_*` offline tasks, or paper group names (`PAPER_TASK_GROUPS`).
        limit: at most this many documents per task.
        num_fewshot: few-shot examples (default: each task's own; paper groups set theirs).
        batch_size: harness batch size.
        data_dir: folder of the local benchmark files for `jetnas_*` tasks (default: $JETNAS_BENCH_DIR).
        max_length: the model's context for the harness (default: the model config's).

    Returns:
        `{task: {metric: value}}` flattened from the harness results, plus `"_harness": {"version": ...}`.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("the lm-evaluation-harness route needs lm_eval: pip install 'jetnas[eval]'") from err

    names, reported = resolve_tasks(tasks)
    remote = [n for n in names if not n.startswith("jetnas_")]
    if remote:
        print(f"jetnas: lm-evaluation-harness reads the datasets of {', '.join(remote)} from the Hugging Face hub "
              f"(needs the network unless they are in its cache)", file=sys.stderr)
    group_fewshot = {PAPER_TASK_GROUPS[t]["num_fewshot"] for t in tasks
                     if t in PAPER_TASK_GROUPS and "num_fewshot" in PAPER_TASK_GROUPS[t]}
    if num_fewshot is None and len(group_fewshot) == 1:
        num_fewshot = group_fewshot.pop()
    data_dir = data_dir or os.environ.get("JETNAS_BENCH_DIR")
    local = [n for n in names if n.startswith("jetnas_")]
    with tempfile.TemporaryDirectory(prefix="jetnas-harness-") as tmp:
        include = None
        if local:
            if data_dir is None:
                raise ValueError(f"tasks {local} read local benchmark files: give --data-dir (or set "
                                 f"JETNAS_BENCH_DIR) to the folder holding e.g. mmlu_test.jsonl.gz")
            made = render_local_tasks(data_dir, tmp)
            missing = [n for n in local if n not in made]
            if missing:
                raise FileNotFoundError(f"no benchmark files in {data_dir!r} for {missing}")
            include = tmp
        device = str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                  max_length=max_length or getattr(model.config, "max_position_embeddings", 2048))
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=TaskManager(include_path=include), log_samples=False,
                                          bootstrap_iters=0)
        except ConnectionError as err:
            # datasets' "Couldn't reach ... on the Hub", deep in a traceback: one line saying what to do instead
            raise InputError(f"{', '.join(remote)}: {err} (offline?): the built-in tasks (mc:, cloze:, ppl:) and "
                             f"jetnas_* harness tasks with --data-dir read local files") from None
    results = {}
    for task, metrics in out["results"].items():
        clean = {}
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and "stderr" not in key:
                metric, _, filt = key.partition(",")
                clean[metric if filt in ("none", "") else key] = float(value)
        if task in reported:
            clean["reported_metric"] = reported[task]
        results[task] = clean
    results["_harness"] = {"version": getattr(lm_eval, "__version__", "unknown"), "num_fewshot": num_fewshot}
    return results
