"""`jetnas bench`: prefill and decode throughput of a model against the memory-bandwidth roofline."""

from __future__ import annotations

from jetnas.commands import recipe_command
from jetnas.runner.recipes import BenchRecipe


@recipe_command(BenchRecipe)
def bench(recipe: BenchRecipe) -> dict:
    """Measure prefill and decode throughput at each context length, against the memory-bandwidth roofline.

    The protocol of benchmarks/engine_h100.py ("replicated-prompt"): one prompt is prefilled once and its cache
    copied into every row of the batch (`Engine.generate_replicated`), then the batch decodes; prefill tokens/s is
    that one prompt's (after a warm-up run; the median of three timed passes). A decode step reads every row's
    cache whatever it holds, so this costs what a batch of different prompts costs. Token ids are random: no
    tokenizer is loaded, and a preset (random weights) needs no network.
    """
    from jetnas.runner.bench import run_bench
    from jetnas.runner.models import check_model_path

    check_model_path(recipe.model)
    return run_bench(recipe).to_record()
