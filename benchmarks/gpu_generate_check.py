"""Generation on the GPU with the fast kernels: `generate()` and the engine, a hybrid of every block type, batched,
left-padded.

    python benchmarks/gpu_generate_check.py --out generate_check.json [--sections generate,engine,teacher_forced]
    python benchmarks/gpu_generate_check.py --sections engine --types rwkv7 --out rwkv7.json      # one linear type

Sections (each logs as it goes and rewrites the JSON when it finishes, so a cut-off run keeps what it measured):
- generate (float32): cached greedy generation == uncached, or where they part, their scores within 5e-3 of each
  other up to and including the split (rounding deciding a near tie: fla's float32 chunk kernels multiply in TF32,
  unit roundoff 4.9e-4, and uncached generation reruns them over the whole prefix; on the H200 on 2026-12-02 they
  parted at step 4 with a 3.8e-4 top-2 margin, scores 1.2e-3 apart); a left-padded row == the same prompt alone;
  seeded sampling reproducible.
- engine (float32): for each linear block type X, a model `attn, X, swa, X` and the model of every type: the
  engine's CUDA-graph decode gives the tokens of `generate()`, and its per-step logits match the model's own
  forward decoding (relative error; limit 1e-4: fp32 with TF32 off, only kernel order differs).
- teacher_forced (bf16 and fp32): one long sequence; the logits of prefill + token-by-token decoding through the
  model's forward, and through the engine (chunked prefill, graph step), against one full forward over the whole
  sequence. Greedy token agreement in bf16 is a poor check (one flipped argmax and the sequences part for good);
  teacher forcing compares the same positions whatever was generated. fp32: within 1e-3 of the full forward, the
  engine no more than 25% further from it than the model's own decoding. bf16: the two bf16 paths differ by
  rounding (2026-12-02 on the H200, the engine's chunked prefill was 6.6e-2 from the bf16 full forward while the
  model's one-shot prefill is that forward), so each is judged against the same weights in float32 and may be at
  most 25% further from them than the bf16 full forward is. `--per-type` adds the same for attn+swa alone and
  `attn, X, swa, X` per linear type X, with the engine's one-shot prefill too (diagnostics, not judged).
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback

import torch

import jetnas  # noqa: F401  (registers the model type)
from jetnas.engine import Engine
from jetnas.engine.graph import StaticDecoder
from jetnas.models import JetNemotronConfig, JetNemotronForCausalLM
from jetnas.ops.autotune import limit_autotuning
from jetnas.models.hf_compat import output_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = ["attn", "swa", "jet", "gdn", "deltanet", "gla", "retnet", "mamba2", "rwkv7"]
LINEAR = [t for t in TYPES if t not in ("attn", "swa")]
# bf16 has no absolute limit: it is judged against the float32 model (see teacher_forced above)
LIMITS = {"engine_logits": 1e-4, "float32": 1e-3}


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


def divergence(a, b, prompt_len: int) -> dict:
    """Where two greedy generations (with scores) part: the first differing step, the largest logit difference and
    the scores' relative error up to and including it, and the top-1 - top-2 margin there (for the record: a flip
    caused by a logit difference d always has a margin below 2d, so the margin proves nothing by itself). The
    verdict rests on the relative error: if the two paths' scores agree to rounding level up to the split, the split
    was rounding deciding a near tie (fla's float32 kernels multiply in TF32), not a cache error."""
    steps = len(a.scores)
    diffs = [(sa.float() - sb.float()).abs().amax().item() for sa, sb in zip(a.scores, b.scores)]
    differ = (a.sequences[:, prompt_len:] != b.sequences[:, prompt_len:]).any(0).nonzero()
    first = int(differ[0]) if len(differ) else None
    upto = steps if first is None else first + 1  # the steps up to and including the first difference
    out = {"first_differing_step": first, "max_logit_diff_before": max(diffs[:upto]),
           "scores_rel_err_before": max(rel(sa, sb) for sa, sb in zip(a.scores[:upto], b.scores[:upto]))}
    if first is not None:
        top = b.scores[first].float().topk(2, -1).values
        rows = (a.sequences[:, prompt_len + first] != b.sequences[:, prompt_len + first]).nonzero()[:, 0]
        out["margin_at_first_difference"] = (top[rows, 0] - top[rows, 1]).min().item()
    return out


def generate_section() -> dict:
    model = hybrid(torch.float32)
    ids, mask = prompts()
    # 8 new tokens: uncached generation re-runs the whole prefix at each new length, and on a fresh GPU every new
    # length cost fla compilation time (24 tokens did not finish in 400 s on 2026-12-02)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, return_dict_in_generate=True, output_scores=True, **kw)
    log("cached generate done")
    uncached = model.generate(ids, use_cache=False, return_dict_in_generate=True, output_scores=True, **kw)
    alone = model.generate(ids[3:, 33:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    res = {"cached_equals_uncached": bool(torch.equal(cached.sequences, uncached.sequences)),
           "padded_row_equals_alone": bool(torch.equal(cached.sequences[3, 40:], alone[0, 7:])),
           "cached_vs_uncached": divergence(cached, uncached, ids.shape[1])}
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


def engine_section(report: dict, out: str, linear=LINEAR, with_all: bool = True) -> dict:
    """`attn, X, swa, X` for each X of `linear`, then (`with_all`) the model of every type."""
    res = report.setdefault("engine", {})
    ids, mask = prompts()
    torch.backends.cuda.matmul.allow_tf32 = False
    for types in [["attn", t, "swa", t] for t in linear] + ([TYPES] if with_all else []):
        name = "+".join(types) if len(types) < len(TYPES) else "all"
        tokens_equal, err = engine_logit_error(hybrid(torch.float32, types, repeat=1 if name != "all" else 2),
                                               ids, mask)
        res[name] = {"tokens_equal_generate": tokens_equal, "step_logits_rel_err": err}
        log("engine", name, res[name])
        report["engine"] = res
        dump(report, out)
    return res


@torch.inference_mode()
def engine_teacher_forced(model, seq: torch.Tensor, prompt_len: int, chunk_size: int | None = 64) -> torch.Tensor:
    """Logits [B, T - prompt_len, V] (float32) of the engine along `seq`: chunked prefill of the prompt into the
    static cache (the last prompt position's logits), then the graph-captured step fed `seq`'s own tokens."""
    engine = Engine(model, decode="static", chunk_size=chunk_size)
    mask = torch.ones(seq.shape[0], prompt_len, dtype=torch.long, device=seq.device)
    cache = engine.cache_for(seq.shape[0], seq.shape[1])
    decoder = StaticDecoder(model, cache)
    decoder.prepare()
    steps = [engine.prefill(seq[:, :prompt_len], mask, cache)[:, None].float()]
    decoder.begin(mask)
    for t in range(prompt_len, seq.shape[1] - 1):
        # a copy: the step returns its captured graph's output buffer, overwritten by the next step (float32's
        # .float() is no copy: 2026-12-02 every float32 step read as the last one, 0.7-1.4 from the forward)
        steps.append(decoder.step(seq[:, t])[:, None].to(torch.float32, copy=True))
    return torch.cat(steps, 1)


@torch.inference_mode()
def forward_teacher_forced(model, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The same through the model's own forward: one prefill, then one token at a time with its cache."""
    first = model(seq[:, :prompt_len], use_cache=True)
    cache = output_cache(first)
    steps = [first.logits[:, -1:].float()]
    for t in range(prompt_len, seq.shape[1] - 1):
        steps.append(model(seq[:, t : t + 1], past_key_values=cache, use_cache=True).logits.float())
    return torch.cat(steps, 1)


def _errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative error over all positions, at the prefill's last position, and over the decode steps only."""
    return {"all": rel(got, ref), "prefill": rel(got[:, 0], ref[:, 0]), "steps": rel(got[:, 1:], ref[:, 1:])}


@torch.inference_mode()
def teacher_forced_section(report: dict, out: str, dtypes=("float32", "bfloat16"), configs=(TYPES,),
                           prompt_len: int = 288, new_tokens: int = 32) -> dict:
    """`configs`: the layer-type lists to check; the model of every type is reported under the dtype's name,
    others under `dtype:types` (used to find which layer type or which engine stage adds error). Four rows of
    `prompt_len + new_tokens` random tokens; the engine prefills the prompt in chunks of 64."""
    res = report.setdefault("teacher_forced", {})
    for dtype in [getattr(torch, d) for d in dtypes]:
        for types in configs:
            key = str(dtype).split(".")[-1] + ("" if list(types) == TYPES else ":" + "+".join(types))
            try:
                full_model = list(types) == TYPES
                model = hybrid(dtype, types, repeat=2)
                g = torch.Generator().manual_seed(2)
                seq = torch.randint(1, 1000, (4, prompt_len + new_tokens), generator=g).to(DEVICE)
                ref = model(seq).logits.float()[:, prompt_len - 1 : -1]
                # the truth for bf16: the same weights in float32 (rounding differences between bf16 paths say nothing
                # about which is right; the engine must be about as close to this as the bf16 full forward is), on
                # the CPU's reference paths: exact float32, and no float32 fla kernel (one crashed autotuning GLA)
                truth = ref if dtype == torch.float32 else (
                    copy.deepcopy(model).float().cpu()(seq.cpu()).logits.float()[:, prompt_len - 1 : -1].to(DEVICE))
                forward = forward_teacher_forced(model, seq, prompt_len)
                eng = engine_teacher_forced(model, seq, prompt_len, chunk_size=64)
                res[key] = {"forward_decode_vs_full": rel(forward, ref), "engine_vs_full": rel(eng, ref),
                            "engine_vs_forward_decode": rel(eng, forward),
                            "argmax_agreement_engine_vs_full": (eng.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                            "forward_decode_vs_full_parts": _errors(forward, ref),
                            "engine_vs_full_parts": _errors(eng, ref),
                            "full_vs_fp32": rel(ref, truth), "forward_decode_vs_fp32": rel(forward, truth),
                            "engine_vs_fp32": rel(eng, truth)}
                if not full_model:  # where the engine's extra error comes from: its chunked prefill or its step
                    one_shot = engine_teacher_forced(model, seq, prompt_len, chunk_size=None)
                    res[key]["engine_one_shot_prefill_vs_full_parts"] = _errors(one_shot, ref)
                log("teacher-forced", key, {k: round(v, 5) if isinstance(v, float) else
                                            {kk: round(vv, 5) for kk, vv in v.items()} for k, v in res[key].items()})
            except Exception as err:  # noqa: BLE001 - a kernel crash in one configuration is recorded, the rest run
                # (2026-12-02: float32 crashed in fla's chunk_gla_fwd_kernel_o autotuning, misaligned address)
                res[key] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                log("teacher-forced", key, "failed:", res[key]["error"])
            report["teacher_forced"] = res
            dump(report, out)
    return res


def dump(report: dict, out: str) -> None:
    with open(out, "w") as f:
        json.dump(report, f, indent=2)


def verdict(report: dict) -> list[str]:
    gen = report.get("generate", {})
    failures = [k for k in ("padded_row_equals_alone", "sampling_reproducible") if k in gen and not gen[k]]
    if "cached_equals_uncached" in gen and not gen["cached_equals_uncached"] and not (
            gen["cached_vs_uncached"]["scores_rel_err_before"] < 5e-3):
        failures.append("cached_equals_uncached")
    for name, e in report.get("engine", {}).items():
        if not e["tokens_equal_generate"]:
            failures.append(f"engine.{name}.tokens")
        if not e["step_logits_rel_err"] < LIMITS["engine_logits"]:
            failures.append(f"engine.{name}.logits={e['step_logits_rel_err']:.2e}")
    for key, e in report.get("teacher_forced", {}).items():
        if ":" in key:  # a diagnostic of one layer type, not judged
            continue
        if "error" in e:
            failures.append(f"teacher_forced.{key}: {e['error'][:120]}")
            continue
        if key == "float32":
            for name in ("forward_decode_vs_full", "engine_vs_full"):
                if not e[name] < LIMITS[key]:
                    failures.append(f"teacher_forced.{key}.{name}={e[name]:.2e}")
            if not e["engine_vs_full"] <= 1.25 * e["forward_decode_vs_full"] + 1e-6:
                failures.append(f"teacher_forced.{key}.engine_worse_than_forward_decode")
        else:  # reduced precision: no further from the float32 model than the bf16 full forward, 25% slack
            for name in ("forward_decode_vs_fp32", "engine_vs_fp32"):
                if not e[name] <= 1.25 * e["full_vs_fp32"] + 1e-6:
                    failures.append(f"teacher_forced.{key}.{name}={e[name]:.2e}>1.25x full_vs_fp32="
                                    f"{e['full_vs_fp32']:.2e}")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="generate_check.json")
    parser.add_argument("--sections", default="generate,engine,teacher_forced")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="of the teacher_forced section")
    parser.add_argument("--per-type", action="store_true",
                        help="teacher_forced also for attn+swa alone and attn,X,swa,X per linear type X (diagnostic)")
    parser.add_argument("--autotune-configs", type=int, default=None,
                        help="benchmark at most N autotuning configs per Triton kernel (a fast start, fresh machine)")
    parser.add_argument("--prompt-len", type=int, default=288,
                        help="teacher_forced: prompt tokens (prefilled in chunks of 64; more than 64 for two chunks)")
    parser.add_argument("--new-tokens", type=int, default=32, help="teacher_forced: tokens after the prompt")
    parser.add_argument("--types", default=None,
                        help="engine section: only attn,X,swa,X for these linear types X (comma-separated), without "
                             "the model of every type; --per-type: only these X; default: every linear type and the "
                             "model of every type")
    args = parser.parse_args()
    if args.autotune_configs is not None:
        limit_autotuning(args.autotune_configs)
    linear = LINEAR if args.types is None else args.types.split(",")
    unknown = sorted(set(linear) - set(LINEAR))
    if unknown:
        raise SystemExit(f"unknown linear types {unknown}; known: {', '.join(LINEAR)}")
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "limits": LIMITS, "errors": {}}
    t0 = time.time()
    for section in args.sections.split(","):
        try:
            if section == "generate":
                report["generate"] = generate_section()
                log("generate", report["generate"])
            elif section == "engine":
                engine_section(report, args.out, linear, with_all=args.types is None)
            elif section == "teacher_forced":
                # the model of every type last and GLA last of the rest: a CUDA error (fla's float32 GLA autotuning
                # crashed once) leaves the context unusable for what follows
                per_type = [["attn", "swa"]] + [["attn", t, "swa", t] for t in sorted(linear, key=lambda t: t == "gla")]
                configs = (per_type if args.per_type else []) + [TYPES]
                teacher_forced_section(report, args.out, args.dtypes.split(","), configs, args.prompt_len,
                                       args.new_tokens)
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
