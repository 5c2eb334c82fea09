"""`jetnas train --stage 1|2`, `jetnas search blocks` and `jetnas search hardware`: PostNAS steps 2-4 and the two
training stages from the command line (the runs are `jetnas.runner.training` and `jetnas.runner.searches`)."""

from __future__ import annotations

from jetnas.commands import recipe_command
from jetnas.runner.recipes import BlockSearchRecipe, ShapeSearchRecipe, TrainRecipe


@recipe_command(TrainRecipe)
def train(recipe: TrainRecipe) -> dict:
    """Train a hybrid: stage 1 (MLPs frozen, distillation from the teacher) or stage 2 (everything, LM loss)."""
    from jetnas.runner.models import check_layer_types, check_model_path, network_notice
    from jetnas.runner.training import run_training

    check_model_path(recipe.teacher, "--teacher")
    if recipe.model is not None:
        check_model_path(recipe.model)
    if recipe.model is None and recipe.layer_types:
        # the layer count from the teacher's config alone: a wrong count fails before its weights load
        check_layer_types(recipe.teacher, recipe.layer_types)
    else:
        network_notice(recipe.teacher, "teacher")
    return run_training(recipe).to_record()


@recipe_command(BlockSearchRecipe)
def search_blocks(recipe: BlockSearchRecipe) -> dict:
    """PostNAS step 2 (and 3): train each linear block in the fixed placement with one recipe, compare them."""
    from jetnas.runner.models import check_teacher
    from jetnas.runner.searches import run_blocks

    check_teacher(recipe.teacher)
    return run_blocks(recipe).to_record()


@recipe_command(ShapeSearchRecipe)
def search_hardware(recipe: ShapeSearchRecipe) -> dict:
    """PostNAS step 4: at a fixed state size, pick the block's (d_k, d_v, heads) by measured decode speed and accuracy."""
    from jetnas.runner.models import check_teacher
    from jetnas.runner.searches import run_hardware

    check_teacher(recipe.teacher)
    return run_hardware(recipe).to_record()
