"""PostNAS steps 2-4 as runs: block selection (`run_blocks`) and the hardware-aware shape search (`run_hardware`).

Each parses its candidates first (a misspelled block fails before anything loads), loads the teacher, placement
and tasks once (`CandidateRunner`), and hands the bookkeeping to `jetnas.nas.blocks` / `jetnas.nas.hardware` with
`CandidateRunner.run` as the function that runs one candidate.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jetnas.runner.candidates import CandidateRunner
from jetnas.runner.measures import measure_name, resolve_measure
from jetnas.runner.recipes import BlockSearchRecipe, ShapeSearchRecipe
from jetnas.runner.results import BlockSearchResult, ShapeSearchResult


def run_blocks(recipe: BlockSearchRecipe) -> BlockSearchResult:
    """PostNAS step 2 (and 3): every candidate block in the fixed placement with one recipe; writes `blocks.md`,
    `blocks.json`, `blocks.png` and `candidates/` under the recipe's out_dir."""
    from jetnas.nas.blocks import run_block_search
    from jetnas.nas.candidates import matched_shape, parse_candidates

    candidates = parse_candidates(recipe.blocks)  # bad names fail before anything loads
    if recipe.matched_shapes:
        candidates = [matched_shape(c) for c in candidates]
    measure = resolve_measure(recipe.measure, required=False)
    out = Path(recipe.out_dir or f"runs/blocks-{time.strftime('%Y%m%d-%H%M%S')}")
    runner = CandidateRunner(recipe, out, measure, measure_name(measure))
    print(f"jetnas: block selection, {len(candidates)} candidates ({', '.join(c.name for c in candidates)}), "
          f"placement attn {runner.placement.attn} swa {runner.placement.swa}, {recipe.steps} steps each",
          file=sys.stderr)
    summary = run_block_search(candidates, runner.run, runner.metrics, out, runner.recipe,
                               reference=runner.reference if recipe.teacher_reference else None,
                               context_length=recipe.decode_context)
    best = next(c for c in candidates if c.name == summary["best"])
    return BlockSearchResult(out_dir=str(out), teacher=runner.teacher.spec.name,
                             placement=runner.placement.describe(), **summary,
                             layer_types=",".join(runner.placement.layer_types(best.block_type)),
                             block_config=runner.block_config(best))


def run_hardware(recipe: ShapeSearchRecipe) -> ShapeSearchResult:
    """PostNAS step 4: the block's shapes at a fixed state size, each trained briefly, evaluated and measured;
    writes `hardware.md`, `hardware.json`, `hardware.png` and `candidates/` under the recipe's out_dir."""
    from jetnas.models.convert import hybrid_config
    from jetnas.models.layer_types import merge_block_configs, parse_block
    from jetnas.nas.hardware import run_hardware_search, shape_candidates, shape_from_kwargs, shape_name

    base = parse_block(recipe.block)
    measure = resolve_measure(recipe.measure, required=True)
    out = Path(recipe.out_dir or f"runs/hardware-{time.strftime('%Y%m%d-%H%M%S')}")
    runner = CandidateRunner(recipe, out, measure, measure_name(measure))
    types = runner.placement.layer_types(base.block_type)
    config = hybrid_config(runner.teacher.model.config, types, runner.block_config(base))
    original = shape_from_kwargs(base.block_type, config.block_kwargs(base.block_type), config.hidden_size)
    target = recipe.state_bytes // 4 if recipe.state_bytes is not None else original.state_numbers
    shapes = shape_candidates(original, target, recipe.heads, recipe.key_dims, recipe.max_candidates)
    print(f"jetnas: hardware search of {base.name}: original {shape_name(original)} ({original.state_numbers} state "
          f"numbers); {len(shapes)} shapes at {target}: {', '.join(map(shape_name, shapes))}", file=sys.stderr)
    summary = run_hardware_search(base, shapes, original, runner.run, runner.metrics, out,
                                  {**runner.recipe, "block": base.describe(), "state_numbers": target},
                                  recipe.tolerance, state_numbers=target, context_length=recipe.decode_context)
    return ShapeSearchResult(out_dir=str(out), teacher=runner.teacher.spec.name,
                             placement=runner.placement.describe(), block=base.name, **summary,
                             state_bytes=4 * target, layer_types=",".join(types),
                             block_config=merge_block_configs(runner.swa, {base.block_type: summary["options"]}))
