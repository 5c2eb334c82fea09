"""What a finished run keeps on disk: the optimizer checkpoints of its finished training stages go.

A training stage's checkpoints (`checkpoints/step-*`: trainable weights, AdamW's two moments, RNG states) exist to
resume the stage if it is interrupted; once the stage has finished and written what later stages read (its model
directory; for the super-network, `linear.safetensors` and `supernet.json`), they only take disk: the CPU quickstart
left 6.0 of its 7.5 GB in them, 3.7 GB for a 2-step stage 2. `drop_finished_checkpoints` deletes them for the stages
a pipeline run recorded as finished, holding each stage folder's run lock (a stage being written by another process
is left alone) and renaming each checkpoint `*.deleting` first, as the trainer's own rotation does, so a kill midway
leaves nothing that looks like a checkpoint. Unfinished stages keep theirs: resuming them is what checkpoints are for.

Without its checkpoints a finished stage that is run again starts from step 0 (the trainer finds nothing to resume),
which is what `--redo STAGE` asks for; a stage rerun with other arguments no longer meets the old run's checkpoints
(which the trainer refuses to resume with other arguments), and moves the old run aside instead.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from pathlib import Path

#: pipeline stages that train with checkpoints, and the files whose presence says the stage's output is complete
TRAINING_OUTPUTS = {
    "supernet": ("linear.safetensors", "supernet.json"),
    "stage1": ("model/config.json", "model/jetnas_stage.json"),
    "stage2": ("model/config.json", "model/jetnas_stage.json"),
}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def drop_checkpoints(stage_dir: str | Path, outputs: tuple[str, ...]) -> int:
    """Delete the `checkpoints/step-*` directories of the finished training run in `stage_dir` once every file of
    `outputs` exists there; returns the bytes freed (0 when its output is incomplete, or another process holds its
    run lock)."""
    from jetnas.train.checkpoint import RunLockedError, acquire_run_lock, checkpoint_dirs, release_run_lock

    stage_dir = Path(stage_dir)
    steps = checkpoint_dirs(stage_dir)
    if not steps or not all((stage_dir / name).exists() for name in outputs):
        return 0
    try:
        acquire_run_lock(stage_dir)
    except RunLockedError as err:
        print(f"jetnas: keeping the checkpoints of {stage_dir}: {err}", file=sys.stderr)
        return 0
    freed = 0
    try:
        for step in steps:
            freed += _size(step)
            doomed = step.with_name(f"{step.name}.{uuid.uuid4().hex[:8]}.deleting")
            step.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    finally:
        release_run_lock(stage_dir)
    return freed


def drop_finished_checkpoints(state: dict) -> dict[str, int]:
    """For each training stage that `state` (a run's pipeline.json) records as finished, `drop_checkpoints` in its
    folder; returns the bytes freed per stage (stages with nothing to free left out)."""
    freed = {}
    for stage, outputs in TRAINING_OUTPUTS.items():
        record = (state.get("stages") or {}).get(stage)
        folder = (record or {}).get("result", {}).get("out_dir")
        if folder:
            n = drop_checkpoints(folder, outputs)
            if n:
                freed[stage] = n
    return freed
