"""Cost accounting against hand-computed numbers, the batch rule on fake free-memory numbers, and `jetnas bench` on
CPU (replicated-prompt protocol) with the transformers baseline."""

import json

import pytest
import torch

from jetnas.bench import measure
from jetnas.bench.costs import decode_cost, flops_per_token, weight_bytes
from jetnas.bench.measure import largest_batch
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
    # a step also writes: the linear block's whole state, one token's KV in each attention layer
    kv_token = 2 * 2 * 8 * 4
    assert cost.bytes_written_per_sequence == 2 * kv_token + jet
    assert cost.bytes_moved_per_step == cost.bytes_per_step + B * (2 * kv_token + jet)
    assert cost.roofline_rw_tokens_per_s(1e9) == B * 1e9 / cost.bytes_moved_per_step
    # attention FLOPs grow with the context for attn, stop at the window for swa, none for the linear block
    grow = flops_per_token(model, 1000) - flops_per_token(model, 100)
    assert grow == 4 * 4 * 8 * 900
    # the engine allocates what the accounting says (attn at its max length, swa and jet as they are)
    engine = Engine(model)
    engine.generate(torch.randint(1, 97, (B, T - 4)), max_new_tokens=4)
    # ... except that the engine's sliding-window ring has a slot for the step's own token (window, not window - 1)
    ring_slot = 2 * 2 * 8 * 4
    assert engine.cache.nbytes() == B * (cost.cache_bytes_per_sequence + ring_slot)


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
    # counting the step's writes (two linear states here) tightens the bound: a larger share of a lower roofline
    row = saved["rows"][0]
    assert row["roofline_rw_tokens_per_s"] < row["roofline_tokens_per_s"]
    assert row["roofline_rw_fraction"] == pytest.approx(row["decode_tokens_per_s"] / row["roofline_rw_tokens_per_s"])
    assert main(["bench", "--model", str(tmp_path / "m"), "--context", "32,x"]) == 2
    assert "--context must be comma-separated integers" in capsys.readouterr().err
    assert saved["protocol"] == "replicated-prompt"
    assert [r["protocol"] for r in saved["rows"]] == ["replicated-prompt", "generate"] * 2


def _per_row(model, context, new_tokens):
    """What `largest_batch` charges one row, spelled out: the cache at context + new tokens and 4 bytes per logit."""
    return model.cache_bytes(context + new_tokens, dtype=torch.float32) + 4 * model.config.vocab_size


def test_largest_batch_from_fake_free_memory():
    model = make_model(["attn", "swa", "jet"])
    per_row = _per_row(model, 100, 4)
    # 0.85 * free / per_row = 20.5 rows: 20 fit, rounded down to 16
    assert largest_batch(model, 100, 4, free_bytes=int(20.5 * per_row / 0.85)) == 16
    # below 8 rows no rounding: 5.5 -> 5, and exactly one row's worth -> 1
    assert largest_batch(model, 100, 4, free_bytes=int(5.5 * per_row / 0.85)) == 5
    assert largest_batch(model, 100, 4, free_bytes=int(per_row / 0.85) + 1) == 1
    # capped: the default cap and a smaller one
    assert largest_batch(model, 100, 4, free_bytes=1 << 40) == 1024
    assert largest_batch(model, 100, 4, cap=5, free_bytes=1 << 40) == 5
    assert largest_batch(model, 100, 4, fraction=0.5, free_bytes=int(20.5 * per_row / 0.5)) == 16
    # the attention layer's cache grows with the context, so the batch never grows with it
    free = 300 * per_row
    batches = [largest_batch(model, c, 4, free_bytes=free) for c in (1, 63, 100, 1000, 10_000)]
    assert batches == sorted(batches, reverse=True) and batches[0] > batches[-1] >= 1
    assert all(b % 8 == 0 for b in batches if b >= 8)


def test_largest_batch_reads_free_memory_and_refuses_what_cannot_fit(monkeypatch):
    model = make_model(["attn", "gdn"])
    per_row = _per_row(model, 63, 2)
    # CUDA: mem_get_info's free bytes (faked, so no GPU is needed)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(40.5 * per_row / 0.85), 1 << 40))
    assert largest_batch(model, 63, 2, torch.device("cuda")) == 40
    # CPU: the available system memory, whatever it is here
    assert measure.free_memory("cpu") is None or measure.free_memory("cpu") > 0
    with pytest.raises(ValueError, match=f"one row needs {per_row} bytes.* free {per_row} bytes"):
        largest_batch(model, 63, 2, free_bytes=per_row)
    monkeypatch.setattr(measure, "free_memory", lambda device: None)
    with pytest.raises(ValueError, match="free memory of device cpu is unknown"):
        largest_batch(model, 63, 2)
    with pytest.raises(ValueError, match="cap must be >= 1, got 0"):
        largest_batch(model, 63, 2, cap=0, free_bytes=1 << 30)


def test_bench_cli_auto_batch_uses_the_replicated_protocol_and_halves_on_oom(tmp_path, capsys, monkeypatch):
    model = make_model(["attn", "jet"], vocab_size=len(tiny_tokenizer()))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    # free memory for 9.5 rows at context 24 + 3 new tokens: the rule predicts 8; batches above 2 "run out of memory"
    free = int(9.5 * _per_row(model, 24, 3) / 0.85)
    monkeypatch.setattr(measure, "free_memory", lambda device: free)
    real, tried = measure.replicated_decode_throughput, []

    def replicated(net, batch_size, *args, **kwargs):
        tried.append(batch_size)
        if batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(net, batch_size, *args, **kwargs)

    def every_row_prefill(*args, **kwargs):
        raise AssertionError("jetnas bench must not prefill every row")

    monkeypatch.setattr(measure, "replicated_decode_throughput", replicated)
    monkeypatch.setattr(measure, "decode_throughput", every_row_prefill)
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tmp_path / "m"), "--context", "24", "--new-tokens", "3", "--chunk", "8",
                 "--out-dir", str(out), "--device", "cpu"]) == 0
    assert tried == [8, 4, 2]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
    assert summary["protocol"] == "replicated-prompt" and summary["batch_size"] == 2
    assert summary["batch_predicted"] == 8 and summary["batch_halved"] == 2
    row = json.loads((out / "bench.json").read_text())["rows"][0]
    assert row["batch_size"] == 2 and row["prefill_batch_size"] == 1 and row["new_tokens"] == 3
    # prefill tokens/s is the one prompt's; decode counts every row's tokens after the first
    assert row["prefill_tokens_per_s"] == pytest.approx(24 / row["prefill_seconds"])
    # the median of three timed passes (two before the decoding run, one inside it)
    runs = row["prefill_seconds_runs"]
    assert len(runs) == 3 and row["prefill_seconds"] == sorted(runs)[1]
    assert row["decode_tokens_per_s"] == pytest.approx(2 * 2 / row["decode_seconds"])
    # an explicit batch that runs out of memory is not halved: the error reaches the caller
    with pytest.raises(torch.OutOfMemoryError):
        main(["bench", "--model", str(tmp_path / "m"), "--context", "24", "--batch", "4", "--new-tokens", "3",
              "--out-dir", str(out), "--device", "cpu"])
