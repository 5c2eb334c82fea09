"""The embedded teacher (SmolLM2-135M-Instruct, GGUF from PyPI) end to end: conversion exactness, the CLI."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from jetnas.cli import main
from jetnas.models.convert import convert_model

pytestmark = pytest.mark.slow


def test_teacher_is_smollm2(teacher):
    model, tokenizer, spec = teacher
    assert spec.name == "smollm2-135m" and model.config.num_hidden_layers == 30
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6


def test_all_attention_conversion_of_the_teacher(teacher):
    model, tokenizer, _ = teacher
    hybrid, _ = convert_model(model, ["attn"] * 30)
    ids = tokenizer("Jet-Nemotron is a hybrid language model that", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (hybrid(ids).logits - model(ids).logits).abs().max().item()
    print(f"smollm2-135m all-attn conversion: max |logit diff| = {diff:.3g} (fp32, CPU)")
    assert diff < 1e-4


def test_generate_cli_prints_sensible_text(teacher, capsys):
    assert main(["generate", "--model", "smollm2-135m", "--prompt", "The capital of France is",
                 "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["new_tokens"] == 8 and "Paris" in result["text"]


def test_convert_cli_then_generate_from_the_directory(teacher, tmp_path, capsys):
    out_dir = tmp_path / "hybrid"
    assert main(["convert", "--teacher", "smollm2-135m", "--layer-types", "jet*14,attn,jet*13,swa,attn",
                 "--block-config", '{"swa": {"window_size": 64}}', "--out", str(out_dir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["layers"] == {"jet": 27, "attn": 2, "swa": 1}
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.block_types[14] == "attn" and model.config.sliding_window == 64
    assert main(["generate", "--model", str(out_dir), "--prompt", "Hello", "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_tokens"] == 3
    # a second conversion into the same directory is refused rather than overwriting it
    assert main(["convert", "--teacher", "smollm2-135m", "--layer-types", "attn*30", "--out", str(out_dir)]) == 2


@pytest.mark.slow(seconds=42)
def test_a_truncated_teacher_cache_is_detected_and_rebuilt(teacher, tmp_path, monkeypatch, capsys):
    """The dequantised copy cut short (a full disk, a kill while copying a cache): detected by its manifest and
    rebuilt from the GGUF (~20-40 s), giving the same model."""
    from jetnas.models import teachers

    shared = teachers.cache_dir() / "teachers" / "smollm2-135m"
    monkeypatch.setenv("JETNAS_CACHE", str(tmp_path))
    local = tmp_path / "teachers" / "smollm2-135m"
    local.mkdir(parents=True)
    shutil.copyfile(shared / teachers.SMOLLM2_GGUF, local / teachers.SMOLLM2_GGUF)
    shutil.copytree(shared / "hf", local / "hf")
    weights = local / "hf" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    capsys.readouterr()
    model, _, _ = teachers.load_teacher("smollm2-135m")
    assert "is damaged or unverified (model.safetensors is truncated" in capsys.readouterr().err
    assert teachers.verify_manifest(local / "hf") is None
    reference = teacher[0]
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name
