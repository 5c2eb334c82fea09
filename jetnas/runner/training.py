"""The two training stages after the search as runs (`run_training`, on `jetnas.train.stages`), and the training
text a teacher generates once for a whole pipeline (`generate_data`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from jetnas.runner.models import resolve_device
from jetnas.runner.recipes import TrainRecipe
from jetnas.runner.results import DataResult, TrainResult


def run_training(recipe: TrainRecipe) -> TrainResult:
    """Stage 1 or 2 (see `jetnas.train.stages`): writes stage_config.json, log.jsonl, checkpoints and model/ under
    the recipe's out_dir (default `runs/stage<N>-<time>`), resuming from its checkpoints."""
    from jetnas.train.stages import StageConfig, train_stage

    out = recipe.out_dir or f"runs/stage{recipe.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train_stage(StageConfig(**{**dataclasses.asdict(recipe), "out_dir": out}))
    s = result.summary
    return TrainResult(stage=recipe.stage, out_dir=out, model_dir=str(result.model_dir),
                       layer_types=",".join(result.layer_types), block_config=result.block_config, steps=s["steps"],
                       tokens=s["tokens"], final_loss=s["final_loss"], tokens_per_s=s["step_tokens_per_s"],
                       seconds=s["seconds"], eval=s["eval"], **result.counts, data=result.mixture.describe(),
                       outputs={"model": str(result.model_dir), "config": str(Path(out) / "stage_config.json"),
                                "log": str(Path(out) / "log.jsonl")}, cuda_graph=s.get("cuda_graph"),
                       resumed_at_step=s.get("resumed_at_step"), seconds_this_process=s.get("seconds_this_process"))


def generate_data(teacher: str, tokens: int, seed: int, target: str, device: str | None, length: int | None = None,
                  special: bool = True) -> DataResult:
    """`tokens` tokens of text sampled from `teacher` (seeded; `jetnas.train.data.teacher_generated`: through the
    inference engine, in `generation_defaults` batches for the device, or `length` new tokens a sample; `special`
    False never samples the tokenizer's special tokens but EOS), saved as a token file at `target`."""
    from jetnas.models.teachers import load_teacher
    from jetnas.train.data import teacher_generated

    model, tokenizer, spec = load_teacher(teacher, device=resolve_device(device))
    stream = teacher_generated(model, tokenizer, spec.eos_token_id, tokens, seed=seed, name=spec.name, length=length,
                               special=special)
    path = stream.save(target)
    return DataResult(path=str(path), tokens=len(stream))


def build_recall_data(teacher: str, corpus: str, documents: int, seed: int, target: str,
                      max_articles: int | None = None, **options) -> DataResult:
    """Retrieval-bearing documents (`jetnas.train.recall_data`) built from the articles of `corpus` with `teacher`'s
    tokenizer and end-of-document id, saved as a token file at `target`; `options` are further `RecallConfig`
    fields (doc_tokens, min_distance, ...)."""
    from jetnas.models.teachers import load_teacher
    from jetnas.train.data import TokenStream
    from jetnas.train.recall_data import RecallConfig, build_recall_bin

    _, tokenizer, spec = load_teacher(teacher)
    config = RecallConfig(documents=documents, seed=seed, **options)
    path = build_recall_bin(corpus, tokenizer, target, config, eos_id=spec.eos_token_id, max_articles=max_articles)
    return DataResult(path=str(path), tokens=len(TokenStream.from_file(path)))
