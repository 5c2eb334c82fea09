"""Every shipped recipe validates against the real stage commands, and the CPU quickstart runs end to end."""

import json
from pathlib import Path

import pytest

from jetnas.cli import main
from jetnas.pipeline import STAGES, load_recipe
from jetnas.train.mixture import parse_mixture

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


def test_check_flag_validates_without_running(capsys):
    assert main(["run", "quickstart", "--check", "--set", "stages.supernet.steps=2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["valid"] and result["stages"] == list(STAGES)
    assert main(["run", "quickstart", "--check", "--set", "stages.supernet.stepz=2"]) == 2
    assert "stages.supernet.stepz is not an argument" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_reuses_its_stages(teacher, tmp_path, capsys):
    out = tmp_path / "quickstart"
    assert main(["run", "quickstart", "--out-dir", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = Path(result["report"]).read_text()
    for title in ("placement search", "block selection", "hardware-aware", "Stage 1", "Stage 2", "Evaluation",
                  "Throughput"):
        assert title in report
    assert (out / "placement" / "heatmap.png").exists()
    model_dir = Path(result["model"])
    assert (model_dir / "config.json").exists()
    assert main(["generate", "--model", str(model_dir), "--prompt", "The sky is", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    # a second run reuses everything
    assert main(["run", "quickstart", "--out-dir", str(out)]) == 0
    assert "running" not in capsys.readouterr().err
