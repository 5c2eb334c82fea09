"""`jetnas supernet` then `jetnas search placement`, end to end on CPU with a tiny teacher saved to disk."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jetnas.cli import main
from tests.utils import _CORPUS, tiny_tokenizer

L = 4


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_supernet_runs_of_one_seed_start_from_the_same_weights(teacher_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    text = tmp_path / "train.txt"
    text.write_text(_CORPUS * 6)
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 7 + ord(name))  # whatever the caller's RNG holds
        assert main(["supernet", "--teacher", str(teacher_dir), "--data", str(text), "--steps", "1", "--batch-size",
                     "2", "--seq-len", "16", "--heldout-tokens", "128", "--out-dir", str(tmp_path / name),
                     "--device", "cpu", "--seed", "3"]) == 0
        capsys.readouterr()
        runs.append(load_file(tmp_path / name / "linear.safetensors"))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


@pytest.mark.slow
def test_supernet_then_placement_search_from_the_cli(teacher_dir, tmp_path, capsys):
    text = tmp_path / "train.txt"
    text.write_text(_CORPUS * 6)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"Q{i}: which colour is the sky?", "choices": ["blue", "green"],
                                      "label": 0}) + "\n" for i in range(4)))
    run = tmp_path / "supernet"
    args = ["supernet", "--teacher", str(teacher_dir), "--data", str(text), "--steps", "8", "--batch-size", "4",
            "--seq-len", "32", "--heldout-tokens", "256", "--lr", "3e-3", "--swa-window", "8", "--out-dir", str(run),
            "--device", "cpu"]
    assert main(args) == 0
    summary = last_json(capsys)
    assert summary["out_dir"] == str(run) and summary["linear"] == "gla"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert (run / "supernet.json").exists() and (run / "linear.safetensors").exists() and (run / "heldout.bin").exists()

    # the same command again resumes from the final checkpoint: nothing left to train, same super-network
    assert main(args) == 0
    assert last_json(capsys)["steps"] == 8

    out = tmp_path / "search"
    assert main(["search", "placement", "--supernet", str(run), "--budget", "attn=1,swa=1",
                 "--tasks", f"lm,mc:{mc},retrieval", "--beam-width", "2", "--rows", "2", "--lm-tokens", "128",
                 "--retrieval-length", "128", "--batch-size", "2", "--out-dir", str(out), "--device", "cpu"]) == 0
    result = last_json(capsys)
    placement, layer_types = result["placement"], result["layer_types"].split(",")
    assert len(placement["attn"]) == 1 and len(placement["swa"]) == 1 and placement["attn"] != placement["swa"]
    assert len(layer_types) == L and layer_types.count("attn") == 1 and layer_types.count("swa") == 1
    best = json.loads((out / "placements.json").read_text())["ranked"][0]
    assert (best["attn"], best["swa"]) == (placement["attn"], placement["swa"])
    for name in ("heatmap.png", "comparison.md"):
        assert (out / name).stat().st_size > 0
