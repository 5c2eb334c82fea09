"""What each layer of a trained model contributes: its token mixer knocked out, one layer at a time.

    python benchmarks/layer_ablation.py --model runs/x/stage2/model --out results/x/layer_ablation

For every layer L (or those of `--layers`), the output of L's token mixer (attention, sliding window or linear block,
`model.model.layers[L].self_attn`: jetnas hybrids and HF Llama-style teachers alike) is replaced by zeros, so the
layer adds only its MLP to the residual stream, and every task is scored again; the change against the intact model
is that layer's contribution. Issue 19 reads it on the trained hybrid to choose which linear layers may become
short sliding windows: the -lw256 run turned four GDN layers into 256-token windows by the teacher's attention
locality and the alignment residuals, and lost a third of its development mqar (31% against 46%), most of it at
short range, inside the windows' reach: neither measure could see which GDN layers held that memory.
A layer whose knock-out costs recall (retrieval `acc`, and `target_nll`, which moves where accuracy is flat) holds
memory a window of its reach must take over in training; one whose knock-out costs little does not.

Zero ablation measures necessity, not what a replacement would learn; the knocked-out model is not retrained.
Tasks are `jetnas eval`'s built-in ones (development rows: the recipes' `seed=1` retrieval rows, held-out text; never
a test set to tune on). Writes `layer_ablation.json` after every layer (a cut run keeps what it measured) and
`layer_ablation.png`; prints a table last.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the recipes' development rows (their stages' `eval_tasks`), held-out Wikipedia and the HellaSwag-form proxy
DEV_TASKS = ("retrieval:mqar@1024?n=50&seed=1,retrieval:needle@4096?n=50&seed=1,"
             "ppl:../shared/data/corpus/val.bin?tokens=16384,mc:data/dev/continuation_wiki_val.jsonl?limit=300")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (`model.model.layers`: jetnas hybrids and HF Llama-style models)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: not a decoder this script knows")
    return layers


def layer_type(model, index: int) -> str:
    """The block type of layer `index` (`attn` for a model without block types, e.g. a teacher)."""
    types = getattr(model.config, "block_types", None)
    return types[index] if types else "attn"


@contextmanager
def knocked_out(model, index: int | None):
    """Within the block, layer `index`'s token mixer outputs zeros (its residual stream gets the MLP only); None
    changes nothing. The mixer returns `(output, state)`; the state passes through untouched."""
    if index is None:
        yield
        return

    def zero(module, args, out):
        if isinstance(out, tuple):
            return (torch.zeros_like(out[0]),) + tuple(out[1:])
        return torch.zeros_like(out)

    handle = decoder_layers(model)[index].self_attn.register_forward_hook(zero)
    try:
        yield
    finally:
        handle.remove()


def score(tasks, lm) -> dict[str, dict]:
    """Each task's metrics on `lm`, with its wall seconds."""
    out = {}
    for task in tasks:
        t0 = time.perf_counter()
        out[task.name] = {**task.evaluate(lm), "seconds": round(time.perf_counter() - t0, 2)}
    return out


def primary(task, metrics: dict) -> tuple[str, float]:
    """`(name, value)` of the metric a task is read by: `acc` for accuracy tasks, `nll` for held-out text."""
    return task.primary_metric, metrics[task.primary_metric]


