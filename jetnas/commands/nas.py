"""`jetnas supernet` and `jetnas search placement`: PostNAS step 1 from the command line."""

from __future__ import annotations

from jetnas.commands import recipe_command
from jetnas.runner.recipes import PlacementRecipe, SupernetRecipe


@recipe_command(SupernetRecipe)
def supernet(recipe: SupernetRecipe) -> dict:
    """Train a PostNAS super-network: the teacher plus a linear path per layer, distilled on sampled sub-networks."""
    from jetnas.runner.models import check_teacher
    from jetnas.runner.supernet import run_supernet

    check_teacher(recipe.teacher)
    return run_supernet(recipe).to_record()


@recipe_command(PlacementRecipe)
def search_placement(recipe: PlacementRecipe) -> dict:
    """Search which layers stay full / sliding-window attention, on a trained super-network."""
    from pathlib import Path

    from jetnas.runner.supernet import run_placement

    if not Path(recipe.supernet).expanduser().is_dir():
        raise FileNotFoundError(f"--supernet {recipe.supernet!r} does not exist (a directory `jetnas supernet` wrote)")
    return run_placement(recipe).to_record()
