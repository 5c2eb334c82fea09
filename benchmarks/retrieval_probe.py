"""The placement search's retrieval row from the windowed-teacher probe, on the teacher alone (no trained
super-network needed: retrieval goes through the probe, which never runs the linear paths).

    OMP_NUM_THREADS=1 python benchmarks/retrieval_probe.py --task retrieval:needle@2048 --rows 6 \\
        --window 512 --sinks 4 --sets '23,28;7,18;7,18,23;18' --out results/cpu_retrieval_probe

Runs `jetnas.nas.placement.run_placement_search` with a budget of `--attn` full-attention layers (default 1 with
beam width 1: the level is the one-layer row itself; `--attn 2` adds the beam's second level, every pair that holds
the best layer) through `ProbedEvaluator`, so `heatmap.png`, `placements.json` and
`comparison.md` are the search's own outputs; then scores the given full-attention sets through the same evaluator.
The super-network around the teacher has untrained GLA paths: no task here reads them. Writes `probe.json` (per
layer and per set: accuracy, answer NLL, fraction of the all-windowed -> teacher gap closed) and `row.png`; prints
a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def plot_row(result: dict, out: Path) -> Path:
    """`row.png`: per layer, the share of the all-windowed -> teacher answer-NLL gap closed with only that layer
    full; right of it the given sets, labelled with their accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row, sets = result["one_layer"], result["sets"]
    L = len(row)
    xs = list(range(L)) + [L + 1 + j for j in range(len(sets))]
    values = [r["nll_gap_closed"] for r in row] + [s["nll_gap_closed"] for s in sets]
    colors = ["tab:blue"] * L + ["tab:orange"] * len(sets)
    fig, ax = plt.subplots(figsize=(12, 3.8), dpi=130)
    ax.bar(xs, values, color=colors)
    for x, r in zip(xs, row + sets):
        ax.text(x, max(r["nll_gap_closed"], 0) + 0.01, f"{r['acc']:.2f}", ha="center", va="bottom", fontsize=6,
                rotation=90)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(xs, [str(i) for i in range(L)] + ["{" + ",".join(map(str, s["full"])) + "}" for s in sets],
                  fontsize=7, rotation=0)
    for label in ax.get_xticklabels()[L:]:
        label.set_rotation(45)
    ax.set_ylim(min(min(values), 0) - 0.02, 1.12)
    ax.set_xlabel(f"full attention at (blue: that layer alone; orange: sets); every other layer: teacher attention "
                  f"windowed to {result['window']} + {result['sinks']} sinks", fontsize=8)
    ax.set_ylabel("answer-NLL gap closed\n(0 all windowed, 1 teacher)", fontsize=8)
    ax.set_title(f"{result['task']}: windowed-teacher probe, {result['rows']} rows of seed {result['seed']}; "
                 f"labels: accuracy (teacher {result['references']['teacher']['acc']:.2f}, all windowed "
                 f"{result['references']['all windowed']['acc']:.2f})", fontsize=9)
    fig.tight_layout()
    path = out / "row.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--task", default="retrieval:needle@2048")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--sets", default="23,28;7,18;7,18,23;18", help="full-attention sets to score, ';'-separated")
    parser.add_argument("--attn", type=int, default=1,
                        help="the search's budget of full-attention layers (1: the level is the one-layer row)")
    parser.add_argument("--beam-width", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prefix-gb", type=float, default=4.0, help="layer inputs kept for prefix reuse (GB)")
    parser.add_argument("--out", default="results/cpu_retrieval_probe")
    parser.add_argument("--replot", action="store_true", help="only redraw row.png from the out dir's probe.json")
    args = parser.parse_args(argv)
    if args.replot:
        plot_row(json.loads((Path(args.out) / "probe.json").read_text()), Path(args.out))
        return 0

    import torch

    from jetnas.nas.objectives import ProbedEvaluator, build_search_tasks
    from jetnas.nas.placement import run_placement_search
    from jetnas.nas.probe import PROBE_SEED
    from jetnas.nas.sampling import Budget
    from jetnas.nas.search import make_candidate
    from jetnas.nas.supernet import SuperNetSpec, build_supernet

    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net, tok, _ = build_supernet(SuperNetSpec(args.teacher, "gla", swa_window=args.window))
    tasks = build_search_tasks([args.task], rows=args.rows)
    length = tasks[0].task.length
    evaluator = ProbedEvaluator(net, tok, tasks, args.window, args.sinks, batch_size=args.batch_size,
                                max_length=length + 64, prefix_bytes=int(args.prefix_gb * (1 << 30)))
    name = tasks[0].name
    L = net.num_layers
    with torch.no_grad():
        summary = run_placement_search(evaluator, Budget(attn=args.attn, swa=0), args.beam_width, out,
                                       linear_type="gla")
    search_seconds = time.time() - started
    placements = json.loads((out / "placements.json").read_text())

    def scores(layers):
        res = evaluator.results(make_candidate(L, attn=layers))[name]
        return {"acc": res["acc"], "target_nll": res["target_nll"], "n": res["n"]}

    low, high = scores([]), scores(list(range(L)))

    def closed(s):
        return (low["target_nll"] - s["target_nll"]) / (low["target_nll"] - high["target_nll"])

    one_layer = [{"layer": i, **scores([i])} for i in range(L)]
    for r in one_layer:
        r["nll_gap_closed"] = closed(r)
    sets = []
    with torch.no_grad():
        for text in [s for s in args.sets.split(";") if s.strip()]:
            layers = sorted(int(x) for x in text.split(","))
            s = scores(layers)
            sets.append({"full": layers, **s, "nll_gap_closed": closed(s)})
    result = {
        "task": name, "rows": args.rows, "seed": PROBE_SEED, "window": args.window, "sinks": args.sinks,
        "teacher": args.teacher, "far_tokens": evaluator.describe()["far_tokens"].get(name),
        "metric_ranked": placements["metrics"][name], "fallback_to_secondary": placements["fallback_to_secondary"],
        "references": {"all windowed": low, "teacher": high}, "one_layer": one_layer, "sets": sets,
        "search_summary": {k: summary[k] for k in ("placement", "objective", "evaluations", "layer_passes")},
        "layer_passes": evaluator.layers_run, "seconds_search": search_seconds, "seconds": time.time() - started,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/retrieval_probe.py", *(argv or sys.argv[1:])]),
    }
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    plot_row(result, out)
    print(f"{name}, window {args.window} + {args.sinks} sinks, {args.rows} rows (seed {PROBE_SEED}); "
          f"all windowed acc {low['acc']:.2f} NLL {low['target_nll']:.3f}; teacher acc {high['acc']:.2f} "
          f"NLL {high['target_nll']:.3f}")
    print("| full attention at | acc | answer NLL | NLL gap closed |\n|---|---|---|---|")
    for r in sorted(one_layer, key=lambda r: r["target_nll"]):
        print(f"| {r['layer']} | {r['acc']:.2f} | {r['target_nll']:.3f} | {r['nll_gap_closed']:+.3f} |")
    for s in sets:
        print(f"| {{{', '.join(map(str, s['full']))}}} | {s['acc']:.2f} | {s['target_nll']:.3f} | "
              f"{s['nll_gap_closed']:+.3f} |")
    print(json.dumps({"out": str(out), "seconds": round(result["seconds"], 1), "layer_passes": evaluator.layers_run,
                      "best_layer": min(one_layer, key=lambda r: r["target_nll"])["layer"],
                      "sets": {",".join(map(str, s["full"])): round(s["target_nll"], 3) for s in sets}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
