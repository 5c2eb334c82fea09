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


def test_prefill_chunk_bytes_by_hand():
    from jetnas.bench.costs import prefill_chunk_bytes

    # tiny_config, fp32 (4 bytes): D 32, I 64, vocab 97; attention: 4 heads x 8, 2 KV heads: q 32, k 16, v 16, o 32
    model = make_model(["attn", "swa"])
    C, B = 10, 3
    residual, mlp, head = 4 * 32 * C * 4, 3 * 64 * C * 4, 4 * 97
    attn = 2 * (32 + 16 + 16 + 32) * C * 4  # 192 elements per token, as many as the MLP's 3 x 64
    assert prefill_chunk_bytes(model, C, B) == B * (residual + max(mlp, attn) + head)
    # a chunk after cached keys: K and V repeated over the 4 query heads at the full key length (attn only)
    repeated = 2 * 4 * 8 * 40 * 4
    assert prefill_chunk_bytes(model, C, B, 40) == B * (residual + attn + repeated + head)
    # without flash kernels the scores and mask of one layer: 4 heads x C x 40 keys (attn; swa sees 3 x 5)
    scores = 4 * C * 40 * 4 + C * 40
    assert prefill_chunk_bytes(model, C, B, 40, flash=False) == B * (residual + attn + repeated + scores + head)
    # a linear block adds its chunk states (one recurrent state per 64 tokens) to its projections
    jet = make_model(["jet"])
    mixer = jet.model.layers[0].self_attn
    outs = sum(m.out_features for m in mixer.modules() if isinstance(m, torch.nn.Linear))
    want = 2 * outs * 128 * 4 + mixer.cache_bytes(1, dtype=torch.float32, state_dtype=torch.float32) * 2
    assert prefill_chunk_bytes(jet, 128) == residual // C * 128 + max(want, mlp // C * 128) + head
    with pytest.raises(ValueError, match=r"context_length \(5\) must be >= chunk_size \(10\)"):
        prefill_chunk_bytes(model, 10, 1, 5)


def test_auto_chunk_size_from_fake_free_memory():
    from jetnas.bench.costs import prefill_chunk_bytes

    model = make_model(["attn", "gdn", "swa"])
    T = 5000
    need = {c: prefill_chunk_bytes(model, c, 1, T, flash=False) for c in (T, 4096, 2048, 1024, 512)}
    # the whole prompt when it fits in 0.8 of the free memory
    assert measure.auto_chunk_size(model, T, free_bytes=int(need[T] / 0.8) + 1) == T
    # else the largest power of two below the prompt that fits
    assert measure.auto_chunk_size(model, T, free_bytes=int(need[4096] / 0.8) + 1) == 4096
    assert measure.auto_chunk_size(model, T, free_bytes=int(need[1024] / 0.8) + 1) == 1024
    # the cache still to be allocated is taken off first; a smaller fraction asks for more memory
    assert measure.auto_chunk_size(model, T, free_bytes=int(need[T] / 0.8) + 1, reserved_bytes=need[T] // 2) < T
    assert measure.auto_chunk_size(model, T, free_bytes=int(need[T] / 0.5) + 1, fraction=0.5) == T
    # more rows, smaller chunks; a prompt shorter than the minimum is one pass
    assert measure.auto_chunk_size(model, T, 4, free_bytes=int(need[4096] / 0.8) + 1) < 4096
    assert measure.auto_chunk_size(model, 300, free_bytes=1 << 30) == 300
    with pytest.raises(ValueError, match=r"not even a prefill chunk of 512 tokens fits: its activations need "
                                         rf"{need[512]} bytes"):
        measure.auto_chunk_size(model, T, free_bytes=need[512])
    with pytest.raises(ValueError, match="fraction must be in"):
        measure.auto_chunk_size(model, T, free_bytes=1 << 30, fraction=0)


def test_measurements_resolve_auto_chunks_and_record_the_prefill_mode(monkeypatch):
    model = make_model(["attn", "jet", "swa", "gdn"])
    # CPU: the forward prefill unless asked; "auto" reads the free memory (faked: room for 16-token chunks only)
    from jetnas.bench.costs import prefill_chunk_bytes

    one_row_cache = model.cache_bytes(40, dtype=torch.float32)  # reserved: allocated after the chunk is chosen
    free = int(prefill_chunk_bytes(model, 16, 1, 40, flash=False) / 0.8) + 1 + one_row_cache
    monkeypatch.setattr(measure, "free_memory", lambda device: free)
    monkeypatch.setattr(measure, "auto_chunk_size",
                        lambda *a, _f=measure.auto_chunk_size, **k: _f(*a, **{**k, "minimum": 8}))
    row = measure.replicated_decode_throughput(model, 2, 40, new_tokens=3, chunk_size="auto", prefill_repeats=1)
    assert (row["chunk_size"], row["chunk_rule"], row["prefill_mode"]) == (16, "auto", "forward")
    static = measure.replicated_decode_throughput(model, 2, 40, new_tokens=3, chunk_size=16, prefill="static",
                                                  prefill_repeats=1)
    assert static["prefill_mode"] == "static" and len(static["prefill_seconds_runs"]) == 2
    # on a GPU the captured prefill by default (bit-identical to the forward one on an H200), on CPU the forward one
    assert measure.prefill_mode("cuda") == "static" and measure.prefill_mode("cuda", "forward") == "forward"
    assert measure.prefill_mode("cpu") == "forward" and measure.prefill_mode(torch.device("cpu")) == "forward"
    row = measure.decode_throughput(model, 2, 24, new_tokens=3, chunk_size=8, prefill="static")
    assert row["prefill_mode"] == "static" and row["chunk_size"] == 8
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, None or 'auto', got 'big'"):
        measure.replicated_decode_throughput(model, 2, 40, chunk_size="big")
