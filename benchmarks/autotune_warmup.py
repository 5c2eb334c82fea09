"""Run each linear block once (training step under bf16 autocast, then a prefill and a decode step) at a model's
shapes, so that fla's kernels compile and autotune for them; with dev/gpu_session.sh the autotune results come back
in $OUT/autotune.tar and later machines skip the benchmarking (see that script's header).

    python benchmarks/autotune_warmup.py --types gla,retnet,mamba2     # SmolLM2-135M's shapes by default

Prints the seconds each block took (mostly compilation and autotuning on a fresh machine).
"""

from __future__ import annotations

import argparse
import time

import torch

from jetnas.layers import build_layer
from jetnas.models.configuration import JetNemotronConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="gla,retnet,mamba2,gdn,deltanet,jet")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    args = ap.parse_args()
    config = JetNemotronConfig(hidden_size=args.hidden, num_attention_heads=args.heads,
                               num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_hidden_layers=1,
                               block_types=["attn"])
    dev = torch.device("cuda")
    for layer_type in args.types.split(","):
        start = time.time()
        try:
            layer = build_layer(layer_type, args.hidden, **config.block_kwargs(layer_type)).to(dev)
            x = torch.randn(args.batch, args.seq, args.hidden, device=dev, requires_grad=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y, _ = layer(x)
            y.float().square().mean().backward()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                _, state = layer(x[:, :-1], use_cache=True)
                layer(x[:, -1:], state)
            torch.cuda.synchronize()
            print(f"{layer_type}: {time.time() - start:.1f} s", flush=True)
        except Exception as err:  # noqa: BLE001  (the next block's results are still worth having)
            print(f"{layer_type}: failed after {time.time() - start:.1f} s: {err!r}"[:400], flush=True)


if __name__ == "__main__":
    main()
