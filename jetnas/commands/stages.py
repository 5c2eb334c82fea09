"""`jetnas train --stage 1|2`, `jetnas search blocks` and `jetnas search hardware`: PostNAS steps 2-4 and the two
training stages from the command line. Python callers (`jetnas run`) call these same functions; `measure` also
takes a callable there.

The searches train every candidate with the identical stage-1 recipe (`jetnas.train.stages`), evaluate it on the
same built-in tasks, and measure its training throughput (median per-step tokens/s of the trainer) and decode
throughput (`jetnas.bench.measure.replicated_decode_throughput`, the benchmarks' protocol, unless `measure` says
otherwise); the bookkeeping (candidates,
reuse of finished ones, ranking, tables, figures, the tolerance rule) is `jetnas.nas.blocks`.
"""

from __future__ import annotations

import copy
import gc
import importlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

DEFAULT_TASKS = "lm,retrieval"


def _resolve_measure(measure: str | Callable | None, required: bool) -> Callable | None:
    """The decode-throughput function: a callable as is; None: `jetnas.bench.measure.replicated_decode_throughput`
    (imported only now; the protocol of `jetnas bench` and the GPU benchmark: one prompt prefilled, its cache copied
    into every row); "none": no measurement (only where it is optional); "module:function" otherwise."""
    if callable(measure):
        return measure
    if measure is None:
        try:
            from jetnas.bench.measure import replicated_decode_throughput
        except ImportError as err:
            raise ImportError(f"decode throughput needs jetnas.bench.measure.replicated_decode_throughput, which "
                              f"cannot be imported here ({err}); pass --measure MODULE:FUNCTION"
                              + ("" if required else " or --measure none to skip the decode measurement")) from err
        return replicated_decode_throughput
    if measure == "none":
        if required:
            raise ValueError("the hardware search chooses by measured decode throughput: --measure none is not allowed")
        return None
    module, sep, name = measure.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--measure must be MODULE:FUNCTION or none, got {measure!r}")
    try:
        imported = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"--measure {measure!r}: cannot import {module!r} ({err}); is it on PYTHONPATH?") from err
    fn = getattr(imported, name, None)
    if not callable(fn):
        raise ValueError(f"--measure {measure!r}: {module} has no function {name!r}")
    return fn


def _block_config(value: str | dict | None) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"--block-config is not valid JSON ({err}): {value!r}") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"--block-config must be a JSON object of block type -> options, got {value!r}")
    return parsed


