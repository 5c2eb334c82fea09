"""dev/placements_table.py: the placement comparison assembled from separate runs (issue 19, item 3)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("placements_table", ROOT / "dev" / "placements_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(folder: Path, types: list[str], piqa: float, teacher: float | None = None) -> Path:
    (folder / "stage1").mkdir(parents=True)
    (folder / "stage1" / "stage_config.json").write_text(json.dumps({"layer_types": types}))
    for who, acc in (("eval", piqa), ("eval_teacher", teacher)):
        if acc is not None:
            (folder / who).mkdir()
            (folder / who / "eval.json").write_text(json.dumps({"tasks": {"mc:b/piqa_val.jsonl": {"acc": acc}}}))
    return folder


def test_the_table_from_separate_runs(tmp_path, capsys):
    script = load_script()
    a = fake_run(tmp_path / "a", ["gdn", "attn", "swa", "gdn"], 0.7, teacher=0.8)
    b = fake_run(tmp_path / "b", ["attn", "gdn", "gdn", "swa"], 0.6)
    rows = script.main([f"searched={a}", f"uniform={b}", "--out", str(tmp_path / "out")])
    assert (rows["searched"]["attn"], rows["searched"]["swa"], rows["uniform"]["attn"]) == ([1], [2], [0])
    printed = capsys.readouterr().out
    assert "| searched | 1 | 2 | 70.0 (67%) |  |" in printed and "| uniform | 0 | 3 | 60.0 (33%) |  |" in printed
    assert "| teacher |  |  | 80.0 |  |" in printed
    assert json.loads((tmp_path / "out" / "placements.json").read_text())["teacher"]["results"]
    # runs that evaluated other tasks are not comparable
    c = fake_run(tmp_path / "c", ["attn", "gdn", "gdn", "swa"], 0.6)
    (c / "eval" / "eval.json").write_text(json.dumps({"tasks": {"mc:b/arc_easy_test.jsonl": {"acc": 0.5}}}))
    with pytest.raises(SystemExit, match="different tasks"):
        script.main([f"searched={a}", f"other={c}"])
    with pytest.raises(SystemExit, match="NAME=RUN_FOLDER"):
        script.main([str(a)])