def ablate(model, lm, tasks, layers: list[int], on_layer=None, max_seconds: float | None = None) -> dict:
    """The intact model's scores, then each layer's knocked out; `on_layer(result)` after each (to save it), and
    no new layer once `max_seconds` have passed (the result says which layers it left out)."""
    start = time.perf_counter()
    result = {"baseline": score(tasks, lm), "layers": [], "left_out": []}
    for index in layers:
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            result["left_out"].append(index)
            continue
        with knocked_out(model, index):
            scores = score(tasks, lm)
        entry = {"layer": index, "type": layer_type(model, index), "tasks": scores, "delta": {}}
        for task in tasks:
            name, value = primary(task, scores[task.name])
            entry["delta"][task.name] = value - result["baseline"][task.name][name]
            if "target_nll" in scores[task.name]:
                entry["delta"][task.name + ":target_nll"] = (scores[task.name]["target_nll"]
                                                            - result["baseline"][task.name]["target_nll"])
        result["layers"].append(entry)
        if on_layer is not None:
            on_layer(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def table(result: dict, tasks) -> str:
    names = [t.name for t in tasks]
    head = "| layer | type | " + " | ".join(f"d {n}" for n in names) + " |"
    lines = [head, "|---|---|" + "---|" * len(names)]
    base = "| intact | | " + " | ".join(f"{primary(t, result['baseline'][t.name])[1]:.4f}" for t in tasks) + " |"
    lines.append(base)
    for e in result["layers"]:
        lines.append(f"| {e['layer']} | {e['type']} | " + " | ".join(f"{e['delta'][n]:+.4f}" for n in names) + " |")
    return "\n".join(lines)


def plot(result: dict, tasks, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"attn": "tab:red", "swa": "tab:orange"}
    fig, axes = plt.subplots(len(tasks), 1, figsize=(10, 2.2 * len(tasks)), sharex=True, squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        xs = [e["layer"] for e in result["layers"]]
        ys = [e["delta"][task.name] for e in result["layers"]]
        ax.bar(xs, ys, color=[colors.get(e["type"], "tab:blue") for e in result["layers"]])
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylabel(f"d {task.primary_metric}", fontsize=8)
        ax.set_title(f"{task.name}: intact {primary(task, result['baseline'][task.name])[1]:.4f}", fontsize=9)
    axes[-1, 0].set_xlabel("layer whose mixer is knocked out (red attn, orange swa, blue linear)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (a stage's model/) or a teacher name")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tasks", default=DEV_TASKS, help="comma-separated built-in tasks (development rows)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None, help="start no new layer after this many seconds")
    p.add_argument("--out", required=True)
    p.add_argument("--autotune-configs", type=int, default=None, metavar="N",
                   help="benchmark at most N of each Triton kernel's autotuning configs (a fresh GPU machine's first "
                        "run of new shapes: minutes less, barely slower kernels; the values are the same)")
    a = p.parse_args(argv)
    if a.autotune_configs is not None:
        if a.autotune_configs < 1:
            p.error(f"--autotune-configs={a.autotune_configs} must be >= 1")
        from jetnas.ops.autotune import limit_autotuning

        limit_autotuning(a.autotune_configs)

    from jetnas.evaluation.scoring import LanguageModel
    from jetnas.evaluation.tasks import parse_task
    from jetnas.files import write_json_atomic
    from jetnas.runner.models import load_model_and_tokenizer, resolve_device, resolve_dtype

    tasks = [parse_task(s) for s in a.tasks.split(",") if s]
    device = resolve_device(a.device)
    net, tok = load_model_and_tokenizer(a.model, a.tokenizer, device, resolve_dtype(a.dtype, device))
    n_layers = len(decoder_layers(net))
    layers = list(range(n_layers)) if a.layers == "all" else [int(x) for x in a.layers.split(",")]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        p.error(f"--layers {a.layers!r}: {bad} outside the model's {n_layers} layers")
    lm = LanguageModel.from_hf(net.eval(), tok, max_length=a.max_length, batch_size=a.batch_size, name=a.model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": a.model, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "dtype": str(next(net.parameters()).dtype), "tasks": [t.name for t in tasks],
            "ablation": "the layer's token mixer output replaced by zeros, one layer at a time, no retraining"}

    def save(result):
        write_json_atomic(out / "layer_ablation.json", {**meta, **result})
        print(f"layer {result['layers'][-1]['layer']} done ({len(result['layers'])}/{len(layers)})", file=sys.stderr)

    with torch.inference_mode():
        result = ablate(net, lm, tasks, layers, on_layer=save, max_seconds=a.max_seconds)
    write_json_atomic(out / "layer_ablation.json", {**meta, **result})
    if result["layers"]:
        plot(result, tasks, out / "layer_ablation.png")
    print(table(result, tasks))
    if result["left_out"]:
        print(f"left out (--max-seconds {a.max_seconds}): layers {result['left_out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