def train(stage: int, teacher: str = "smollm2-135m", model: str | None = None, layer_types: str | None = None,
          block_config: str | None = None, swa_window: int | None = None, data: str | None = None, steps: int = 1000,
          out_dir: str | None = None, batch_size: int = 8, micro_batch_size: int | None = None, seq_len: int = 512,
          lr: float | None = None, warmup_steps: int | None = None, min_lr_ratio: float = 0.1,
          weight_decay: float = 0.01, grad_clip: float = 1.0, hidden_weight: float | None = None,
          kl_weight: float | None = None, lm_weight: float | None = None, temperature: float = 1.0,
          heldout_tokens: int = 16384, generated_tokens: int = 200_000, eval_every: int | None = None,
          save_every: int | None = None, seed: int = 0, precision: str = "auto", distributed: str = "auto",
          resume: bool = True, device: str | None = None) -> dict:
    """Train a hybrid: stage 1 (MLPs frozen, distillation from the teacher) or stage 2 (everything, LM loss).

    Args:
        stage: 1: only the token mixers train, on hidden-state MSE + KL against the teacher; 2: every parameter
            trains on cross-entropy (+ optional KL), over a data mixture.
        teacher: smollm2-135m, a model directory, a .gguf file or a hub id (distillation target, conversion
            source, tokenizer).
        model: a hybrid directory to start from (stage 2: stage 1's out-dir/model); instead of --layer-types.
        layer_types: convert the teacher with these layers: attn, swa and linear blocks or block variants
            (jet, gdn, jet-dyn-qk, jet:qk_conv=static, jet*12), comma-separated; or a preset name.
        block_config: JSON of per-block-type options, e.g. '{"jet": {"num_heads": 12, "head_dim": 96,
            "expand_v": 2.6667}}' (the hardware search's block_config).
        swa_window: the sliding window of swa layers.
        data: training text: a token .bin, .txt/.jsonl(.gz), hf:NAME, or a weighted mixture like
            web.bin:0.7,math.jsonl:0.3; none = text the teacher generates.
        steps: optimizer steps.
        out_dir: where stage_config.json, log.jsonl, checkpoints and model/ go (default runs/stage<N>-<time>).
        batch_size: sequences per optimizer step (all ranks together).
        micro_batch_size: sequences per forward pass on each rank (gradient accumulation covers the rest).
        seq_len: tokens per sequence.
        lr: peak learning rate (default: stage 1 1e-3, stage 2 3e-4).
        warmup_steps: default steps / 20 (at least 1).
        min_lr_ratio: the cosine schedule ends at lr * this.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clipping (0: none).
        hidden_weight: weight of the per-layer relative hidden-state MSE (default: stage 1 1, stage 2 0).
        kl_weight: weight of KL(teacher || student) on next-token distributions (default: stage 1 1, stage 2 0).
        lm_weight: weight of the cross-entropy (default: stage 1 0, stage 2 1).
        temperature: temperature of the KL term.
        heldout_tokens: tokens held out of each data source for the held-out loss.
        generated_tokens: tokens of teacher text to generate when no data is given.
        eval_every: steps between held-out evaluations (default: at the end only).
        save_every: steps between checkpoints (default: steps / 4).
        seed: seed of new blocks, data order and mixture sampling.
        precision: auto (bf16 autocast on GPU), fp32 or bf16.
        distributed: auto, ddp or fsdp when launched with torchrun.
        resume: continue from the newest checkpoint in out-dir.
        device: cpu, cuda, ...; default cuda when available (torchrun: each rank's own GPU).
    """
    from jetnas.train.stages import StageConfig, train_stage

    out = out_dir or f"runs/stage{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = StageConfig(
        stage=stage, teacher=teacher, model=model, layer_types=layer_types, block_config=_block_config(block_config),
        swa_window=swa_window, data=data, steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size,
        seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
        grad_clip=grad_clip, hidden_weight=hidden_weight, kl_weight=kl_weight, lm_weight=lm_weight,
        temperature=temperature, heldout_tokens=heldout_tokens, generated_tokens=generated_tokens,
        eval_every=eval_every, save_every=save_every, seed=seed, precision=precision, distributed=distributed,
        resume=resume, out_dir=out, device=device)
    result = train_stage(config)
    s = result.summary
    return {"stage": stage, "out_dir": out, "model_dir": str(result.model_dir),
            "layer_types": ",".join(result.layer_types), "block_config": result.block_config, "steps": s["steps"],
            "tokens": s["tokens"], "final_loss": s["final_loss"], "tokens_per_s": s["step_tokens_per_s"],
            "seconds": s["seconds"], "eval": s["eval"], **result.counts, "data": result.mixture.describe(),
            "outputs": {"model": str(result.model_dir), "config": str(Path(out) / "stage_config.json"),
                        "log": str(Path(out) / "log.jsonl")}}


