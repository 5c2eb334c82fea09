"""Running one search candidate: train it in the placement with the stage-1 recipe, evaluate it, measure its decode
throughput. What the block search (steps 2-3) and the shape search (step 4) share; their bookkeeping (which
candidates, reuse, ranking, tables) is `jetnas.nas`, which calls `CandidateRunner.run` for each candidate.

Every candidate trains with the identical stage-1 recipe (`jetnas.train.stages`), is evaluated on the same built-in
tasks, and measured: training throughput (median per-step tokens/s of the trainer) and decode throughput (the
recipe's `measure`, by default `jetnas.bench.measure.replicated_decode_throughput`, the benchmarks' protocol; the
median of `decode_repeats` measurements).
"""

from __future__ import annotations

import copy
import gc
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from jetnas.runner.recipes import CandidateRecipe


def median_run(runs: list[dict]) -> dict:
    """The measurement with the median decode throughput (the lower middle of an even count), plus every run's
    throughput under `decode_tokens_per_s_runs`."""
    middle = sorted(runs, key=lambda r: r["decode_tokens_per_s"])[(len(runs) - 1) // 2]
    return {**middle, "decode_tokens_per_s_runs": [r["decode_tokens_per_s"] for r in runs]}


def repeated_measurements(measure: Callable, model, repeats: int, **kwargs) -> list[dict]:
    """`repeats` calls of `measure(model, **kwargs)`. A measurement that takes `warmup` (the replicated protocol's
    untimed first run, so kernel compilation and autotuning are not timed) warms up before the first only: the
    later ones follow a full measurement of the same shapes, a better warm-up than the short one, which on CPU cost
    a second prefill of the context per measurement (a third of each candidate's decode measurement, 2026-12-07)."""
    import inspect

    takes_warmup = "warmup" in inspect.signature(measure).parameters
    return [measure(model, **kwargs, **({"warmup": False} if i and takes_warmup else {})) for i in range(repeats)]


def free_memory() -> None:
    """Let go of a finished candidate's tensors before the next one allocates its own."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class CandidateRunner:
    """The teacher, the placement, the held-out text and the tasks of a search, loaded once, and running one
    candidate with them (`run`) or the teacher as the reference row (`reference`).

    Args:
        recipe: the search's recipe (teacher, placement, training, tasks, decode measurement).
        out: the search's directory (its held-out text is written there).
        measure: the decode-throughput function (`jetnas.runner.measures`), or None to measure only the cache.
        measure_name: how the records name it.
    """

    def __init__(self, recipe: CandidateRecipe, out: Path, measure: Callable | None, measure_name: str):
        import torch

        from jetnas.evaluation.tasks import MultipleChoiceTask
        from jetnas.nas.objectives import build_search_tasks
        from jetnas.models.convert import default_swa_window
        from jetnas.nas.placement import read_placement
        from jetnas.nas.ranking import TaskMetric
        from jetnas.train.distributed import local_device
        from jetnas.train.mixture import resolve_mixture
        from jetnas.train.stages import load_stage_teacher

        specs = [t for t in recipe.tasks.split(",") if t]
        if not specs:
            raise ValueError("--tasks is empty")
        self.device = local_device(recipe.device)
        self.teacher = load_stage_teacher(recipe.teacher, self.device)
        config = self.teacher.model.config
        default_window, why = default_swa_window(config)
        self.placement = read_placement(recipe.placement, config.num_hidden_layers, recipe.swa_window,
                                        default_window=default_window)
        if self.placement.info.get("swa_window_is_default"):
            print(f"jetnas: swa layers get a window of {default_window} tokens ({why}); another with --swa-window",
                  file=sys.stderr)
        self.swa = {"swa": {"window_size": self.placement.swa_window}} if self.placement.swa_window else {}
        out.mkdir(parents=True, exist_ok=True)
        mixture = resolve_mixture(recipe.data, self.teacher.tokenizer, teacher=self.teacher.model,
                                  teacher_eos=self.teacher.eos_token_id, heldout_tokens=recipe.heldout_tokens,
                                  generated_tokens=recipe.generated_tokens, seed=recipe.seed,
                                  teacher_name=self.teacher.spec.name)
        heldout = mixture.heldout()
        lm_data = str(heldout.save(out / "heldout.bin")) if heldout is not None else None
        self.tasks = build_search_tasks(specs, rows=recipe.rows, lm_data=lm_data, lm_tokens=recipe.lm_tokens,
                                        retrieval_length=recipe.retrieval_length)
        # Table 1 reports accuracy for multiple choice (the placement search ranks by the correct answer's loss)
        self.metrics = [TaskMetric(t.name, "acc" if isinstance(t.task, MultipleChoiceTask) else t.metric,
                                   True if isinstance(t.task, MultipleChoiceTask) else t.higher_is_better)
                        for t in self.tasks]
        self.max_length = max([recipe.retrieval_length + 64, recipe.seq_len, 1024]
                              + [getattr(t.task, "length", 0) + 64 for t in self.tasks])
        self.train_args = {**recipe.train_args(), "data": recipe.data, "heldout_tokens": recipe.heldout_tokens,
                           "generated_tokens": recipe.generated_tokens, "seed": recipe.seed,
                           "device": str(self.device)}
        self.eval_batch_size, self.decode, self.measure = recipe.eval_batch_size, recipe.decode(), measure
        self.keep_models = recipe.keep_models
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        #: everything that decides a candidate's record (a finished candidate is reused only under the same one)
        self.recipe = {"teacher": self.teacher.spec.name, "placement": self.placement.choices,
                       "swa_window": self.placement.swa_window, "tasks": specs, "rows": recipe.rows,
                       "lm_tokens": recipe.lm_tokens, "retrieval_length": recipe.retrieval_length,
                       **{k: v for k, v in self.train_args.items() if k != "device"},
                       "decode": self.decode, "measure": measure_name, "device": device_name}

    def evaluate(self, model) -> dict[str, dict]:
        import torch

        from jetnas.evaluation.scoring import LanguageModel

        lm = LanguageModel.from_hf(model.eval(), self.teacher.tokenizer, max_length=self.max_length,
                                   batch_size=self.eval_batch_size)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            return {t.name: {k: float(v) for k, v in t.task.evaluate(lm).items()} for t in self.tasks}

    def measure_decode(self, model) -> dict:
        """Decode throughput of `model` (cast to bf16 on GPU, as the paper measures) and its cache bytes."""
        import torch

        context = self.decode["context_length"]
        cache = model.cache_bytes(context) if hasattr(model, "cache_bytes") else None
        if self.measure is None:
            return {"cache_bytes_per_sequence": cache}
        if self.device.type == "cuda":
            model = model.to(torch.bfloat16)
        runs = repeated_measurements(self.measure, model, self.decode["repeats"], batch_size=self.decode["batch_size"],
                                     context_length=context, new_tokens=self.decode["new_tokens"], device=self.device)
        result = median_run(runs)
        return {"decode": result, "decode_tokens_per_s": result["decode_tokens_per_s"],
                "prefill_tokens_per_s": result.get("prefill_tokens_per_s"),
                "cache_bytes_per_sequence": result.get("cache_bytes_per_sequence", cache)}

    def block_config(self, candidate) -> dict:
        """The candidate's `efficient_attention_config` in this placement (the swa window included)."""
        from jetnas.models.layer_types import merge_block_configs

        return merge_block_configs(self.swa, candidate.block_config())

    def run(self, candidate, cdir: Path) -> dict:
        """Train `candidate` in the placement with the stage-1 recipe, evaluate it and measure it."""
        from jetnas.train.stages import StageConfig, train_stage

        types = self.placement.layer_types(candidate.block_type)
        config = StageConfig(stage=1, teacher=self.teacher.spec.name, layer_types=types,
                             block_config=self.block_config(candidate), out_dir=str(cdir / "train"),
                             save_model=self.keep_models, eval_windows=0, **self.train_args)
        start = time.perf_counter()
        result = train_stage(config, teacher=self.teacher)
        record = {"layer_types": types, "block_config": config.block_config, "final_loss": result.summary["final_loss"],
                  "train_tokens_per_s": result.summary["step_tokens_per_s"],
                  "train_seconds": round(time.perf_counter() - start, 2),
                  "params": result.counts["parameters"], "trainable_params": result.counts["trainable_parameters"],
                  "model_dir": str(result.model_dir) if result.model_dir else None}
        record["tasks"] = self.evaluate(result.model)
        record.update(self.measure_decode(result.model))
        # a finished candidate is reused from its result.json: its checkpoints are no longer needed
        shutil.rmtree(cdir / "train" / "checkpoints", ignore_errors=True)
        del result
        free_memory()
        return record

    def reference(self, directory: Path) -> dict:
        """The teacher on the same tasks and measurement (a copy is measured: the teacher stays float32)."""
        model = self.teacher.model
        record = {"params": sum(p.numel() for p in model.parameters()), "tasks": self.evaluate(model)}
        record.update(self.measure_decode(copy.deepcopy(model) if self.device.type == "cuda" else model))
        free_memory()
        return record
