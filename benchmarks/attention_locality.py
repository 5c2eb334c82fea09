"""How local each of a teacher's attention layers is: the share of its attention on the last W tokens.

For every layer, head and query position q >= W (so that the row's first token lies outside a window of W), the
softmax mass on keys q - W + 1 .. q, averaged over heads, positions and rows, for several W; also the mass on the
row's first token (an attention sink, which a window drops), and the window's share of the mass off the sink. A
layer whose mass lies almost all inside W tokens is one a sliding window of W reproduces almost exactly at any
length (and exactly on prompts shorter than W); a layer with mass far back is one a window cuts. Issue 19 reads it beside the linear blocks' alignment
residuals to choose which linear layers become short-window attention (the -lw256 recipe).

    OMP_NUM_THREADS=2 python benchmarks/attention_locality.py --rows 4 --length 1024 --windows 64,128,256,512 \
        --out results/cpu_teacher_attention_locality

Reads held-out text only (`--data`, default Wikipedia's validation tokens), never an evaluation set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def window_shares(attentions: list[torch.Tensor], windows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(inside, sink, inside_of_rest)`, each `[layers, windows]`, means over heads and the query positions beyond
    the window (q >= W, so that the row's first token lies outside it): the attention mass on the last W keys (the
    query's own included); the mass on the row's first token (an attention sink: most heads park mass there, and
    a window drops it); and the first as a share of what is not on the sink, `inside / (1 - sink)`.
    `attentions`: per layer `[B, H, T, T]` softmax weights."""
    inside, sink, rest = (np.zeros((len(attentions), len(windows))) for _ in range(3))
    for i, a in enumerate(attentions):
        T = a.shape[-1]
        q = torch.arange(T)[:, None]
        k = torch.arange(T)[None, :]
        for j, W in enumerate(windows):
            mass = (a * (((q - k) < W) & (k <= q))).sum(-1)[..., W:]  # [B, H, T - W]
            first = a[..., W:, 0]
            inside[i, j] = mass.mean().item()
            sink[i, j] = first.mean().item()
            rest[i, j] = (mass / (1 - first).clamp_min(1e-6)).mean().item()
    return inside, sink, rest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/corpus/val.bin"))
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--windows", default="64,128,256,512")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    windows = [int(w) for w in args.windows.split(",")]
    if max(windows) > args.length:
        p.error(f"--windows: {max(windows)} is longer than --length {args.length}")

    from jetnas.models.teachers import load_teacher

    t0 = time.time()
    model, _, _ = load_teacher(args.teacher)
    model.set_attn_implementation("eager")  # the softmax weights themselves
    ids = np.fromfile(args.data, dtype="<u2")
    # rows spread evenly over the file (different articles), each a contiguous span
    starts = np.linspace(0, len(ids) - args.length - 1, args.rows).astype(int)
    total = None
    with torch.inference_mode():
        for n, s in enumerate(starts):
            row = torch.from_numpy(ids[s:s + args.length].astype(np.int64))[None]
            attentions = model(row, output_attentions=True).attentions
            shares = np.stack(window_shares([a.float() for a in attentions], windows))
            total = shares if total is None else total + shares
            print(f"row {n + 1}/{args.rows} ({time.time() - t0:.0f} s)", file=sys.stderr)
    inside, sink, rest = total / args.rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"teacher": args.teacher, "data": args.data, "rows": args.rows, "length": args.length,
              "starts": starts.tolist(), "windows": windows,
              **{name: {str(i): dict(zip(map(str, windows), row.round(4).tolist())) for i, row in enumerate(table)}
                 for name, table in (("inside", inside), ("sink", sink), ("inside_of_rest", rest))},
              "seconds": round(time.time() - t0, 1)}
    (out / "locality.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| layer | " + " | ".join(f"inside W={w}" for w in windows) + " | sink (W=" + str(windows[-1])
          + ") | " + " | ".join(f"of the rest, W={w}" for w in windows) + " |")
    print("|---" * (2 * len(windows) + 2) + "|")
    for i in range(len(inside)):
        print(f"| {i} | " + " | ".join(f"{v:.3f}" for v in inside[i]) + f" | {sink[i, -1]:.3f} | "
              + " | ".join(f"{v:.3f}" for v in rest[i]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
