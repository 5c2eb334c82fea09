"""The tables and figures of the searches: for the placement search (step 1) the per-layer importance heat-map
and the comparison table; for block selection (steps 2-3) and the shape search (step 4) a Table-1-like and a
Table-2-like markdown table and one figure each (score against throughput, then one bar panel per task metric)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from jetnas.nas.ranking import TaskMetric, rank

if TYPE_CHECKING:  # the shape search (jetnas.nas.hardware) imports this module
    from jetnas.nas.hardware import BlockShape


def _fmt(value, digits: int = 3) -> str:
    """A table cell: floats to `digits` significant digits (3: the searches' short runs differ by noise in the
    fourth; a loss of 11.06 against 11.07 is one number), large ones with thousands separators."""
    if value is None:
        return ""
    if isinstance(value, float):
        rounded = float(f"{value:.{digits}g}")
        if abs(rounded) >= 10 ** digits:
            return f"{rounded:,.0f}"
        # trailing zeros kept (11.0 next to 11.1, not 11): a column shows one precision
        text = f"{value:#.{digits}g}"
        return text.rstrip(".") if "e" not in text else f"{value:.{digits}g}"
    return str(value)


def _plain_ticks(ax, axes: str = "xy") -> None:
    """Tick labels of `axes` as plain numbers: a panel zoomed onto a narrow range otherwise gets matplotlib's offset
    notation (`+1.106e1` above ticks reading 0.001), which nobody can read."""
    from matplotlib.ticker import ScalarFormatter

    for axis in [a for name, a in (("x", ax.xaxis), ("y", ax.yaxis)) if name in axes]:
        if axis.get_scale() == "linear":
            formatter = ScalarFormatter(useOffset=False)
            formatter.set_scientific(False)
            axis.set_major_formatter(formatter)


def _mb(n) -> str:
    return "" if n is None else f"{n / 1e6:.3g}"


def block_table(records: Mapping[str, dict], metrics: Sequence[TaskMetric], scores: Mapping[str, float],
                reference: dict | None = None, context_length: int | None = None) -> str:
    """The Table-1-like markdown: one row per candidate, best first, then the teacher reference."""
    at = f" @ {context_length}" if context_length else ""
    header = (["rank", "block"] + [f"{short_task_name(m.task)} {m.metric} {'↑' if m.higher_is_better else '↓'}"
                                   for m in metrics]
              + ["score ↑", "train tok/s", f"decode tok/s{at}", "params (M)", "trained (M)", f"cache/seq (MB){at}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label, r, position, score):
        cells = [position, label] + [_fmt(r["tasks"][m.task][m.metric]) for m in metrics]
        cells += [score, _fmt(r.get("train_tokens_per_s")), _fmt(r.get("decode_tokens_per_s")),
                  _mb(r.get("params")), _mb(r.get("trainable_params")), _mb(r.get("cache_bytes_per_sequence"))]
        lines.append("| " + " | ".join(cells) + " |")

    for position, name in enumerate(rank(records, scores), 1):
        row(f"`{name}`", records[name], str(position), f"{scores[name]:.2f}")
    if reference is not None:
        row("teacher (full attention)", reference, "", "")
    return "\n".join(lines)


def search_figure(path: Path, title: str, points: list[tuple[str, float, float | None]],
                  metrics: Sequence[TaskMetric], records: Mapping[str, dict], reference: dict | None, x_label: str,
                  vline: float | None = None) -> Path:
    """Score vs throughput (one labelled point per candidate), then one bar panel per task metric (the teacher as a
    dashed line); each candidate keeps its colour across panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(records)
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(6 + 3.2 * len(metrics), 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1.7] + [1] * len(metrics)})
    ax = axes[0][0]
    shown = [(label, score, x) for label, score, x in points if x is not None]
    xs, ys = [p[2] for p in shown], [p[1] for p in shown]
    span_x, span_y = (max(xs) - min(xs) or 1.0) if xs else 1.0, (max(ys) - min(ys) or 1.0) if ys else 1.0
    placed: list[tuple[float, float]] = []
    for label, score, x in shown:
        ax.scatter([x], [score], s=45, color=colors[label])
        # a label whose point sits next to an earlier labelled one goes below its point, not over the other label
        near = any(abs(x - px) < 0.15 * span_x and abs(score - py) < 0.05 * span_y for px, py in placed)
        placed.append((x, score))
        ax.annotate(label, (x, score), textcoords="offset points", xytext=(4, -11 if near else 4), fontsize=8)
    if vline is not None:
        ax.axvline(vline, color="grey", linestyle="--", linewidth=1, label="throughput floor")
        ax.legend(fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel("score (mean normalised task metric)")
    ax.set_title(title, fontsize=10)
    _plain_ticks(ax)
    for ax, m in zip(axes[0][1:], metrics):
        values = [records[n]["tasks"][m.task][m.metric] for n in names]
        ax.bar(range(len(names)), values, color=[colors[n] for n in names])
        teacher = reference["tasks"][m.task][m.metric] if reference is not None else None
        if teacher is not None:
            ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
            ax.legend(fontsize=7)
        low, high = min(values + ([teacher] if teacher is not None else [])), max(
            values + ([teacher] if teacher is not None else []))
        pad = 0.15 * (high - low) or 0.1 * max(abs(high), 1.0)
        # metrics like NLL differ in the third digit: zoom onto the range the candidates span
        ax.set_ylim(max(0.0, low - pad) if low >= 0 else low - pad, high + pad)
        if len(set(values)) == 1:
            # bars of one height (often all 0: no candidate found a needle) look like an empty panel: say why
            ax.text(0.5, 0.5, f"every candidate: {_fmt(float(values[0]))}\n(no difference to show)",
                    transform=ax.transAxes, ha="center", va="center", fontsize=8, color="dimgray")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        _plain_ticks(ax, "y")
        ax.set_title(f"{short_task_name(m.task)}: {m.metric} {'↑' if m.higher_is_better else '↓'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def hardware_table(records: Mapping[BlockShape, dict], metrics: Sequence[TaskMetric],
                   scores: Mapping[BlockShape, float], original: BlockShape, chosen: BlockShape, floor: float,
                   context_length: int | None = None) -> str:
    """The Table-2-like markdown: one row per shape."""
    at = f" @ {context_length}" if context_length else ""
    header = (["d_k", "d_v", "heads", "params (M)", "state/layer", f"cache/seq (MB){at}", f"decode tok/s{at}",
               "vs original"] + [f"{short_task_name(m.task)} {m.metric} {'↑' if m.higher_is_better else '↓'}"
                                 for m in metrics]
              + ["score ↑", ""])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = records[original]["decode_tokens_per_s"]
    for shape, r in records.items():
        tps = r["decode_tokens_per_s"]
        notes = [n for n, ok in (("**chosen**", shape == chosen), ("original", shape == original),
                                 ("below floor", tps < floor)) if ok]
        cells = [str(shape.head_k_dim), str(shape.head_v_dim), str(shape.num_heads), _mb(r.get("params")),
                 str(shape.state_numbers), _mb(r.get("cache_bytes_per_sequence")), _fmt(tps),
                 f"{100 * (tps / base - 1):+.1f}%" if base else ""]
        cells += [_fmt(r["tasks"][m.task][m.metric]) for m in metrics] + [f"{scores[shape]:.2f}", ", ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        if max(row) == min(row):
            # one colour across the row: no single layer moved this task, which the colour alone does not say
            ax.text((L - 1) / 2, r, "no one-layer network differs on this task", ha="center", va="center",
                    color="white", fontsize=8)
            continue
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
        cells = [f"{_fmt(float(e['metrics'][t]))} ({e['fractions'][t]:+.2f})" for t in task_names]
        lines.append(f"| {name} | {layer_ranges(e['attn'])} | {layer_ranges(e['swa'])} | " + " | ".join(cells)
                     + f" | {e['combined']:.2f} |")
    return "\n".join(lines)


def layer_ranges(layers: Sequence[int]) -> str:
    """Layer indices as runs: `[0, 1, ..., 29]` -> `0-29`, `[3, 8, 9, 10]` -> `3, 8-10`, `[]` -> `none`."""
    if not layers:
        return "none"
    ordered = sorted(layers)
    runs, start = [], ordered[0]
    for prev, cur in zip(ordered, ordered[1:] + [None]):
        if cur is None or cur != prev + 1:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(runs)
