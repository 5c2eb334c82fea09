"""`jetnas run RECIPE`: the whole pipeline from a teacher to a trained, evaluated and benchmarked hybrid."""

from __future__ import annotations

import sys


def run(recipe: str, /, set: tuple[str, ...] | None = None, redo: list[str] | None = None,
        out_dir: str | None = None, device: str | None = None, check: bool = False, report_only: bool = False,
        keep_checkpoints: bool = False) -> dict:
    """Run a recipe: super-network, placement, blocks, hardware, stage 1, stage 2, evaluation, throughput, report.

    Args:
        recipe: a YAML recipe, or the name of a shipped one: quickstart (CPU, minutes), smollm2-135m-gpu,
            jet-nemotron-2b.
        set: override one recipe key, e.g. --set stages.supernet.steps=10 (the value is parsed as YAML).
        redo: stages to rerun even if finished (everything after them reruns too).
        out_dir: where everything goes (default: the recipe's out_dir, else runs/<name>).
        device: cpu, cuda, ...; default: the recipe's, else cuda when available.
        check: validate the recipe and print the stages it would run, without running them.
        report_only: write report.md / report.json again from the run directory's pipeline.json and run nothing
            (a run directory copied from another machine: its recorded paths are found under out_dir).
        keep_checkpoints: keep the optimizer checkpoints of finished training stages (by default each is deleted
            as soon as its stage has finished and written its model, which is what later stages read; an unfinished
            stage always keeps its own, to resume).
    """
    from jetnas.pipeline import Pipeline, load_recipe
    from jetnas.runner.models import network_notice
    from jetnas.runner.retention import drop_finished_checkpoints

    if report_only and (redo or check):
        given = "--redo " + ",".join(redo) if redo else "--check"
        raise ValueError(f"--report-only runs nothing, so {given} cannot apply: drop one of them")
    overrides = list(set or [])
    if out_dir:
        overrides.append(f"out_dir={out_dir}")
    if device:
        overrides.append(f"device={device}")
    parsed = load_recipe(recipe, overrides)
    if check:
        stages = {s: ("skip" if a is None else a) for s, a in parsed.stages.items()}
        for stage, args in stages.items():
            print(f"{stage:10s} {args}", file=sys.stderr)
        if parsed.compare_placements:
            print(f"{'compare':10s} {parsed.compare_placements}", file=sys.stderr)
        return {"recipe": parsed.name, "source": parsed.source, "out_dir": str(parsed.out_dir), "valid": True,
                "stages": [s for s, a in parsed.stages.items() if a is not None],
                **({"compare_placements": parsed.compare_placements} if parsed.compare_placements else {})}
    if report_only:
        return Pipeline(parsed).write_report()
    network_notice(parsed.teacher, "teacher")
    pipeline = Pipeline(parsed, redo=tuple(redo or ()), keep_checkpoints=keep_checkpoints)
    result = pipeline.run()
    if not keep_checkpoints:
        # and those of stages finished by an earlier run that kept them
        freed = {**pipeline.checkpoints_deleted, **drop_finished_checkpoints(pipeline.state)}
        result["checkpoints_deleted_bytes"] = freed
    return result
