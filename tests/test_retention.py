"""A finished run keeps its models, not the optimizer state of its finished training stages; an unfinished stage
keeps its checkpoints (resume), and so does a stage another process is writing."""

from __future__ import annotations

import json
import os
from pathlib import Path

from jetnas.runner.retention import drop_finished_checkpoints


def stage(root: Path, name: str, finished: bool, steps=(3, 4)) -> dict:
    """A stage folder with checkpoints; a finished one has the output its later stages read."""
    folder = root / name
    for step in steps:
        ckpt = folder / "checkpoints" / f"step-{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "optimizer.safetensors").write_bytes(b"\0" * 1000)
    if finished and name == "supernet":
        (folder / "linear.safetensors").write_bytes(b"w")
        (folder / "supernet.json").write_text("{}")
    elif finished:
        (folder / "model").mkdir()
        (folder / "model" / "config.json").write_text("{}")
        (folder / "model" / "jetnas_stage.json").write_text("{}")
    return {"result": {"out_dir": str(folder)}}


def test_finished_stages_lose_their_checkpoints_and_unfinished_ones_keep_them(tmp_path):
    state = {"stages": {"supernet": stage(tmp_path, "supernet", True), "stage1": stage(tmp_path, "stage1", True),
                        # recorded, but its model directory is not there (a copy of a run's records): kept
                        "stage2": stage(tmp_path, "stage2", False)}}
    freed = drop_finished_checkpoints(state)
    assert freed == {"supernet": 2000, "stage1": 2000}
    assert not list((tmp_path / "supernet" / "checkpoints").iterdir())
    assert (tmp_path / "stage1" / "model" / "jetnas_stage.json").exists()
    assert len(list((tmp_path / "stage2" / "checkpoints").iterdir())) == 2
    # an interrupted stage has no record in pipeline.json at all: untouched
    stage(tmp_path, "elsewhere", True)
    assert drop_finished_checkpoints({"stages": {}}) == {}
    assert len(list((tmp_path / "elsewhere" / "checkpoints").iterdir())) == 2


def test_a_stage_another_process_is_writing_keeps_its_checkpoints(tmp_path, capsys):
    state = {"stages": {"stage1": stage(tmp_path, "stage1", True)}}
    # the run lock of a live process (pid 1 on this host) that is not this one
    import socket

    (tmp_path / "stage1" / "run.lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname(),
                                                              "since": "2026-12-06 04:41:03"}))
    assert os.path.exists("/proc/1")
    assert drop_finished_checkpoints(state) == {}
    assert len(list((tmp_path / "stage1" / "checkpoints").iterdir())) == 2
    assert "keeping the checkpoints" in capsys.readouterr().err
