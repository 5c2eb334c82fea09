"""Decode throughput of SmolLM2-135M-shaped hybrids (the block-selection candidates of the H200 recipe run: full
attention in layers 23 and 28, a 512 window in 10 and 11, one linear block type elsewhere; random weights, bf16)
before and after two changes to the linear blocks' decode step, in the same process: the short convolutions' step
as one in-place Triton launch (`jetnas.ops.decode.conv_step_`; the PyTorch step took about ten launches per conv)
and, for Gated DeltaNet / the JetBlock, the gates g and beta made inside the recurrent step kernel
(`gated_delta_rule_step_raw_`; about eight launches per layer before). Same protocol as the block selection:
one 8K prompt prefilled and copied into 64 rows, 32 new tokens, the engine's CUDA-graph step.

    python benchmarks/decode_step_bench.py --out $OUT/decode_step.json [--blocks gdn,gla,jet,mamba2 --repeats 3]

Before timing, each block type's two paths are teacher-forced along one sequence (2 rows, by default a 288-token
prompt and 31 steps through the engine: `gpu_generate_check.engine_teacher_forced`) and their logits compared with
one full forward of the same weights in float32 on the CPU: the changed step must be no further from it than the old
one (greedy tokens are no check in bf16 with random weights: near-tied logits flip and the sequences part;
2026-12-02 on the H200: 13 and 28 of 32 tokens differed for gdn and jet while both paths may be equally right).
Bound: a decode step reads the weights and every row's cache once: `roofline_tok_s` is
`jetnas.bench.costs.decode_cost`'s roofline at the copy bandwidth measured here. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import jetnas  # noqa: F401
from jetnas.bench.costs import copy_bandwidth, decode_cost
from jetnas.bench.measure import replicated_decode_throughput
from jetnas.models import JetNemotronConfig, JetNemotronForCausalLM
from jetnas.ops.decode import gated_delta_rule_step_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_generate_check import engine_teacher_forced, rel

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, max_position_embeddings=16384, rms_norm_eps=1e-5,
               tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e5})
DEV = torch.device("cuda")
SHAPES = {"gdn": {"num_heads": 9, "head_k_dim": 64, "head_v_dim": 64}, "jet": {"num_heads": 9, "head_dim": 64,
                                                                              "expand_v": 1.0}}


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def hybrid(block: str) -> JetNemotronForCausalLM:
    types = ["attn" if i in (23, 28) else "swa" if i in (10, 11) else block for i in range(30)]
    eac = {"swa": {"window_size": 512}}
    if block in SHAPES:
        eac[block] = SHAPES[block]
    torch.manual_seed(0)
    config = JetNemotronConfig(**SMOLLM2, block_types=types, efficient_attention_config=eac)
    return JetNemotronForCausalLM(config).to(DEV, torch.bfloat16 if DEV.type == "cuda" else torch.float32).eval()


def _unfused_gates(q, k, v, a, b, A_log, dt_bias, state, scale=None, use_qk_l2norm=True, backend="torch"):
    """The decode step as before the gates moved into the kernel: g and beta made by PyTorch ops, beta rounded to
    q's dtype, then the in-place step kernel."""
    g = None if A_log is None else -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return gated_delta_rule_step_(q, k, v, g, b.float().sigmoid().to(q.dtype), state, scale, use_qk_l2norm, backend)


def before_changes(on: bool):
    """While active: the decode step as it was before both changes (PyTorch conv step, gates outside the kernel)."""
    if not on:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("jetnas.modules.conv._in_place", return_value=False))
    stack.enter_context(mock.patch("jetnas.layers.jet.gated_delta_rule_step_raw_", _unfused_gates))
    return stack


