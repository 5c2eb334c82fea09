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
# runs the CLI in-process and reports its status and which heavy modules it imported; with JETNAS_TEST_NO_LM_EVAL
# set, lm-evaluation-harness is not importable (the README's install has none)
PROBE = ("import json, os, sys\n"
         "if os.environ.get('JETNAS_TEST_NO_LM_EVAL'):\n    sys.modules['lm_eval'] = None\n"
         "from jetnas.cli import main\nrc = main(sys.argv[1:])\n"
         "print(json.dumps({'rc': rc, 'heavy': [m for m in ('torch', 'transformers') if m in sys.modules]}))")


def run(*args: str, probe: bool = True, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_vars}
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
    (["eval", "--model", "runs/quickstart/stage9/model", "--tasks", "ppl:x.txt"], 2,
     "jetnas: error: --model 'runs/quickstart/stage9/model' does not exist"),
    (["generate", "--model", "./no-such-model", "--prompt", "hi"], 2,
     "jetnas: error: --model './no-such-model' does not exist"),
    (["generate", "--model", "smollm2-135m", "--prompt", "hi", "--tokenizer", "~/no/such/tokenizer"], 2,
     "jetnas: error: --tokenizer '~/no/such/tokenizer' does not exist"),
    (["bench", "--model", "runs/x/stage2/model", "--context", "256"], 2,
     "jetnas: error: --model 'runs/x/stage2/model' does not exist"),
    (["convert", "--teacher", "/no/teacher", "--layer-types", "jet*30", "--out", "x"], 2,
     "jetnas: error: --teacher '/no/teacher' does not exist"),
    (["train", "--stage", "2", "--model", "runs/q/stage1/model"], 2,
     "jetnas: error: --model 'runs/q/stage1/model' does not exist"),
    (["search", "placement", "--supernet", "runs/none/supernet"], 2, "--supernet 'runs/none/supernet' does not exist"),
], ids=["misspelled-recipe", "bad-recipe-value", "check", "bad-list-flag", "bad-choice", "bad-measure", "help",
        "eval-missing-model", "generate-missing-model", "missing-tokenizer", "bench-missing-model",
        "convert-missing-teacher", "train-missing-model", "missing-supernet"])
def test_answered_without_torch(args, rc, err):
    proc = run(*args)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": rc, "heavy": []}, proc.stderr
    assert err in proc.stderr


def test_harness_tasks_without_lm_eval_end_in_one_line_saying_how_to_install_it():
    proc = run("eval", "--model", "smollm2-135m", "--tasks", "hellaswag,retrieval:needle@256",
               JETNAS_TEST_NO_LM_EVAL="1")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 2, "heavy": []}, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "jetnas: error: hellaswag: lm-evaluation-harness task(s) (built-in tasks start with ppl:, mc:, cloze:, "
        "retrieval:), which need lm_eval: pip install 'jetnas[eval]'"]


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


def test_autotune_configs_is_a_global_option_that_limits_autotuning_before_the_command(monkeypatch, capsys):
    import jetnas.ops.autotune as autotune
    from jetnas.cli import main

    calls = []
    monkeypatch.setattr(autotune, "limit_autotuning", calls.append)
    assert main(["--autotune-configs", "3", "info"]) == 0
    assert calls == [3]
    assert main(["--autotune-configs", "0", "info"]) == 2
    assert "--autotune-configs=0 must be >= 1" in capsys.readouterr().err
