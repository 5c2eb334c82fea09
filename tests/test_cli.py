"""Fast errors: the `jetnas` command answers `--help`, a misspelled recipe and bad flag or recipe values without
importing torch or transformers (seconds of imports on the 2-core box), in a fresh interpreter as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# runs the CLI in-process and reports its status and which heavy modules it imported
PROBE = ("import json, sys\nfrom jetnas.cli import main\nrc = main(sys.argv[1:])\n"
         "print(json.dumps({'rc': rc, 'heavy': [m for m in ('torch', 'transformers') if m in sys.modules]}))")


def run(*args: str, probe: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", PROBE, *args] if probe else [sys.executable, *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("args, rc, err", [
    (["run", "quikstart"], 2, "jetnas: error: recipe 'quikstart' is neither a file nor a shipped recipe; did you mean "
                              "'quickstart'? shipped: jet-nemotron-2b, quickstart, smollm2-135m-gpu"),
    (["run", "quickstart", "--check", "--set", "stages.supernet.steps=ten"], 2,
     "stages.supernet.steps must be an integer, got 'ten'"),
    (["run", "quickstart", "--check"], 0, ""),
    (["bench", "--model", "m", "--context", "4096,lots"], 2, "--context must be comma-separated integers"),
    (["train", "--stage", "3"], 2, "jetnas: error: --stage must be one of 1, 2, got 3"),
    (["search", "hardware", "--teacher", "t", "--placement", "attn,jet", "--measure", "mod:fn"], 2,
     "--measure 'mod:fn' is not a known decode measurement"),
    (["--help"], 0, ""),
], ids=["misspelled-recipe", "bad-recipe-value", "check", "bad-list-flag", "bad-choice", "bad-measure", "help"])
def test_answered_without_torch(args, rc, err):
    proc = run(*args)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": rc, "heavy": []}, proc.stderr
    assert err in proc.stderr


def test_the_installed_entry_point_exits_with_the_status_and_imports_no_torch():
    # `python -m jetnas` as a user types it; -X importtime lists every module the command imported
    proc = run("-X", "importtime", "-m", "jetnas", "run", "quikstart", probe=False)
    assert proc.returncode == 2
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")]
    assert "jetnas.cli" in imported and "torch" not in imported and "transformers" not in imported


def test_importing_transformers_after_jetnas_registers_the_model_type():
    code = ("import jetnas, sys\nassert 'transformers' not in sys.modules\n"
            "from transformers import AutoConfig\nprint(type(AutoConfig.for_model('jet_nemotron')).__name__)")
    proc = run("-c", code, probe=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "JetNemotronConfig", proc.stderr
