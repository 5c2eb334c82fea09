"""Cost accounting against hand-computed numbers, and `jetnas bench` on CPU with the transformers baseline."""

import json

import torch

from jetnas.bench.costs import decode_cost, flops_per_token, weight_bytes
from jetnas.cli import main
from jetnas.engine import Engine
from tests.engine.test_engine import make_model
from tests.utils import tiny_tokenizer


def test_costs_match_hand_computation_and_the_allocated_cache():
    model = make_model(["attn", "swa", "jet"])
    # tiny_config: 4 heads / 2 KV heads of dim 8, swa window 5; fp32
    T, B = 100, 3
    attn = 2 * T * 2 * 8 * 4
    swa = 2 * 4 * 2 * 8 * 4  # window - 1 = 4 tokens kept
    jet = model.model.layers[2].self_attn.cache_bytes(T, dtype=torch.float32)
    cost = decode_cost(model, B, T)
    assert cost.cache_bytes_per_sequence == attn + swa + jet
    assert cost.bytes_per_step == weight_bytes(model) + B * (attn + swa + jet)
    assert weight_bytes(model) == 4 * sum(p.numel() for p in model.parameters())
    assert cost.roofline_tokens_per_s(1e9) == B * 1e9 / cost.bytes_per_step
    # attention FLOPs grow with the context for attn, stop at the window for swa, none for the linear block
    grow = flops_per_token(model, 1000) - flops_per_token(model, 100)
    assert grow == 4 * 4 * 8 * 900
    # the engine allocates what the accounting says (attn at its max length, swa and jet as they are)
    engine = Engine(model)
    engine.generate(torch.randint(1, 97, (B, T - 4)), max_new_tokens=4)
    assert engine.cache.nbytes() == B * cost.cache_bytes_per_sequence


def test_bench_cli_on_cpu_with_the_hf_baseline(tmp_path, capsys):
    model = make_model(["attn", "jet", "swa", "gdn"], vocab_size=len(tiny_tokenizer()))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tmp_path / "m"), "--context", "32,64", "--batch", "2", "--chunk", "16",
                 "--new-tokens", "6", "--baseline", "hf", "--out-dir", str(out), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["summary"]["context_length"] == 64 and result["summary"]["batch_size"] == 2
    assert result["summary"]["decode_tokens_per_s"] > 0 and "speedup_decode_vs_hf" in result["summary"]
    saved = json.loads((out / "bench.json").read_text())
    systems = [r["system"] for r in saved["rows"]]
    assert systems == ["jetnas engine", "transformers generate"] * 2
    assert 0 < saved["rows"][0]["roofline_fraction"] and (out / "bench.png").stat().st_size > 0
    assert main(["bench", "--model", str(tmp_path / "m"), "--context", "32,x"]) == 2
    assert "--context must be comma-separated integers" in capsys.readouterr().err