def median_run(runs: list[dict]) -> dict:
    """The measurement with the median decode throughput (the lower middle of an even count), plus every run's
    throughput under `decode_tokens_per_s_runs`."""
    middle = sorted(runs, key=lambda r: r["decode_tokens_per_s"])[(len(runs) - 1) // 2]
    return {**middle, "decode_tokens_per_s_runs": [r["decode_tokens_per_s"] for r in runs]}


class _Search:
    """What both searches share: the teacher, the placement, the held-out text, the tasks, and running one
    candidate (train with the stage-1 recipe, evaluate, measure)."""

    def __init__(self, teacher: str, placement: str, swa_window: int | None, data: str | None, tasks: str,
                 rows: int, lm_tokens: int, retrieval_length: int, heldout_tokens: int, generated_tokens: int,
                 train_args: dict, eval_batch_size: int, decode: dict, measure: Callable | None, measure_name: str,
                 keep_models: bool, out: Path, seed: int, device: str | None):
        if decode["repeats"] < 1:  # before anything loads or trains
            raise ValueError(f"decode_repeats must be >= 1, got {decode['repeats']}")
        from jetnas.evaluation.tasks import MultipleChoiceTask
        from jetnas.nas.blocks import TaskMetric, read_placement
        from jetnas.nas.objectives import build_search_tasks
        from jetnas.train.distributed import local_device
        from jetnas.train.mixture import resolve_mixture
        from jetnas.train.stages import load_stage_teacher

        specs = [t for t in tasks.split(",") if t]
        if not specs:
            raise ValueError("--tasks is empty")
        self.device = local_device(device)
        self.teacher = load_stage_teacher(teacher, self.device)
        self.placement = read_placement(placement, self.teacher.model.config.num_hidden_layers, swa_window)
        self.swa = {"swa": {"window_size": self.placement.swa_window}} if self.placement.swa_window else {}
        out.mkdir(parents=True, exist_ok=True)
        mixture = resolve_mixture(data, self.teacher.tokenizer, teacher=self.teacher.model,
                                  teacher_eos=self.teacher.eos_token_id, heldout_tokens=heldout_tokens,
                                  generated_tokens=generated_tokens, seed=seed, teacher_name=self.teacher.spec.name)
        heldout = mixture.heldout()
        lm_data = str(heldout.save(out / "heldout.bin")) if heldout is not None else None
        self.tasks = build_search_tasks(specs, rows=rows, lm_data=lm_data, lm_tokens=lm_tokens,
                                        retrieval_length=retrieval_length)
        # Table 1 reports accuracy for multiple choice (the placement search ranks by the correct answer's loss)
        self.metrics = [TaskMetric(t.name, "acc" if isinstance(t.task, MultipleChoiceTask) else t.metric,
                                   True if isinstance(t.task, MultipleChoiceTask) else t.higher_is_better)
                        for t in self.tasks]
        self.max_length = max([retrieval_length + 64, train_args["seq_len"], 1024]
                              + [getattr(t.task, "length", 0) + 64 for t in self.tasks])
        self.train_args = {**train_args, "data": data, "heldout_tokens": heldout_tokens,
                           "generated_tokens": generated_tokens, "seed": seed, "device": str(self.device)}
        self.eval_batch_size, self.decode, self.measure = eval_batch_size, decode, measure
        self.keep_models = keep_models
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.recipe = {"teacher": self.teacher.spec.name, "placement": self.placement.choices,
                       "swa_window": self.placement.swa_window, "tasks": specs, "rows": rows, "lm_tokens": lm_tokens,
                       "retrieval_length": retrieval_length,
                       **{k: v for k, v in self.train_args.items() if k != "device"},
                       "decode": decode, "measure": measure_name, "device": device_name}

    def evaluate(self, model) -> dict[str, dict]:
        from jetnas.evaluation.scoring import LanguageModel

        lm = LanguageModel.from_hf(model.eval(), self.teacher.tokenizer, max_length=self.max_length,
                                   batch_size=self.eval_batch_size)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            return {t.name: {k: float(v) for k, v in t.task.evaluate(lm).items()} for t in self.tasks}

    def measure_decode(self, model) -> dict:
        """Decode throughput of `model` (cast to bf16 on GPU, as the paper measures) and its cache bytes."""
        context = self.decode["context_length"]
        cache = model.cache_bytes(context) if hasattr(model, "cache_bytes") else None
        if self.measure is None:
            return {"cache_bytes_per_sequence": cache}
        if self.device.type == "cuda":
            model = model.to(torch.bfloat16)
        runs = [self.measure(model, batch_size=self.decode["batch_size"], context_length=context,
                             new_tokens=self.decode["new_tokens"], device=self.device)
                for _ in range(self.decode["repeats"])]
        result = median_run(runs)
        return {"decode": result, "decode_tokens_per_s": result["decode_tokens_per_s"],
                "prefill_tokens_per_s": result.get("prefill_tokens_per_s"),
                "cache_bytes_per_sequence": result.get("cache_bytes_per_sequence", cache)}

    def block_config(self, candidate) -> dict:
        from jetnas.nas.blocks import merge_block_configs

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
        _free_memory()
        return record

    def reference(self, directory: Path) -> dict:
        """The teacher on the same tasks and measurement (a copy is measured: the teacher stays float32)."""
        model = self.teacher.model
        record = {"params": sum(p.numel() for p in model.parameters()), "tasks": self.evaluate(model)}
        record.update(self.measure_decode(copy.deepcopy(model) if self.device.type == "cuda" else model))
        _free_memory()
        return record


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _measure_name(measure) -> str:
    if measure is None:
        return "jetnas.bench.measure:replicated_decode_throughput"
    if callable(measure):
        return f"{getattr(measure, '__module__', '?')}:{getattr(measure, '__qualname__', repr(measure))}"
    return str(measure)


def search_blocks(teacher: str, placement: str, blocks: str = "gdn,gla,mamba2,retnet,deltanet,jet",
                  tasks: str = DEFAULT_TASKS, data: str | None = None, steps: int = 200, batch_size: int = 8,
                  micro_batch_size: int | None = None, seq_len: int = 512, lr: float = 1e-3,
                  warmup_steps: int | None = None, hidden_weight: float = 1.0, kl_weight: float = 1.0,
                  swa_window: int | None = None, rows: int = 16, lm_tokens: int = 8192, retrieval_length: int = 1024,
                  heldout_tokens: int = 32768, generated_tokens: int = 200_000, eval_batch_size: int = 8,
                  decode_batch_size: int = 8, decode_context: int = 2048, decode_tokens: int = 32,
                  decode_repeats: int = 3, measure: str | Callable | None = None, teacher_reference: bool = True,
                  matched_shapes: bool = True, keep_models: bool = False, out_dir: str | None = None, seed: int = 0,
                  precision: str = "auto",
                  device: str | None = None) -> dict:
    """PostNAS step 2 (and 3): train each linear block in the fixed placement with one recipe, compare them.

    Args:
        teacher: smollm2-135m, a model directory, a .gguf file or a hub id.
        placement: a placements.json from `jetnas search placement` (its best entry), or layer types
            (attn,swa kept; every other entry becomes the candidate block).
        blocks: comma-separated candidates: gdn, gla, mamba2, retnet, deltanet, jet; JetBlock variants
            jet-static-qk, jet-dyn-qk, jet-dyn-qkv, jet-static-v; or TYPE:KEY=VALUE+KEY=VALUE
            (e.g. jet:qk_conv=dynamic+v_conv=static; options may also be comma-separated).
        tasks: comma-separated: lm (loss on held-out text), retrieval (needle at --retrieval-length), mc:PATH,
            cloze:PATH, ppl:PATH, retrieval:KIND@LENGTH.
        data: training text (as `jetnas train`); none = text the teacher generates.
        steps: optimizer steps per candidate (identical for all).
        batch_size: sequences per optimizer step.
        micro_batch_size: sequences per forward pass (gradient accumulation covers the rest).
        seq_len: tokens per sequence.
        lr: peak learning rate.
        warmup_steps: default steps / 20 (at least 1).
        hidden_weight: weight of the per-layer hidden-state MSE against the teacher.
        kl_weight: weight of KL(teacher || candidate) on next-token distributions.
        swa_window: window of the placement's swa layers (default: from the placements file or its
            super-network).
        rows: rows per multiple-choice / retrieval task.
        lm_tokens: held-out tokens scored by the lm task.
        retrieval_length: context length of the default retrieval task.
        heldout_tokens: tokens held out of the training data (the lm task's text).
        generated_tokens: tokens of teacher text to generate when no data is given.
        eval_batch_size: sequences per forward pass when evaluating.
        decode_batch_size: batch of the decode-throughput measurement.
        decode_context: context length (prompt tokens) of the decode-throughput measurement.
        decode_tokens: tokens decoded per measurement.
        decode_repeats: measurements per model; the median counts (one takes ~0.2 s on a GPU, and the
            hardware search's 1% tolerance is finer than one measurement's noise).
        measure: decode-throughput function as MODULE:FUNCTION (default
            jetnas.bench.measure:replicated_decode_throughput), or none to skip decode measurement.
        teacher_reference: also evaluate and measure the teacher, as the table's reference row.
        matched_shapes: give every candidate the teacher's attention shape (heads x head_dim keys and values; the
            JetBlock's value dim and Mamba2's width are otherwise 2x), so all hold the same state and inherit
            q/k/v/o; a candidate's own shape options win.
        keep_models: save every candidate's trained model (candidates/<name>/train/model).
        out_dir: where blocks.md, blocks.json, blocks.png and candidates/ go (default runs/blocks-<time>).
        seed: seed of new blocks and data order (identical for all candidates).
        precision: auto (bf16 autocast on GPU), fp32 or bf16.
        device: cpu, cuda, ...; default cuda when available.
    """
    from jetnas.nas.blocks import matched_shape, parse_candidates, run_block_search

    candidates = parse_candidates(blocks)  # bad names fail before anything loads
    if matched_shapes:
        candidates = [matched_shape(c) for c in candidates]
    measure_fn = _resolve_measure(measure, required=False)
    out = Path(out_dir or f"runs/blocks-{time.strftime('%Y%m%d-%H%M%S')}")
    decode = {"batch_size": decode_batch_size, "context_length": decode_context, "new_tokens": decode_tokens,
              "repeats": decode_repeats}
    train_args = {"steps": steps, "batch_size": batch_size, "micro_batch_size": micro_batch_size, "seq_len": seq_len,
                  "lr": lr, "warmup_steps": warmup_steps, "hidden_weight": hidden_weight, "kl_weight": kl_weight,
                  "precision": precision}
    search = _Search(teacher, placement, swa_window, data, tasks, rows, lm_tokens, retrieval_length, heldout_tokens,
                     generated_tokens, train_args, eval_batch_size, decode, measure_fn, _measure_name(measure),
                     keep_models, out, seed, device)
    print(f"jetnas: block selection, {len(candidates)} candidates ({', '.join(c.name for c in candidates)}), "
          f"placement attn {search.placement.attn} swa {search.placement.swa}, {steps} steps each", file=sys.stderr)
    summary = run_block_search(candidates, search.run, search.metrics, out, search.recipe,
                               reference=search.reference if teacher_reference else None,
                               context_length=decode_context)
    best = next(c for c in candidates if c.name == summary["best"])
    return {"out_dir": str(out), "teacher": search.teacher.spec.name, "placement": search.placement.describe(),
            **summary, "layer_types": ",".join(search.placement.layer_types(best.block_type)),
            "block_config": search.block_config(best)}


def search_hardware(teacher: str, placement: str, block: str = "jet", state_bytes: int | None = None,
                    tolerance: float = 0.01, heads: list[int] | None = None, key_dims: list[int] | None = None,
                    max_candidates: int | None = None, tasks: str = DEFAULT_TASKS, data: str | None = None,
                    steps: int = 100, batch_size: int = 8, micro_batch_size: int | None = None, seq_len: int = 512,
                    lr: float = 1e-3, warmup_steps: int | None = None, hidden_weight: float = 1.0,
                    kl_weight: float = 1.0, swa_window: int | None = None, rows: int = 16, lm_tokens: int = 8192,
                    retrieval_length: int = 1024, heldout_tokens: int = 32768, generated_tokens: int = 200_000,
                    eval_batch_size: int = 8, decode_batch_size: int = 8, decode_context: int = 2048,
                    decode_tokens: int = 32, decode_repeats: int = 3, measure: str | Callable | None = None,
                    keep_models: bool = False, out_dir: str | None = None, seed: int = 0, precision: str = "auto",
                    device: str | None = None) -> dict:
    """PostNAS step 4: at a fixed state size, pick the block's (d_k, d_v, heads) by measured decode speed and accuracy.

    Args:
        teacher: smollm2-135m, a model directory, a .gguf file or a hub id.
        placement: a placements.json from `jetnas search placement`, or layer types (attn,swa kept).
        block: the block whose shape is searched (jet, a JetBlock variant like jet-dyn-qk, gdn, ...; the block
            search's best).
        state_bytes: bytes of one linear layer's recurrent state per sequence (float32: 4 bytes a number);
            default: the original shape's (the block's default for this teacher, or the --block options).
        tolerance: the chosen shape's decode throughput must be within this fraction of the original's.
        heads: head counts to try (default 2,4,6,8,12,16,24,32, plus the original's).
        key_dims: key dims to try (default 32,48,64,96,128,192,256, plus the original's).
        max_candidates: try at most this many shapes (the original and an even spread of the others).
        tasks: comma-separated: lm, retrieval, mc:PATH, cloze:PATH, ppl:PATH, retrieval:KIND@LENGTH.
        data: training text (as `jetnas train`); none = text the teacher generates.
        steps: optimizer steps per shape (the block search's recipe, briefly).
        batch_size: sequences per optimizer step.
        micro_batch_size: sequences per forward pass.
        seq_len: tokens per sequence.
        lr: peak learning rate.
        warmup_steps: default steps / 20 (at least 1).
        hidden_weight: weight of the per-layer hidden-state MSE against the teacher.
        kl_weight: weight of KL(teacher || candidate) on next-token distributions.
        swa_window: window of the placement's swa layers (default: from the placements file or its
            super-network).
        rows: rows per multiple-choice / retrieval task.
        lm_tokens: held-out tokens scored by the lm task.
        retrieval_length: context length of the default retrieval task.
        heldout_tokens: tokens held out of the training data (the lm task's text).
        generated_tokens: tokens of teacher text to generate when no data is given.
        eval_batch_size: sequences per forward pass when evaluating.
        decode_batch_size: batch of the decode-throughput measurement.
        decode_context: context length (prompt tokens) of the decode-throughput measurement.
        decode_tokens: tokens decoded per measurement.
        decode_repeats: measurements per model; the median counts (one takes ~0.2 s on a GPU, and the
            hardware search's 1% tolerance is finer than one measurement's noise).
        measure: decode-throughput function as MODULE:FUNCTION (default
            jetnas.bench.measure:replicated_decode_throughput).
        keep_models: save every shape's trained model.
        out_dir: where hardware.md, hardware.json, hardware.png and candidates/ go (default runs/hardware-<time>).
        seed: seed of new blocks and data order (identical for all shapes).
        precision: auto (bf16 autocast on GPU), fp32 or bf16.
        device: cpu, cuda, ...; default cuda when available.
    """
    from jetnas.models.convert import hybrid_config
    from jetnas.nas.blocks import (
        merge_block_configs,
        parse_candidate,
        run_hardware_search,
        shape_candidates,
        shape_from_kwargs,
        shape_name,
    )

    base = parse_candidate(block)
    if state_bytes is not None and (state_bytes < 4 or state_bytes % 4):
        raise ValueError(f"--state-bytes={state_bytes} must be a positive multiple of 4 (float32 state numbers)")
    measure_fn = _resolve_measure(measure, required=True)
    out = Path(out_dir or f"runs/hardware-{time.strftime('%Y%m%d-%H%M%S')}")
    decode = {"batch_size": decode_batch_size, "context_length": decode_context, "new_tokens": decode_tokens,
              "repeats": decode_repeats}
    train_args = {"steps": steps, "batch_size": batch_size, "micro_batch_size": micro_batch_size, "seq_len": seq_len,
                  "lr": lr, "warmup_steps": warmup_steps, "hidden_weight": hidden_weight, "kl_weight": kl_weight,
                  "precision": precision}
    search = _Search(teacher, placement, swa_window, data, tasks, rows, lm_tokens, retrieval_length, heldout_tokens,
                     generated_tokens, train_args, eval_batch_size, decode, measure_fn, _measure_name(measure),
                     keep_models, out, seed, device)
    types = search.placement.layer_types(base.block_type)
    config = hybrid_config(search.teacher.model.config, types, search.block_config(base))
    original = shape_from_kwargs(base.block_type, config.block_kwargs(base.block_type), config.hidden_size)
    target = state_bytes // 4 if state_bytes is not None else original.state_numbers
    shapes = shape_candidates(original, target, heads, key_dims, max_candidates)
    print(f"jetnas: hardware search of {base.name}: original {shape_name(original)} ({original.state_numbers} state "
          f"numbers); {len(shapes)} shapes at {target}: {', '.join(map(shape_name, shapes))}", file=sys.stderr)
    summary = run_hardware_search(base, shapes, original, search.run, search.metrics, out,
                                  {**search.recipe, "block": base.describe(), "state_numbers": target}, tolerance,
                                  state_numbers=target, context_length=decode_context)
    return {"out_dir": str(out), "teacher": search.teacher.spec.name, "placement": search.placement.describe(),
            "block": base.name, **summary, "state_bytes": 4 * target, "layer_types": ",".join(types),
            "block_config": merge_block_configs(search.swa, {base.block_type: summary["options"]})}
