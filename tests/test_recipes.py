"""Every shipped recipe validates against the real stage commands, and the CPU quickstart runs end to end."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jetnas.cli import main
from jetnas.pipeline import STAGES, load_recipe
from jetnas.train.mixture import parse_mixture

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((Path(__file__).resolve().parents[1] / "jetnas" / "configs").glob("*.yaml"))


def test_recipes_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"quickstart", "smollm2-135m-gpu", "jet-nemotron-2b"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_is_valid(path):
    # loading checks every stage argument against the signature of the command the stage calls
    recipe = load_recipe(path.stem)
    assert recipe.name == path.stem and Path(recipe.source) == path
    assert all(recipe.stages[s] is not None for s in ("stage1", "eval", "bench"))
    if isinstance(recipe.data, str) and "," in recipe.data:
        assert parse_mixture(recipe.data) is not None
    if recipe.stages["placement"] is None:
        # with the searches skipped, the recipe must say which layers to build
        assert recipe.stages["stage1"].get("layer_types")


def test_every_stage_option_is_a_recipe_option():
    """A StageConfig field missing from TrainRecipe cannot be set from a recipe or `jetnas train` (eval_batch_size
    was, until 2026-12-06); the one exception is save_model: a recipe's stage always saves the model the next reads."""
    import dataclasses

    from jetnas.runner.fields import check_value
    from jetnas.runner.recipes import TrainRecipe
    from jetnas.train.stages import StageConfig

    stage = {f.name for f in dataclasses.fields(StageConfig)}
    recipe = {f.name for f in dataclasses.fields(TrainRecipe)}
    assert stage - recipe == {"save_model"} and recipe <= stage
    assert check_value(TrainRecipe, "eval_batch_size", 0)[1] == "must be >= 1"
    assert check_value(TrainRecipe, "keep_checkpoints", 3) == (3, None)


def test_check_flag_validates_without_running(capsys):
    assert main(["run", "quickstart", "--check", "--set", "stages.supernet.steps=2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["valid"] and result["stages"] == list(STAGES)
    assert main(["run", "quickstart", "--check", "--set", "stages.supernet.stepz=2"]) == 2
    assert "stages.supernet.stepz is not an argument" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    ("stages.supernet.steps=ten", "stages.supernet.steps must be an integer, got 'ten'"),
    # 4.5 steps used to run 5
    ("stages.stage1.steps=4.5", "stages.stage1.steps must be an integer, got 4.5"),
    ("stages.bench.context=0", "stages.bench.context must be >= 1, got 0"),
    ("stages.hardware.tolerance=1.5", "stages.hardware.tolerance must be < 1, got 1.5"),
    ("stages.supernet.precision=fp8", "stages.supernet.precision must be one of auto, fp32, bf16, got 'fp8'"),
    ("stages.bench.batch=many", "stages.bench: --batch must be a positive integer or auto, got 'many'"),
    # a recipe names its decode measurement; it cannot make jetnas import a module
    ("stages.blocks.measure=os:system", "stages.blocks: --measure 'os:system' is not a known decode measurement"),
    ("stages.hardware.measure=none", "stages.hardware: the hardware search chooses by measured decode throughput"),
    # answer weights need recall documents: refused at --check, not at stage 1's start after the searches
    ("stages.stage1.answer_weight=4", "stages.stage1.answer_weight=4 weights the answer tokens of recall documents, "
                                      "but data has no recall section"),
], ids=["word", "fraction", "range", "open-range", "choice", "cross-field", "import-path", "none-required",
        "answer-weight-without-recall"])
def test_check_refuses_a_bad_value_in_one_line_naming_file_stage_key_and_value(setting, message, capsys):
    assert main(["run", "quickstart", "--check", "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jetnas: error: ") and "quickstart.yaml: " in err[0], err
    assert message in err[0]


def disk_bytes(root: Path) -> int:
    """Bytes a directory tree occupies on disk (allocated blocks, as `du` counts them)."""
    return sum(f.stat().st_blocks * 512 for f in root.rglob("*") if f.is_file() and not f.is_symlink())


def run_measured(args: list[str], cwd: Path) -> tuple[int, float, int]:
    """Run `python -m jetnas ARGS` as a user would; returns its exit status, wall seconds and peak resident memory in
    bytes (that process's own `ru_maxrss`, from `wait4`)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jetnas", *args], cwd=cwd, env=env, stdout=subprocess.PIPE)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    sys.stdout.write(stdout.decode()[-2000:])
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024


@pytest.mark.slow(seconds=430)
def test_quickstart_runs_end_to_end_and_reuses_its_stages(teacher, tmp_path, capsys, record_property):
    out = tmp_path / "quickstart"
    # the README states these figures: measured here, in the run CI makes, and printed at the end of the run by
    # tests/conftest.py (an xdist worker's own output is not shown); the teacher and its 8K tokens of training text
    # come from the cache when an earlier run made them
    rc, seconds, peak = run_measured(["run", "quickstart", "--out-dir", str(out)], tmp_path)
    disk = disk_bytes(out)
    record_property("figures", f"quickstart: {seconds:.0f} s wall, peak memory {peak / 1e9:.2f} GB, {disk / 1e9:.2f} "
                               f"GB on disk ({os.cpu_count()} CPUs, 1-minute load {os.getloadavg()[0]:.1f}, "
                               f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # no optimizer state is left behind by finished stages: the run keeps its models and records
    assert set(result["checkpoints_deleted_bytes"]) == {"supernet", "stage1", "stage2"}
    assert not list(out.glob("*/checkpoints/step-*")) and disk < 2.5e9
    report = Path(result["report"]).read_text()
    assert "A smoke test, not a result." in report.splitlines()[2]
    for title in ("placement search", "block selection", "step 3: JetBlock design ablation", "hardware-aware",
                  "Stage 1", "Stage 2", "Evaluation", "Throughput"):
        assert title in report
    assert (out / "placement" / "heatmap.png").exists()
    model_dir = Path(result["model"])
    assert (model_dir / "config.json").exists()
    assert main(["generate", "--model", str(model_dir), "--prompt", "The sky is", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    # a second run reuses everything
    assert main(["run", "quickstart", "--out-dir", str(out)]) == 0
    assert "running" not in capsys.readouterr().err


def test_the_supernet_recipe_window_is_the_library_default():
    # the recipe spells it out (reading a recipe imports no torch); `jetnas convert` without a window uses the same
    from jetnas.models.layer_types import DEFAULT_SWA_WINDOW
    from jetnas.runner.recipes import SupernetRecipe

    assert SupernetRecipe.__dataclass_fields__["swa_window"].default == DEFAULT_SWA_WINDOW
