"""Generation on the GPU with the fast kernels: `generate()` and the engine, a hybrid of every block type, batched,
left-padded.

    python benchmarks/gpu_generate_check.py --out generate_check.json [--sections generate,engine,teacher_forced]

Sections (each logs as it goes and rewrites the JSON when it finishes, so a cut-off run keeps what it measured):
- generate (float32, so kernel-order differences stay far below the logit gaps greedy decoding depends on):
  cached greedy generation == uncached; a left-padded row == the same prompt alone; seeded sampling reproducible.
- engine (float32): for each linear block type X, a model `attn, X, swa, X` and the model of every type: the
  engine's CUDA-graph decode gives the tokens of `generate()`, and its per-step logits match the model's own
  forward decoding (relative error; limit 1e-4: fp32 with TF32 off, only kernel order differs).
- teacher_forced (bf16 and fp32): one long sequence; the logits of prefill + token-by-token decoding through the
  model's forward, and through the engine's graph step, against one full forward over the whole sequence. Greedy
  token agreement in bf16 is a poor check (one flipped argmax and the sequences part for good); teacher forcing
  compares the same positions whatever was generated. Limits: 1e-3 fp32; 5e-2 bf16 (8-bit mantissa activations
  through 16 layers: the model's own bf16 decode is 3.3e-2 from its full forward on CPU), and the engine may not
  be more than 25% further from the full forward than the model's own decoding is.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

import jetnas  # noqa: F401  (registers the model type)
from jetnas.engine import Engine
from jetnas.engine.graph import StaticDecoder
from jetnas.models import JetNemotronConfig, JetNemotronForCausalLM
from jetnas.models.hf_compat import output_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = ["attn", "swa", "jet", "gdn", "deltanet", "gla", "retnet", "mamba2"]
LINEAR = [t for t in TYPES if t not in ("attn", "swa")]
LIMITS = {"engine_logits": 1e-4, "float32": 1e-3, "bfloat16": 5e-2}


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def hybrid(dtype, types=TYPES, device=DEVICE, repeat: int = 2) -> JetNemotronForCausalLM:
    """A tiny model with `repeat` layers of each of `types`, the dynamic-conv generators and conv biases non-zero."""
    torch.manual_seed(0)
    config = JetNemotronConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=len(types) * repeat,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, block_types=list(types) * repeat,
        efficient_attention_config={"swa": {"window_size": 16}, "jet": {"num_heads": 4, "head_dim": 64},
                                    "mamba2": {"head_dim": 64, "state_size": 64}})
    model = JetNemotronForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "kernel_generator.w2.weight" in name or name.endswith("conv1d.bias"):
                p.normal_(std=0.02)
    return model.to(device, dtype).eval()


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def prompts(vocab: int = 1000):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (4, 40), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    mask[3, :33] = 0
    return ids, mask


def generate_section() -> dict:
    model = hybrid(torch.float32)
    ids, mask = prompts()
    # 8 new tokens: uncached generation re-runs the whole prefix at each new length, and on a fresh GPU every new
    # length cost fla compilation time (24 tokens did not finish in 400 s on 2026-12-02)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    log("cached generate done")
    uncached = model.generate(ids, use_cache=False, **kw)
    alone = model.generate(ids[3:, 33:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    res = {"cached_equals_uncached": bool(torch.equal(cached, uncached)),
           "padded_row_equals_alone": bool(torch.equal(cached[3, 40:], alone[0, 7:]))}
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.9,
                                   max_new_tokens=16, pad_token_id=0))
    res["sampling_reproducible"] = bool(torch.equal(*runs))
    return res


@torch.inference_mode()
def engine_logit_error(model, ids, mask, new_tokens: int = 12) -> tuple[bool, float]:
    """(engine tokens == generate() tokens, worst per-step relative logit error of the graph step against the
    model's own forward decoding along the same tokens)."""
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    engine = Engine(model, decode="static")
    got = engine.generate(ids, mask, max_new_tokens=new_tokens).sequences
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], new_tokens, dtype=mask.dtype, device=DEVICE)], 1)
    cache = engine.cache_for(ids.shape[0], expected.shape[1])
    decoder = StaticDecoder(model, cache)
    decoder.prepare()
    out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    decoder.begin(mask)
    ref_cache = output_cache(model(ids, attention_mask=mask, use_cache=True))
    worst = 0.0
    for t in range(ids.shape[1], expected.shape[1] - 1):
        step = decoder.step(expected[:, t])
        want = model(expected[:, t : t + 1], attention_mask=full_mask[:, : t + 1], past_key_values=ref_cache,
                     use_cache=True).logits[:, -1]
        worst = max(worst, rel(step, want))
    del out
    return bool(torch.equal(got, expected)), worst


