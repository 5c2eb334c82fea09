"""Measured decode throughput held against the roofline with the step's writes counted, recomputed from results
files (nothing is run on a GPU: the throughput, batch and copy bandwidth are the file's, the bytes are the model's).

`jetnas.bench.costs`: a decode step reads the weights and every row's cache (the reads roofline, which the results
files report as `roofline_fraction`), and also writes every linear block's whole state and one token's KV per
attention layer. Counting those writes gives the tighter bound, `roofline_rw_fraction`.

    python benchmarks/roofline_rw.py benchmarks/results/2026-11-24_h100_engine/engine.json
    python benchmarks/roofline_rw.py results/h200_postnas_smollm2_135m/bench/bench.json \
        --model results/h200_postnas_smollm2_135m/stage2/model

An `engine.json` of `benchmarks/engine_h100.py` names its presets in each row's system ("jetnas engine: PRESET");
a `bench.json` of `jetnas bench` needs `--model` (a model directory or config.json; plain HF configs count as
all-attention). Prints a markdown table; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from jetnas.bench.costs import bytes_written_per_step


def _architecture(spec: str):
    """A jetnas model of this preset or config on the meta device (shapes only)."""
    from jetnas.models import JetNemotronConfig, JetNemotronForCausalLM
    from jetnas.models.presets import preset_config

    path = Path(spec)
    if path.exists():
        config_dir = path.parent if path.suffix == ".json" else path
        raw = json.loads((config_dir / "config.json").read_text())
        if raw.get("model_type") == JetNemotronConfig.model_type:
            config = JetNemotronConfig.from_pretrained(config_dir)
        else:  # a plain HF model: all attention, as the engine serves it
            from transformers import AutoConfig

            from jetnas.models.convert import hybrid_config

            config = hybrid_config(AutoConfig.from_pretrained(config_dir), ["attn"] * raw["num_hidden_layers"])
    else:
        config = preset_config(spec)
    with torch.device("meta"):
        return JetNemotronForCausalLM(config)


def recompute(results: dict, model: str | None = None) -> tuple[list[dict], list[str]]:
    """One row per engine measurement in `results` (an engine.json or a bench.json) whose model is known here, and
    the systems skipped (engine_h100's Qwen3-1.7B is built in that script; all attention, its writes are one
    token's KV per layer, 0.02% of its reads at 4K)."""
    from jetnas.models.presets import PRESETS

    if "copy_bandwidth_TBps" in results:  # benchmarks/engine_h100.py
        bandwidth, dtype = results["copy_bandwidth_TBps"] * 1e12, torch.bfloat16
    else:
        bandwidth = results["copy_bandwidth_bytes_per_s"]
        dtype = getattr(torch, results.get("dtype", "torch.bfloat16").removeprefix("torch."))
    written: dict[str, int] = {}
    rows, skipped = [], []
    for r in results["rows"]:
        system = r["system"]
        if not system.startswith("jetnas engine") or "decode_tokens_per_s" not in r:
            continue
        arch = model or system.partition(": ")[2]
        if not arch:
            raise ValueError(f"row {system!r} does not name its model: pass --model")
        if arch not in PRESETS and not Path(arch).exists():
            if system not in skipped:
                skipped.append(system)
            continue
        if arch not in written:
            written[arch] = bytes_written_per_step(_architecture(arch), dtype)
        b = r["batch_size"]
        moved = r["bytes_per_step"] + b * written[arch]
        rows.append({"system": system, "context_length": r["context_length"], "batch_size": b,
                     "decode_tokens_per_s": r["decode_tokens_per_s"], "roofline_fraction": r["roofline_fraction"],
                     "bytes_written_per_sequence": written[arch], "bytes_moved_per_step": moved,
                     "roofline_rw_tokens_per_s": b * bandwidth / moved,
                     "roofline_rw_fraction": r["decode_tokens_per_s"] * moved / (b * bandwidth)})
    return rows, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="an engine.json (benchmarks/engine_h100.py) or a bench.json (jetnas bench)")
    ap.add_argument("--model", help="the measured model's directory or config.json (a bench.json needs it)")
    args = ap.parse_args()
    results = json.loads(Path(args.results).read_text())
    rows, skipped = recompute(results, args.model)
    print(f"{results.get('device', '')}: decode tok/s against the reads roofline and the reads + writes roofline")
    print("| system | context | batch | decode tok/s | written / seq (MB) | reads roofline | reads + writes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['context_length']} | {r['batch_size']} | {r['decode_tokens_per_s']:,.0f} | "
              f"{r['bytes_written_per_sequence'] / 1e6:.2f} | {r['roofline_fraction']:.1%} | "
              f"{r['roofline_rw_fraction']:.1%} |")
    if skipped:
        print(f"skipped (architecture not known here): {', '.join(skipped)}")
    print(json.dumps({"results": args.results, "rows": rows, "skipped": skipped}))


if __name__ == "__main__":
    main()
