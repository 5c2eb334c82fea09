"""The throughput benchmark of issue 7 on one GPU: Jet-Nemotron-2B/4B architectures in the jetnas engine against
Qwen3-1.7B (transformers generate() and the jetnas engine), bf16, random weights, with correctness checks first.

    python benchmarks/engine_h100.py --out $OUT/engine.json

Protocol (all in one process, one GPU):
- decode: `batch` sequences at `context` tokens each, 32 greedy steps of the captured decode graph, timed between
  synchronisations. The cache of one prefilled prompt is copied into every row (`Engine.generate_replicated`): a
  decode step reads all rows' caches whatever they hold, so this costs what `batch` different prompts cost, without
  prefilling them all. For the engine's Qwen3 baseline the cache is filled with random values instead (its prefill
  at 256K would take minutes; decode cost does not depend on the values). The batch is the largest whose cache fits
  in 85% of the free memory (capped at 1024).
- prefill: one prompt of `context` tokens through the model's chunked forward (warm-up run first), tokens/s.
- transformers baseline: Qwen3ForCausalLM with its DynamicCache and generate(), real prefill of every row, timed
  inside one call by a logits-processor clock; batch = what 70% of the free memory holds of its cache (capped at
  64), halved until the run does not run out of memory.
- roofline: (weight bytes + batch * cache bytes per sequence) / measured copy bandwidth (decoding is memory-bound).
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback

import torch
from gpu_generate_check import hybrid, rel  # benchmarks/, the script's directory, is on sys.path

import jetnas
from jetnas.bench import measure
from jetnas.bench.costs import copy_bandwidth, decode_cost
from jetnas.bench.measure import hf_generate_throughput
from jetnas.engine import Engine, as_jetnas
from jetnas.engine.cache import StaticKV, WindowKV
from jetnas.models import JetNemotronForCausalLM
from jetnas.models.presets import preset_config
from jetnas.ops.decode import decode_attention, gated_delta_rule_step_, naive_decode_attention
from jetnas.ops.delta_rule import gated_delta_rule_step

DEV = torch.device("cuda")
NEW = 33  # the first new token comes from the prefill: 32 decode steps
RESULT: dict = {"sections": {}}


def save(path):
    with open(path, "w") as f:
        json.dump(RESULT, f, indent=1)


def qwen3_hf():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144 + 64,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
                      rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(DEV):
        return Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()


def preset(name):
    torch.manual_seed(0)
    with torch.device(DEV):
        return JetNemotronForCausalLM(preset_config(name, max_position_embeddings=262144 + 64)).to(torch.bfloat16).eval()


def largest_batch(model, context, cap):
    # the one batch rule of jetnas bench and this script (85% of free memory over cache + logits per row)
    return measure.largest_batch(model, context, NEW, DEV, cap=cap)


# -- correctness ------------------------------------------------------------------------------------------------

def check_kernels():
    out = {}
    torch.manual_seed(0)
    B, H, Hkv, D, R = 4, 12, 2, 128, 70_000
    q = torch.randn(B, H, D, device=DEV, dtype=torch.bfloat16)
    kc = torch.randn(B, Hkv, R, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn(B, Hkv, R, D, device=DEV, dtype=torch.bfloat16)
    lo = torch.tensor([0, 5, 1000, 0], device=DEV, dtype=torch.int32)
    hi = torch.tensor([R, 65_536, 1001 + 1152, 17], device=DEV, dtype=torch.int32)
    want = naive_decode_attention(q.float(), kc.float(), vc.float(), lo, hi)
    out["decode_attention_full"] = rel(decode_attention(q, kc, vc, lo, hi, ring=False, backend="triton"), want)
    W = 1152
    ring_k, ring_v = kc[:, :, :W].contiguous(), vc[:, :, :W].contiguous()
    hi2 = torch.tensor([W + 77, 5000, W, 3], device=DEV, dtype=torch.int32)
    lo2 = torch.clamp(hi2 - W, min=0)
    want = naive_decode_attention(q.float(), ring_k.float(), ring_v.float(), lo2, hi2)
    out["decode_attention_ring"] = rel(decode_attention(q, ring_k, ring_v, lo2, hi2, backend="triton"), want)
    Bs, K, V = 64, 96, 256
    qs, ks = torch.randn(Bs, H, K, device=DEV, dtype=torch.bfloat16), torch.randn(Bs, H, K, device=DEV, dtype=torch.bfloat16)
    vs = torch.randn(Bs, H, V, device=DEV, dtype=torch.bfloat16)
    g, beta = -torch.rand(Bs, H, device=DEV), torch.rand(Bs, H, device=DEV)
    S = torch.randn(Bs, H, K, V, device=DEV)
    o_ref, S_ref = gated_delta_rule_step(qs.float(), ks.float(), vs.float(), g, beta, S.clone(), use_qk_l2norm=True)
    o = gated_delta_rule_step_(qs, ks, vs, g, beta, S, backend="triton")
    out["delta_rule_step_out"] = rel(o, o_ref)
    out["delta_rule_step_state"] = rel(S, S_ref)
    out["tolerance"] = "bf16 inputs, fp32 accumulation on both sides: 1e-2 (attention probabilities enter the p.v dot in bf16)"
    out["pass"] = all(v < 1e-2 for k, v in out.items() if isinstance(v, float))
    return out


def check_engine():
    """Graph-captured decoding against transformers generate() (fp32, every block type, left padding) and bf16
    logits of the captured step against the model's own forward decoding at 2B shapes."""
    out = {}
    for label, types in (("all_types", ["attn", "swa", "jet", "gdn", "deltanet", "gla", "retnet", "mamba2"]),
                         ("jet_hybrid", ["attn", "swa", "jet", "jet"])):
        try:
            out[label] = _parity(types)
        except Exception as err:
            out[label] = {"error": repr(err)}
    # bf16 at 2B shapes (4 layers: attn, swa, jet, jet): captured step logits vs forward decoding
    cfg2 = preset_config("jet-nemotron-2b", num_hidden_layers=4, block_types=["attn", "swa", "jet", "jet"])
    torch.manual_seed(0)
    with torch.device(DEV):
        m2 = JetNemotronForCausalLM(cfg2).to(torch.bfloat16).eval()
    ids = torch.randint(1, 151936, (8, 1500), device=DEV)
    ref = Engine(m2, decode="forward").generate(ids, max_new_tokens=16).sequences
    fast = Engine(m2).generate(ids, max_new_tokens=16).sequences
    agree = (ref[:, 1500:] == fast[:, 1500:]).float().mean().item()
    out["bf16_2b_shapes_token_agreement"] = agree
    out["pass"] = all(v.get("fp32_tokens_equal_generate") for v in (out["all_types"], out["jet_hybrid"])) and agree >= 0.9
    return out