def engine_section(report: dict, out: str) -> dict:
    res = {}
    ids, mask = prompts()
    torch.backends.cuda.matmul.allow_tf32 = False
    for types in [["attn", t, "swa", t] for t in LINEAR] + [TYPES]:
        name = "+".join(types) if len(types) < len(TYPES) else "all"
        tokens_equal, err = engine_logit_error(hybrid(torch.float32, types, repeat=1 if name != "all" else 2),
                                               ids, mask)
        res[name] = {"tokens_equal_generate": tokens_equal, "step_logits_rel_err": err}
        log("engine", name, res[name])
        report["engine"] = res
        dump(report, out)
    return res


@torch.inference_mode()
def teacher_forced_section(report: dict, out: str, dtypes=("float32", "bfloat16")) -> dict:
    res = report.setdefault("teacher_forced", {})
    for dtype in [getattr(torch, d) for d in dtypes]:
        model = hybrid(dtype)
        g = torch.Generator().manual_seed(2)
        seq = torch.randint(1, 1000, (4, 320), generator=g).to(DEVICE)
        prompt_len = 288
        full = model(seq).logits.float()
        # the model's forward: prefill, then one token at a time
        first = model(seq[:, :prompt_len], use_cache=True)
        cache = output_cache(first)
        steps = [first.logits[:, -1:].float()]
        for t in range(prompt_len, seq.shape[1] - 1):
            steps.append(model(seq[:, t : t + 1], past_key_values=cache, use_cache=True).logits.float())
        forward = torch.cat(steps, 1)
        # the engine: chunked prefill (64) into the static cache, then the graph-captured step
        engine = Engine(model, decode="static", chunk_size=64)
        mask = torch.ones(seq.shape[0], prompt_len, dtype=torch.long, device=DEVICE)
        ecache = engine.cache_for(seq.shape[0], seq.shape[1])
        decoder = StaticDecoder(model, ecache)
        decoder.prepare()
        engine_steps = [engine._prefill(seq[:, :prompt_len], mask, ecache)[:, None].float()]
        decoder.begin(mask)
        for t in range(prompt_len, seq.shape[1] - 1):
            engine_steps.append(decoder.step(seq[:, t])[:, None].float())
        eng = torch.cat(engine_steps, 1)
        ref = full[:, prompt_len - 1 : -1]
        key = str(dtype).split(".")[-1]
        res[key] = {"forward_decode_vs_full": rel(forward, ref), "engine_vs_full": rel(eng, ref),
                    "engine_vs_forward_decode": rel(eng, forward),
                    "argmax_agreement_engine_vs_full": (eng.argmax(-1) == ref.argmax(-1)).float().mean().item()}
        log("teacher-forced", key, res[key])
        report["teacher_forced"] = res
        dump(report, out)
    return res


def dump(report: dict, out: str) -> None:
    with open(out, "w") as f:
        json.dump(report, f, indent=2)


def verdict(report: dict) -> list[str]:
    failures = [k for k in ("cached_equals_uncached", "padded_row_equals_alone", "sampling_reproducible")
                if k in report.get("generate", {}) and not report["generate"][k]]
    for name, e in report.get("engine", {}).items():
        if not e["tokens_equal_generate"]:
            failures.append(f"engine.{name}.tokens")
        if not e["step_logits_rel_err"] < LIMITS["engine_logits"]:
            failures.append(f"engine.{name}.logits={e['step_logits_rel_err']:.2e}")
    for key, e in report.get("teacher_forced", {}).items():
        for name in ("forward_decode_vs_full", "engine_vs_full"):
            if not e[name] < LIMITS[key]:
                failures.append(f"teacher_forced.{key}.{name}={e[name]:.2e}")
        if not e["engine_vs_full"] <= 1.25 * e["forward_decode_vs_full"] + 1e-6:
            failures.append(f"teacher_forced.{key}.engine_worse_than_forward_decode")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="generate_check.json")
    parser.add_argument("--sections", default="generate,engine,teacher_forced")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="of the teacher_forced section")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "limits": LIMITS, "errors": {}}
    t0 = time.time()
    for section in args.sections.split(","):
        try:
            if section == "generate":
                report["generate"] = generate_section()
                log("generate", report["generate"])
            elif section == "engine":
                engine_section(report, args.out)
            elif section == "teacher_forced":
                teacher_forced_section(report, args.out, args.dtypes.split(","))
            else:
                raise SystemExit(f"unknown section {section!r}: use generate, engine, teacher_forced")
        except Exception as err:  # keep the other sections' results; the error is part of the report
            report["errors"][section] = f"{type(err).__name__}: {err}"
            log("section", section, "failed:", report["errors"][section][:400])
            log(traceback.format_exc()[-3000:])
        dump(report, args.out)
    report["failures"] = verdict(report) + [f"{k}: {v[:200]}" for k, v in report["errors"].items()]
    report["passed"] = not report["failures"]
    report["seconds"] = round(time.time() - t0, 1)
    dump(report, args.out)
    print(json.dumps({k: report[k] for k in ("device", "failures", "passed", "seconds")}))


if __name__ == "__main__":
    main()
