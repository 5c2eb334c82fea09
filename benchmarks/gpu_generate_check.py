"""`generate()` on the GPU with the fast kernels: a hybrid with every block type, batched, left-padded.

    python benchmarks/gpu_generate_check.py --out generate_check.json

Checks, in float32 (so kernel-order differences stay far below the logit gaps greedy decoding depends on):
cached greedy generation == uncached; a left-padded row == the same prompt alone; seeded sampling is
reproducible; the prefill+decode logits of the cached path match one full forward (relative error, bf16 and fp32).
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json

import torch

import jetnas  # noqa: F401  (registers the model type)
from jetnas.models import JetNemotronConfig, JetNemotronForCausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = ["attn", "swa", "jet", "gdn", "deltanet", "gla", "retnet", "mamba2"]


def hybrid(dtype, types=TYPES, device=DEVICE) -> JetNemotronForCausalLM:
    """A tiny model with two layers of each of `types`, the dynamic-conv generators and conv biases non-zero."""
    torch.manual_seed(0)
    config = JetNemotronConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=len(types) * 2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, block_types=list(types) * 2,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="generate_check.json")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"}
    model = hybrid(torch.float32)
    ids = torch.randint(1, 1000, (4, 40), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    mask[3, :33] = 0
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    alone = model.generate(ids[3:, 33:], max_new_tokens=24, do_sample=False, pad_token_id=0)
    report["cached_equals_uncached"] = bool(torch.equal(cached, uncached))
    report["padded_row_equals_alone"] = bool(torch.equal(cached[3, 40:], alone[0, 7:]))
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.9,
                                   max_new_tokens=16, pad_token_id=0))
    report["sampling_reproducible"] = bool(torch.equal(*runs))
    for dtype in (torch.float32, torch.bfloat16):
        m = hybrid(dtype)
        seq = torch.randint(1, 1000, (2, 300), device=DEVICE)
        with torch.no_grad():
            full = m(seq).logits.float()
            out = m(seq[:, :290], use_cache=True)
            steps = [out.logits.float()]
            cache = out.past_key_values
            for t in range(290, 300):
                out = m(seq[:, t : t + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits.float())
        report[f"prefill_decode_vs_full_{str(dtype).split('.')[-1]}"] = rel(torch.cat(steps, 1), full)
    report["passed"] = (report["cached_equals_uncached"] and report["padded_row_equals_alone"]
                        and report["sampling_reproducible"] and report["prefill_decode_vs_full_float32"] < 1e-3
                        and report["prefill_decode_vs_full_bfloat16"] < 3e-2)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
