"""The embedded teacher (SmolLM2-135M-Instruct, GGUF from PyPI) end to end: conversion exactness, the CLI."""

import json

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