def logit_errors(model, prompt_len: int = 288, new_tokens: int = 32) -> dict:
    """Teacher-forced logits of the old and the new step against a float32 full forward (see the docstring), along
    two rows of `prompt_len + new_tokens` random tokens."""
    seq = torch.randint(0, 49152, (2, prompt_len + new_tokens), generator=torch.Generator().manual_seed(1)).to(DEV)
    # float32 on the CPU's reference paths: exact products (GPU float32 kernels multiply in TF32)
    reference = copy.deepcopy(model).float().cpu()
    want = reference(seq.cpu()).logits.float()[:, prompt_len - 1 : -1].to(DEV)
    del reference
    got = {}
    for label, before in (("before", True), ("after", False)):
        with before_changes(before):
            got[label] = engine_teacher_forced(model, seq, prompt_len)
    bf16_full = model(seq).logits.float()[:, prompt_len - 1 : -1]
    return {"before_vs_fp32_full": rel(got["before"], want), "after_vs_fp32_full": rel(got["after"], want),
            "after_vs_before": rel(got["after"], got["before"]), "bf16_full_vs_fp32_full": rel(bf16_full, want),
            "argmax_agreement_after_vs_fp32": (got["after"].argmax(-1) == want.argmax(-1)).float().mean().item(),
            "argmax_agreement_before_vs_fp32": (got["before"].argmax(-1) == want.argmax(-1)).float().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="gdn,gla,jet,mamba2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="0: the logit check only, no timing")
    ap.add_argument("--out", default="decode_step.json")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script, no meaningful figures")
    ap.add_argument("--prompt-len", type=int, default=288, help="the logit check's prompt (prefilled in chunks of 64)")
    ap.add_argument("--new-tokens", type=int, default=32, help="the logit check's tokens after the prompt")
    args = ap.parse_args()
    global DEV
    DEV = torch.device(args.device)
    # 2 GiB per copy on the GPU, well past its L2
    bandwidth = copy_bandwidth(DEV, nbytes=1 << 31) if DEV.type == "cuda" else float("nan")
    out = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", "torch": torch.__version__,
           "batch": args.batch, "context": args.context, "copy_bandwidth_bytes_s": bandwidth, "blocks": {}}
    log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    torch.set_grad_enabled(False)
    for block in args.blocks.split(","):
        model = hybrid(block)
        row = {"logits": logit_errors(model, args.prompt_len, args.new_tokens)}
        e = row["logits"]
        # the new step may differ from the old by rounding (beta kept in fp32, one fewer bf16 rounding of the conv
        # output), not by being further from the float32 model; 10% slack for that rounding's own noise
        row["logits_ok"] = e["after_vs_fp32_full"] <= 1.1 * e["before_vs_fp32_full"] + 1e-4
        log(f"{block}: logits vs fp32 full forward: before {e['before_vs_fp32_full']:.4f}, after "
            f"{e['after_vs_fp32_full']:.4f} (bf16 full forward {e['bf16_full_vs_fp32_full']:.4f}); "
            f"ok={row['logits_ok']}")
        if args.repeats == 0:
            out["blocks"][block] = row
            with open(args.out, "w") as f:
                json.dump(out, f, indent=2)
            continue
        for label, before in (("before", True), ("after", False)):
            with before_changes(before):
                runs = [replicated_decode_throughput(model, args.batch, args.context, warmup=(r == 0))
                        for r in range(args.repeats)]
            row[label] = {"decode_tok_s": [r["decode_tokens_per_s"] for r in runs],
                          "median_decode_tok_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
                          "cache_bytes_per_sequence": runs[0]["cache_bytes_per_sequence"]}
        row["roofline_tok_s"] = decode_cost(model, args.batch, args.context).roofline_tokens_per_s(bandwidth)
        row["speedup"] = row["after"]["median_decode_tok_s"] / row["before"]["median_decode_tok_s"]
        row["roofline_fraction"] = row["after"]["median_decode_tok_s"] / row["roofline_tok_s"]
        out["blocks"][block] = row
        with open(args.out, "w") as f:  # after every block: a cut-off run keeps what it measured
            json.dump(out, f, indent=2)
        log(f"{block}: {row['before']['median_decode_tok_s']:,.0f} -> {row['after']['median_decode_tok_s']:,.0f}"
            f" tok/s ({row['speedup']:.2f}x; {row['roofline_fraction']:.0%} of {row['roofline_tok_s']:,.0f})")
        del model
        torch.cuda.empty_cache()
    print("| block | before tok/s | after tok/s | speed-up | roofline tok/s |")
    print("|---|---|---|---|---|")
    for block, row in out["blocks"].items():
        if "speedup" in row:
            print(f"| {block} | {row['before']['median_decode_tok_s']:,.0f} | "
                  f"{row['after']['median_decode_tok_s']:,.0f}"
                  f" | {row['speedup']:.2f}x | {row['roofline_tok_s']:,.0f} |")
    print(json.dumps({"out": args.out, **{b: {"speedup": round(r.get("speedup", float("nan")), 3),
                                             "logits_ok": r["logits_ok"]} for b, r in out["blocks"].items()}}))


if __name__ == "__main__":
    main()
