"""Figures and tables of the placement search: the per-layer importance heat-map and the comparison table."""

from __future__ import annotations

from pathlib import Path


def short_task_name(name: str) -> str:
    """`mc:/data/bench/mmlu_dev.jsonl` -> `mc:mmlu_dev` for figure labels and table headers."""
    kind, sep, rest = name.partition(":")
    if not sep or "/" not in rest and "." not in rest.split("?")[0]:
        return name
    stem = Path(rest.split("?")[0]).name
    for suffix in (".gz", ".jsonl", ".json", ".txt", ".bin"):
        stem = stem.removesuffix(suffix)
    return f"{kind}:{stem}"


def heatmap(rows: dict[str, list[float]], out_path: str | Path, title: str) -> Path:
    """A PNG with one row per task and one column per layer; cell = score with only that layer as attention
    (fraction of the all-linear -> teacher gap closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = list(rows.values())
    names = [short_task_name(n) for n in rows]
    L = len(data[0])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.38 * L + 2.5), 0.55 * len(names) + 1.6), dpi=150)
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(L), [str(i) for i in range(L)], fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("layer kept as full attention (all others linear)")
    ax.set_title(title, fontsize=9)
    for r, row in enumerate(data):
        best = max(range(L), key=row.__getitem__)
        ax.text(best, r, "*", ha="center", va="center", color="white", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.02, label="fraction of gap to teacher closed")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def comparison_table(entries: dict[str, dict], task_names: list[str]) -> str:
    """Markdown: one row per placement (searched / uniform / one-layer ranking / references), the layers it keeps,
    each task's raw metric and gap fraction, and the combined objective."""
    head = "| placement | attn | swa | " + " | ".join(map(short_task_name, task_names)) + " | combined |"
    lines = [head, "|---|---|---|" + "---|" * (len(task_names) + 1)]
    for name, e in entries.items():
        cells = [f"{e['metrics'][t]:.4g} ({e['fractions'][t]:+.2f})" for t in task_names]
        lines.append(f"| {name} | {e['attn']} | {e['swa']} | " + " | ".join(cells) + f" | {e['combined']:.3f} |")
    return "\n".join(lines)
