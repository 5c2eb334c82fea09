"""`jetnas eval`: built-in tasks and lm-evaluation-harness tasks on one model, one report."""

from __future__ import annotations

from jetnas.commands import recipe_command
from jetnas.runner.recipes import EvalRecipe


@recipe_command(EvalRecipe)
def evaluate(recipe: EvalRecipe) -> dict:
    """Evaluate a model on built-in tasks (ppl:, mc:, cloze:, retrieval:) and harness tasks or groups."""
    from jetnas.evaluation.names import check_harness_available
    from jetnas.runner.evaluate import run_eval
    from jetnas.runner.models import check_model_path

    # answered before torch loads: a missing model, harness tasks without lm-evaluation-harness
    check_model_path(recipe.model)
    check_harness_available([t for t in recipe.tasks.split(",") if t])
    return run_eval(recipe).to_record()
