"""Which part of the engine's float32 decode step goes wrong on the GPU (2026-12-02: gpu_generate_check's
teacher-forced float32 steps were 0.7-1.4 relative error from the full forward on an H200, with the prefill exact,
while bf16 and the CPU (torch and interpreted Triton) agree to 6e-7). Splits the step by layer kind, CUDA graph
or eager, Triton or SDPA attention, and checks the attention kernel alone at the check's shapes."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import gpu_generate_check as g

from jetnas.engine.graph import StaticDecoder
from jetnas.ops.decode import decode_attention, naive_decode_attention

dev = "cuda" if torch.cuda.is_available() else "cpu"
out = {}
# the kernel alone, float32 and bf16, the check's shapes: full cache (R 320, 2 splits) and a ring of 16
for dtype in (torch.float32, torch.bfloat16) if dev == "cuda" else (torch.float32,):  # no bf16 in the interpreter
    for R, ring in ((320, False), (16, True)):
        for splits in (None, 1, 2):
            torch.manual_seed(0)
            q = torch.randn(4, 4, 64, device=dev, dtype=dtype)
            kc = torch.randn(4, 2, R, 64, device=dev, dtype=dtype)
            vc = torch.randn(4, 2, R, 64, device=dev, dtype=dtype)
            hi = torch.tensor([289, 300, 310, 320], device=dev, dtype=torch.int32)
            lo = torch.clamp(hi - R, min=0) if ring else torch.zeros_like(hi)
            want = naive_decode_attention(q, kc, vc, lo, hi)
            got = decode_attention(q, kc, vc, lo, hi, ring=ring, backend="triton", num_splits=splits)
            key = f"kernel {str(dtype)[6:]} R={R} splits={splits}"
            out[key] = g.rel(got, want)
            print(key, f"{out[key]:.2e}", flush=True)

for types in (["attn", "swa"], ["attn"], ["swa"], ["gdn"]):
    model = g.hybrid(torch.float32, types, device=dev)
    gen = torch.Generator().manual_seed(2)
    seq = torch.randint(1, 1000, (4, 320), generator=gen).to(dev)
    P = 288
    with torch.inference_mode():
        ref = model(seq).logits.float()[:, P - 1 : -1]
    for backend in ("torch", "triton"):
        for graph in (False, True):
            orig = StaticDecoder.__init__

            def init(self, *a, _b=backend, _g=graph, _orig=orig, **k):
                _orig(self, *a, **k)
                self.backend, self.use_graph = _b, _g and dev == "cuda"

            StaticDecoder.__init__ = init
            try:
                e = g._errors(g.engine_teacher_forced(model, seq, P, chunk_size=64), ref)
            except Exception as err:  # noqa: BLE001
                e = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            finally:
                StaticDecoder.__init__ = orig
            key = f"{'+'.join(types)} {backend} graph={graph}"
            out[key] = e
            print(key, {k: (f"{v:.1e}" if isinstance(v, float) else v) for k, v in e.items()}, flush=True)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "diag_fp32_step.json"), "w") as f:
        json.dump(out, f, indent=1)
