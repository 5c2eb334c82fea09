"""How local each of a teacher's attention layers is: the share of its attention on the last W tokens.

For every layer, head and query position q >= W (so that the row's first token lies outside a window of W), the
softmax mass on keys q - W + 1 .. q, averaged over heads, positions and rows, for several W; also the mass on the
row's first token (an attention sink, which a window drops), and the window's share of the mass off the sink. A
layer whose mass lies almost all inside W tokens is one a sliding window of W reproduces almost exactly at any
length (and exactly on prompts shorter than W); a layer with mass far back is one a window cuts. Issue 19 reads it
beside the linear blocks' alignment residuals to choose which linear layers become short-window attention (the
-lw256 recipe).

With `--ablate-window W`, also what a window costs the teacher itself: each layer alone (then each set of
`--ablate-sets`) turned into a W-token sliding window, the rest full attention, and the mean NLL of the tokens beyond
W against the teacher's, on the first `--ablate-rows` spans. The locality shares above count what a window keeps;
this counts what losing the rest (the sink included) does to the next-token loss before any training adapts.

    OMP_NUM_THREADS=2 python benchmarks/attention_locality.py --rows 4 --length 1024 --windows 64,128,256,512 \
        --ablate-window 256 --ablate-rows 2 --ablate-sets "14,20,22,26;5,6,9,15" \
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

from retrieval_layers import band_mask  # noqa: E402  (benchmarks/, this script's folder)


def window_shares(attentions: list[torch.Tensor], windows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(inside, sink, inside_of_rest)`, each `[layers, windows]`, means over heads and the query positions beyond
    the window (q >= W, so that the row's first token lies outside it): the attention mass on the last W keys (the
    query's own included); the mass on the row's first token (an attention sink: most heads park mass there, and
    a window drops it); and the first as a share of what is not on the sink, `inside / (1 - sink)`.
    `attentions`: per layer `[B, H, T, T]` softmax weights."""
    inside, sink, rest = (np.zeros((len(attentions), len(windows))) for _ in range(3))
    for i, a in enumerate(attentions):
        for j, W in enumerate(windows):
            mass = (a * band_mask(a.shape[-1], W, a.device)).sum(-1)[..., W:]  # [B, H, T - W]
            first = a[..., W:, 0]
            inside[i, j] = mass.mean().item()
            sink[i, j] = first.mean().item()
            rest[i, j] = (mass / (1 - first).clamp_min(1e-6)).mean().item()
    return inside, sink, rest


def nll_beyond(model, rows: torch.Tensor, start: int) -> float:
    """Mean next-token NLL of `rows` `[B, T]` over the targets at positions > `start`."""
    with torch.inference_mode():
        logits = model(rows).logits.float()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, rows[:, 1:, None])[..., 0]
    return nll[:, start:].mean().item()


def window_damage(teacher, rows: torch.Tensor, window: int, layer_sets: list[list[int]]) -> list[float]:
    """For each set of layers: the teacher with those layers as `window`-token sliding windows (its own weights,
    `convert_model`), its NLL beyond `window` minus the teacher's."""
    from jetnas.models.convert import convert_model

    base = nll_beyond(teacher, rows, window - 1)
    out = []
    for layers in layer_sets:
        types = ["attn"] * teacher.config.num_hidden_layers
        for i in layers:
            types[i] = "swa"
        model, _ = convert_model(teacher, types, {"swa": {"window_size": window}})
        out.append(nll_beyond(model.eval(), rows, window - 1) - base)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/corpus/val.bin"))
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--windows", default="64,128,256,512")
    p.add_argument("--ablate-window", type=int, default=0, help="also each layer's cost as a window of this size")
    p.add_argument("--ablate-rows", type=int, default=2)
    p.add_argument("--ablate-sets", default="", help='sets of layers windowed together, e.g. "14,20;5,6"')
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    windows = [int(w) for w in args.windows.split(",")]
    if max(windows + [args.ablate_window]) >= args.length:
        p.error(f"--windows / --ablate-window: {max(windows + [args.ablate_window])} leaves no position beyond the "
                f"window in --length {args.length}")

    from jetnas.models.teachers import load_teacher

    t0 = time.time()
    model, _, _ = load_teacher(args.teacher)
    model.set_attn_implementation("eager")  # the softmax weights themselves
    ids = np.fromfile(args.data, dtype="<u2")
    # rows spread evenly over the file (different articles), each a contiguous span
    starts = np.linspace(0, len(ids) - args.length - 1, args.rows).astype(int)
    total = None
    spans = [torch.from_numpy(ids[s:s + args.length].astype(np.int64)) for s in starts]
    with torch.inference_mode():
        for n, row in enumerate(spans):
            row = row[None]
            attentions = model(row, output_attentions=True).attentions
            shares = np.stack(window_shares([a.float() for a in attentions], windows))
            total = shares if total is None else total + shares
            print(f"row {n + 1}/{args.rows} ({time.time() - t0:.0f} s)", file=sys.stderr)
    inside, sink, rest = total / args.rows
    damage, set_damage = None, {}
    if args.ablate_window:
        layers = model.config.num_hidden_layers
        sets = [[int(i) for i in part.split(",")] for part in args.ablate_sets.split(";") if part.strip()]
        rows = torch.stack(spans[:args.ablate_rows])
        costs = window_damage(model, rows, args.ablate_window, [[i] for i in range(layers)] + sets)
        damage = costs[:layers]
        set_damage = {",".join(map(str, s)): round(c, 4) for s, c in zip(sets, costs[layers:])}
        print(f"window damage measured ({time.time() - t0:.0f} s)", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"teacher": args.teacher, "data": args.data, "rows": args.rows, "length": args.length,
              "starts": starts.tolist(), "windows": windows,
              **{name: {str(i): dict(zip(map(str, windows), row.round(4).tolist())) for i, row in enumerate(table)}
                 for name, table in (("inside", inside), ("sink", sink), ("inside_of_rest", rest))},
              **({"ablation": {"window": args.ablate_window, "rows": args.ablate_rows,
                               "damage": {str(i): round(d, 4) for i, d in enumerate(damage)},
                               "set_damage": set_damage}} if damage is not None else {}),
              "seconds": round(time.time() - t0, 1)}
    (out / "locality.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| layer | " + " | ".join(f"inside W={w}" for w in windows) + " | sink (W=" + str(windows[-1])
          + ") | " + " | ".join(f"of the rest, W={w}" for w in windows) + " |"
          + (f" cost as a window of {args.ablate_window} |" if damage else ""))
    print("|---" * (2 * len(windows) + 2 + bool(damage)) + "|")
    for i in range(len(inside)):
        print(f"| {i} | " + " | ".join(f"{v:.3f}" for v in inside[i]) + f" | {sink[i, -1]:.3f} | "
              + " | ".join(f"{v:.3f}" for v in rest[i]) + " |" + (f" {damage[i]:+.4f} |" if damage else ""))
    for name, cost in set_damage.items():
        print(f"layers {name} as windows of {args.ablate_window}: {cost:+.4f} nats beyond {args.ablate_window}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