def _parity(types):
    model = hybrid(torch.float32, types, DEV)
    ids = torch.randint(1, 1000, (4, 40), device=DEV)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[3, :30] = 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    got = Engine(model).generate(ids, mask, max_new_tokens=24).sequences
    equal = bool(torch.equal(got, want))
    return {"fp32_tokens_equal_generate": equal,
            "first_mismatch_column": None if equal else int((got != want).any(0).nonzero()[0])}


# -- throughput -------------------------------------------------------------------------------------------------

@torch.inference_mode()
def engine_point(model, name, context, bandwidth, fill="prefill", chunk=8192, cap=1024, batch=None):
    engine = Engine(model, chunk_size=min(chunk, context))
    b = batch or largest_batch(model, context, cap)
    row = {"system": f"jetnas engine: {name}", "context_length": context, "batch_size": b, "chunk_size": engine.chunk_size}
    prompt = torch.randint(1, model.config.vocab_size, (1, context), device=DEV)
    if fill == "prefill":
        engine.generate_replicated(prompt[:, :2 * engine.chunk_size], 1, max_new_tokens=2)  # compile / autotune
        torch.cuda.synchronize()
        out = engine.generate_replicated(prompt, b, max_new_tokens=NEW)
        row["prefill_tokens_per_s"] = context / out.prefill_seconds
        row["prefill_seconds"] = out.prefill_seconds
        decode_s, steps = out.decode_seconds, out.new_tokens - 1
    else:  # random cache contents: time the captured steps only
        cache = engine.cache_for(b, context + NEW)
        decoder = engine.decoder_for(cache)
        for layer in cache.layers:
            if isinstance(layer, (StaticKV, WindowKV)):
                layer.keys.normal_()
                layer.values.normal_()
                layer.seq_length = context
        cache.jetnas_seen_tokens = context
        decoder.begin(torch.ones(b, context, dtype=torch.long, device=DEV))
        token = torch.zeros(b, dtype=torch.long, device=DEV)
        decoder.step(token)
        torch.cuda.synchronize()
        start = time.perf_counter()
        steps = NEW - 2
        for _ in range(steps):
            token = decoder.step(token).argmax(-1)
        torch.cuda.synchronize()
        decode_s = time.perf_counter() - start
    row["decode_tokens_per_s"] = b * steps / decode_s
    row["step_ms"] = 1e3 * decode_s / steps
    cost = decode_cost(model, b, context + NEW // 2, cache_dtype=torch.bfloat16)
    row["cache_bytes_per_sequence"] = cost.cache_bytes_per_sequence
    row["weight_bytes"] = cost.weight_bytes
    row["bytes_per_step"] = cost.bytes_per_step
    row["roofline_tokens_per_s"] = cost.roofline_tokens_per_s(bandwidth)
    row["roofline_fraction"] = row["decode_tokens_per_s"] / row["roofline_tokens_per_s"]
    row["achieved_bandwidth_TBps"] = cost.bytes_per_step / (decode_s / steps) / 1e12
    row["roofline_rw_fraction"] = row["decode_tokens_per_s"] / cost.roofline_rw_tokens_per_s(bandwidth)
    row["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
    del engine
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def hf_point(model, context, cap=64):
    """transformers generate() at the largest batch that runs (predicted from the cache size, halved on OOM)."""
    c = model.config
    per_seq = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2 * (context + NEW)  # bf16 K and V
    free, _ = torch.cuda.mem_get_info()
    b = max(1, min(cap, int(0.7 * free // per_seq)))
    while True:
        try:
            r = hf_generate_throughput(model, b, context, new_tokens=9)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if b == 1:
                raise
            b //= 2
    row = {"system": "transformers generate: qwen3-1.7b", **r, "cache_bytes_per_sequence": per_seq,
           "peak_memory_GB": r["peak_memory_bytes"] / 1e9}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072,262144")
    ap.add_argument("--hf-contexts", default="65536,16384,4096")
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    contexts = [int(c) for c in args.contexts.split(",")]
    RESULT.update(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  command="python benchmarks/engine_h100.py --out $OUT/engine.json")
    bw = copy_bandwidth(DEV, nbytes=1 << 30)
    RESULT["copy_bandwidth_TBps"] = bw / 1e12
    rows = RESULT.setdefault("rows", [])

    def section(name, fn):
        if name in skip:
            return
        t = time.time()
        try:
            RESULT["sections"][name] = fn()
        except Exception as err:  # record and go on: one failure must not cost the other measurements
            RESULT["sections"][name] = {"error": repr(err), "trace": traceback.format_exc()[-2000:]}
        print(f"[{time.time() - t:6.1f}s] {name}: {json.dumps(RESULT['sections'][name])[:300]}", flush=True)
        save(args.out)

    section("kernels", check_kernels)
    section("engine_parity", check_engine)

    def run_points(model, name, ctxs, **kw):
        for c in ctxs:
            t = time.time()
            try:
                rows.append(engine_point(model, name, c, bw, **kw))
                r = rows[-1]
                print(f"[{time.time() - t:6.1f}s] {name} {c}: batch {r['batch_size']} decode "
                      f"{r['decode_tokens_per_s']:.0f} tok/s ({100 * r['roofline_fraction']:.0f}% roofline, "
                      f"{r['achieved_bandwidth_TBps']:.2f} TB/s) prefill {r.get('prefill_tokens_per_s', float('nan')):.0f}",
                      flush=True)
            except Exception as err:
                rows.append({"system": f"jetnas engine: {name}", "context_length": c, "error": repr(err),
                             "trace": traceback.format_exc()[-1500:]})
                print(f"{name} {c}: {err!r}", flush=True)
                torch.cuda.empty_cache()
            save(args.out)

    # the headline first (2B at 64K), the 2B sweep, then the baselines, then 4B
    jet2 = preset("jet-nemotron-2b")
    run_points(jet2, "jet-nemotron-2b", [65536])
    run_points(jet2, "jet-nemotron-2b", [c for c in contexts if c != 65536])
    if "prefill-chunks" not in skip:
        run_points(jet2, "jet-nemotron-2b", [65536], chunk=32768)
    del jet2
    torch.cuda.empty_cache()
    if "hf" not in skip:
        hf = qwen3_hf()
        for c in [int(x) for x in args.hf_contexts.split(",")]:
            t = time.time()
            try:
                rows.append(hf_point(hf, c))
                print(f"[{time.time() - t:6.1f}s] hf qwen3 {c}: batch {rows[-1]['batch_size']} decode "
                      f"{rows[-1]['decode_tokens_per_s']:.1f} prefill {rows[-1]['prefill_tokens_per_s']:.0f}", flush=True)
            except Exception as err:
                rows.append({"system": "transformers generate: qwen3-1.7b", "context_length": c, "error": repr(err)})
                print(f"hf {c}: {err!r}", flush=True)
            torch.cuda.empty_cache()
            save(args.out)
        q3 = as_jetnas(hf)
        del hf
        torch.cuda.empty_cache()
        if "qwen3-engine" not in skip:
            run_points(q3, "qwen3-1.7b", contexts, fill="random")
        del q3
        torch.cuda.empty_cache()
    if "4b" not in skip:
        jet4 = preset("jet-nemotron-4b")
        run_points(jet4, "jet-nemotron-4b", [c for c in contexts if c in (4096, 16384, 65536, 262144)])
        del jet4

    # speed-ups at each length
    def best(system, c):
        rs = [r for r in rows if r["system"] == system and r["context_length"] == c and "error" not in r]
        return max(rs, key=lambda r: r["decode_tokens_per_s"]) if rs else None

    table = []
    for c in contexts:
        j = best("jetnas engine: jet-nemotron-2b", c)
        h = best("transformers generate: qwen3-1.7b", c)
        q = best("jetnas engine: qwen3-1.7b", c)
        if j:
            table.append({"context": c, "jet2b_decode": j["decode_tokens_per_s"], "jet2b_batch": j["batch_size"],
                          "roofline_fraction": j["roofline_fraction"], "jet2b_prefill": j.get("prefill_tokens_per_s"),
                          "vs_hf_qwen3": j["decode_tokens_per_s"] / h["decode_tokens_per_s"] if h else None,
                          "vs_engine_qwen3": j["decode_tokens_per_s"] / q["decode_tokens_per_s"] if q else None})
    RESULT["speedups"] = table
    save(args.out)
    print("\n| context | Jet-2B decode tok/s | batch | roofline | prefill tok/s | vs HF Qwen3 | vs engine Qwen3 |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        f = lambda v, fmt: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
        print(f"| {t['context']} | {t['jet2b_decode']:.0f} | {t['jet2b_batch']} | {100 * t['roofline_fraction']:.0f}% | "
              f"{f(t['jet2b_prefill'], '.0f')} | {f(t['vs_hf_qwen3'], '.1f')} | {f(t['vs_engine_qwen3'], '.1f')} |")
    print(json.dumps({"copy_bandwidth_TBps": RESULT["copy_bandwidth_TBps"], "speedups": table}))


if __name__ == "__main__":
    main()
