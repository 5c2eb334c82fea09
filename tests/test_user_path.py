"""A user path that never guesses (issue 20): tokenizers are the model's own or given, never another model's; a
benchmark of random weights needs no tokenizer and no network; arguments are checked before weights load; `swa`
layers get a documented default window; an untrained hybrid says so; CPU threads are chosen by a stated rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jetnas.cli import main
from jetnas.models import JetNemotronForCausalLM
from jetnas.runner.models import untrained_hint
from jetnas.runner.threads import choose_threads
from tests.utils import save_tiny_llama, tiny_config, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny Llama teacher with the tiny tokenizer (4 layers, 2048 positions)."""
    return save_tiny_llama(tmp_path_factory.mktemp("user_path") / "teacher")


@pytest.fixture
def no_teacher_loads(monkeypatch):
    """Any load of a teacher's weights fails the test: what these checks must come before (and a tokenizer must
    never cost)."""
    from jetnas.models import teachers

    def refuse(*args, **kwargs):
        raise AssertionError(f"a teacher's weights were loaded: {args}")

    monkeypatch.setattr(teachers, "load_teacher", refuse)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("jetnas: error: "), err[-5:]
    return err[-1]


# ---------------------------------------------------------------------------------------------------------------
# tokenizers


def foreign_model(path: Path, vocab_size: int = 97) -> Path:
    """A jetnas model directory with its own vocabulary (not SmolLM2's 49,152) and no tokenizer."""
    torch.manual_seed(0)
    JetNemotronForCausalLM(tiny_config(["attn", "jet"], vocab_size=vocab_size)).save_pretrained(path)
    return path


def test_a_directory_with_a_foreign_vocabulary_and_no_tokenizer_is_refused(tmp_path, capsys, no_teacher_loads):
    model = foreign_model(tmp_path / "m")
    assert main(["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    line = error_line(capsys)
    assert "has no tokenizer" in line and "its vocabulary: 97 ids" in line and "pass --tokenizer" in line
    assert main(["eval", "--model", str(model), "--tasks", "retrieval:needle@64?n=1", "--out-dir",
                 str(tmp_path / "eval")]) == 2
    assert "pass --tokenizer" in error_line(capsys)  # jetnas eval takes --tokenizer too


def test_a_given_tokenizer_is_checked_against_the_vocabulary_and_used(tmp_path, capsys, no_teacher_loads):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    small = foreign_model(tmp_path / "small", vocab_size=97)
    assert main(["generate", "--model", str(small), "--prompt", "hi", "--tokenizer", str(tok_dir)]) == 2
    assert f"has {len(tiny_tokenizer())} tokens but {str(small)!r} embeds only 97" in error_line(capsys)
    fitting = foreign_model(tmp_path / "fits", vocab_size=len(tiny_tokenizer()))
    assert main(["generate", "--model", str(fitting), "--prompt", "the", "--tokenizer", str(tok_dir),
                 "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_tokens"] == 3


def test_a_misspelled_model_name_is_refused_with_the_known_names(capsys, no_teacher_loads):
    assert main(["bench", "--model", "jet-nemotron-2", "--context", "16"]) == 2
    assert "--model 'jet-nemotron-2' is no model directory, preset or teacher name; did you mean 'jet-nemotron-2b'?" \
        in error_line(capsys)


def test_a_preset_has_no_tokenizer_to_generate_with(capsys, no_teacher_loads):
    assert main(["generate", "--model", "jet-nemotron-2b", "--prompt", "hi"]) == 2
    assert "preset 'jet-nemotron-2b' has random weights and no tokenizer (its vocabulary: 151,936 ids)" in \
        error_line(capsys)


# ---------------------------------------------------------------------------------------------------------------
# offline benchmark of a preset

OFFLINE_PROBE = """
import json, socket, sys
attempts = []
real_connect = socket.socket.connect
def connect(self, address):
    attempts.append(str(address))
    raise OSError("networking is disabled in this test")
socket.socket.connect = connect
from jetnas.models.presets import PRESETS
# jet-nemotron-2b's layout in miniature: the same code path, seconds instead of minutes on a CPU
PRESETS["tiny-preset"] = dict(
    vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, tie_word_embeddings=True,
    block_types=["jet", "attn", "swa", "jet"],
    efficient_attention_config={"jet": {"num_heads": 2, "head_dim": 8, "expand_v": 2.0}, "swa": {"window_size": 8}})
from jetnas.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "attempts": attempts}))
"""


def test_a_preset_benchmarks_with_networking_disabled(tmp_path):
    dead = "http://127.0.0.1:9"  # the discard port: nothing answers
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HTTPS_PROXY": dead, "HTTP_PROXY": dead, "https_proxy": dead,
           "http_proxy": dead, "PIP_INDEX_URL": dead, "JETNAS_CACHE": str(tmp_path / "empty-cache"),
           "HF_HOME": str(tmp_path / "empty-hf")}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_PROBE, "bench", "--model", "tiny-preset", "--context", "16",
                           "--batch", "1", "--chunk", "8", "--new-tokens", "2", "--device", "cpu", "--out-dir",
                           str(tmp_path / "bench")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0 and result["attempts"] == [], proc.stderr[-2000:]
    assert "fetching" not in proc.stderr and "needs the network" not in proc.stderr
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"][0]["decode_tokens_per_s"] > 0
    assert not (tmp_path / "empty-cache").exists()  # nothing was fetched or cached


# ---------------------------------------------------------------------------------------------------------------
# arguments before weights; the swa default; the untrained hint


def test_a_wrong_layer_count_is_refused_before_the_teacher_loads(teacher_dir, tmp_path, capsys, no_teacher_loads,
                                                                  monkeypatch):
    assert main(["convert", "--teacher", str(teacher_dir), "--layer-types", "jet*3", "--out", str(tmp_path / "h")]) == 2
    assert "layer types 'jet*3' give 3 layers but the model has 4" in error_line(capsys)

    def no_training(recipe):
        raise AssertionError("training started")

    monkeypatch.setattr("jetnas.runner.training.run_training", no_training)
    assert main(["train", "--stage", "1", "--teacher", str(teacher_dir), "--layer-types", "attn,jet*4", "--out-dir",
                 str(tmp_path / "s1")]) == 2
    assert "give 5 layers but the model has 4" in error_line(capsys)


def test_convert_gives_swa_a_default_window_and_says_the_hybrid_is_untrained(teacher_dir, tmp_path, capsys):
    out = tmp_path / "hybrid"
    assert main(["convert", "--teacher", str(teacher_dir), "--layer-types", "attn,swa,jet,gdn", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    result_window = json.loads((out / "jetnas_conversion.json").read_text())["swa_window"]
    assert result_window == 512 and "swa layers get a window of 512 tokens (the default" in err
    hint = untrained_hint(str(out))
    assert hint is not None and hint in err and "2 linear layers (jet, gdn)" in hint
    assert f"jetnas train --stage 1 --model {out} --teacher {teacher_dir}" in hint
    assert main(["generate", "--model", str(out), "--prompt", "the", "--max-new-tokens", "2"]) == 0
    assert hint in capsys.readouterr().err
    # once a training stage has written the directory, the hint is gone; an all-attention conversion has none
    (out / "jetnas_stage.json").write_text("{}")
    assert untrained_hint(str(out)) is None
    assert main(["convert", "--teacher", str(teacher_dir), "--layer-types", "attn*4", "--out",
                 str(tmp_path / "a")]) == 0
    assert "hint" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# threads


@pytest.mark.parametrize("environ, cores, load, threads", [
    ({}, 2, 1.8, 1),       # the shared 2-core box with another job running
    ({}, 2, 0.1, 2),       # the same box idle
    ({}, 16, 3.2, 13),     # a GPU machine's host
    ({}, 2, 7.0, 1),       # overloaded: never fewer than one
    ({"OMP_NUM_THREADS": "3"}, 2, 0.0, 3),
    ({"JETNAS_THREADS": "2", "OMP_NUM_THREADS": "1"}, 2, 5.0, 2),
], ids=["busy", "idle", "gpu-host", "overloaded", "omp-env", "jetnas-env-wins"])
def test_thread_rule(environ, cores, load, threads):
    chosen, why = choose_threads(environ, cores, load)
    assert chosen == threads and why


def test_a_bad_thread_setting_is_refused():
    with pytest.raises(ValueError, match="JETNAS_THREADS='two' must be a positive integer"):
        choose_threads({"JETNAS_THREADS": "two"})


def test_info_reports_the_threads_and_why(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["threads"] == torch.get_num_threads() and info["threads_rule"]
