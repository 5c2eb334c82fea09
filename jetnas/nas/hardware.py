"""Hardware-aware search of the linear block's shape (PostNAS step 4, paper section 2.5 and Table 2).

Decode is memory-bound and the cache is what a step reads per sequence, so the cache size is held fixed and the
(key dim, value dim, heads) grid is searched at that size: throughput then stays about the same (the paper's nine
settings at 154 MB ran within 1% of each other) while parameters, and accuracy, vary. This module is the
bookkeeping: the shapes at a fixed state size, the choice rule, and the search (`run_hardware_search`). Training,
evaluating and measuring a shape is a callable passed in, as for the block search (`jetnas.nas.candidates`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from jetnas.files import write_json_atomic
from jetnas.layers import LINEAR_LAYERS
from jetnas.models.layer_types import BlockSpec
from jetnas.nas.candidates import log_progress, run_candidates
from jetnas.nas.ranking import TaskMetric, candidate_scores
from jetnas.nas.tables import hardware_table, search_figure


@dataclass(frozen=True)
class BlockShape:
    """Heads and per-head key / value dims of a linear block; its recurrent state is `H * K * V` numbers."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int

    @property
    def state_numbers(self) -> int:
        return self.num_heads * self.head_k_dim * self.head_v_dim

    def jet_parameters(self, hidden_size: int, conv_size: int = 4, reduction: int = 8) -> int:
        """Parameters of a JetBlock of this shape: q, k (D x HK each), v, g (D x HV each), o (HV x D), a and b
        (D x H each), the kernel generator (D x HV/r, then HV/r x HV*W + HV*W), A_log, dt_bias, o_norm."""
        D, H, K, V = hidden_size, self.num_heads, self.head_k_dim, self.head_v_dim
        value = H * V
        generator = D * (value // reduction) + (value // reduction) * value * conv_size + value * conv_size
        return 2 * D * H * K + 3 * D * value + 2 * D * H + generator + 2 * H + V

    def as_config(self) -> dict:
        """The released JetBlock config keys for this shape."""
        return {"num_heads": self.num_heads, "head_dim": self.head_k_dim, "expand_v": self.head_v_dim / self.head_k_dim}


def shapes_at_state_size(state_numbers: int, heads: Iterable[int] = (2, 4, 6, 8, 12, 16, 24, 32),
                         key_dims: Iterable[int] = (32, 48, 64, 96, 128, 192, 256), value_multiple: int = 16,
                         value_range: tuple[int, int] = (32, 1024)) -> list[BlockShape]:
    """Every (heads, key dim, value dim) whose state has exactly `state_numbers` numbers, value dims a multiple of
    `value_multiple` (kernel-friendly) within `value_range`; sorted by heads then key dim."""
    if state_numbers < 1:
        raise ValueError(f"state_numbers must be >= 1, got {state_numbers}")
    out = []
    for h in heads:
        for k in key_dims:
            if state_numbers % (h * k):
                continue
            v = state_numbers // (h * k)
            if v % value_multiple == 0 and value_range[0] <= v <= value_range[1]:
                out.append(BlockShape(h, k, v))
    return sorted(out, key=lambda s: (s.num_heads, s.head_k_dim))


def choose_shape(results: dict[BlockShape, dict], original: BlockShape, tolerance: float = 0.01,
                 accuracy: str = "accuracy", throughput: str = "decode_tokens_per_s") -> BlockShape:
    """The paper's rule: the most accurate shape whose measured throughput is within `tolerance` (a fraction) of
    the original shape's; ties go to fewer parameters when `params` is given, then to the original.

    Args:
        results: per shape, at least `{accuracy: float, throughput: float}` (and optionally "params").
        original: the shape the throughput tolerance is measured against (must be in `results`).
    """
    if original not in results:
        raise ValueError(f"the original shape {original} must be among the measured results")
    floor = (1 - tolerance) * results[original][throughput]
    eligible = [s for s, r in results.items() if r[throughput] >= floor]
    return max(eligible, key=lambda s: (results[s][accuracy], -results[s].get("params", 0), s == original))


def shape_from_kwargs(block_type: str, kwargs: Mapping, hidden_size: int) -> BlockShape:
    """The (heads, key dim, value dim) of a block from its constructor kwargs (`JetNemotronConfig.block_kwargs`).
    For Mamba2 the "key dim" is the SSM state size N and the "value dim" the head dim P (state H*N*P)."""
    if block_type == "mamba2":
        head_dim = kwargs.get("head_dim", 64)
        heads = kwargs.get("num_heads") or kwargs.get("expand", 2) * hidden_size // head_dim
        return BlockShape(heads, kwargs.get("state_size", 128), head_dim)
    if block_type not in LINEAR_LAYERS:
        raise ValueError(f"no block shape for {block_type!r}; linear blocks: {', '.join(LINEAR_LAYERS)}")
    heads = kwargs["num_heads"]
    k = kwargs.get("head_k_dim")
    v = kwargs.get("head_v_dim")
    if k is None or v is None:
        raise ValueError(f"{block_type} kwargs {dict(kwargs)} do not give head_k_dim and head_v_dim")
    return BlockShape(heads, k, v)


def shape_options(block_type: str, shape: BlockShape) -> dict:
    """The config options that give a block this shape (the keys of its `efficient_attention_config` entry)."""
    if block_type == "jet":
        return shape.as_config()
    if block_type == "mamba2":
        return {"num_heads": shape.num_heads, "state_size": shape.head_k_dim, "head_dim": shape.head_v_dim}
    return {"num_heads": shape.num_heads, "head_k_dim": shape.head_k_dim, "head_v_dim": shape.head_v_dim}


def shape_name(shape: BlockShape) -> str:
    return f"H{shape.num_heads}-K{shape.head_k_dim}-V{shape.head_v_dim}"


DEFAULT_HEADS = (2, 4, 6, 8, 12, 16, 24, 32)
DEFAULT_KEY_DIMS = (32, 48, 64, 96, 128, 192, 256)


def shape_candidates(original: BlockShape, state_numbers: int | None = None, heads: Sequence[int] | None = None,
                     key_dims: Sequence[int] | None = None, max_candidates: int | None = None,
                     value_multiple: int = 16) -> list[BlockShape]:
    """The shapes to try: every (heads, key dim, value dim) with exactly `state_numbers` recurrent-state numbers
    (default: the original's) from `jetnas.nas.hardware.shapes_at_state_size`, over the given (or default) head
    counts and key dims plus the original's own, value dims a multiple of `value_multiple` (or of the original's
    value dim, if smaller). The original is always included: it is the throughput reference of the tolerance rule.

    `max_candidates` keeps the original and an evenly spaced subset of the others (sorted by heads, key dim).
    """
    target = state_numbers if state_numbers is not None else original.state_numbers
    if target < 1:
        raise ValueError(f"state size must be >= 1 number, got {target}")
    heads = sorted(set(heads or DEFAULT_HEADS) | {original.num_heads})
    key_dims = sorted(set(key_dims or DEFAULT_KEY_DIMS) | {original.head_k_dim})
    multiple = math.gcd(value_multiple, original.head_v_dim)
    low, high = min(32, original.head_v_dim), max(1024, original.head_v_dim)
    shapes = shapes_at_state_size(target, heads, key_dims, value_multiple=multiple, value_range=(low, high))
    others = [s for s in shapes if s != original]
    if max_candidates is not None:
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        keep = max_candidates - 1
        if keep <= 0:
            others = []
        elif keep < len(others):
            step = (len(others) - 1) / max(1, keep - 1)
            others = [others[round(i * step)] for i in range(keep)] if keep > 1 else [others[len(others) // 2]]
    return sorted([original, *others], key=lambda s: (s.num_heads, s.head_k_dim))


def measurement_spread(records: Sequence[Mapping]) -> float | None:
    """The largest relative spread, (max - min) / median, of the repeated decode measurements of the shapes; None
    unless every shape was measured more than once."""
    runs = [(r.get("decode") or {}).get("decode_tokens_per_s_runs") or [] for r in records]
    if not runs or not all(len(r) > 1 for r in runs):
        return None
    return max((max(r) - min(r)) / rec["decode_tokens_per_s"] for r, rec in zip(runs, records))


def measurement_note(records: Sequence[Mapping], spread: float | None) -> str:
    if spread is None:
        return " (one measurement per shape: its noise is unknown)"
    counts = [len((r.get("decode") or {}).get("decode_tokens_per_s_runs")) for r in records]
    return f" (median of {min(counts)} measurements; largest spread {100 * spread:.1f}%)"


def floor_rule(tolerance: float, spread: float | None, floor: float, reference: float) -> str:
    """The choice rule in words, with the floor it applied: what hardware.md says, so the text and the rule agree."""
    margin = max(tolerance, spread or 0.0)
    why = f"the tolerance, {100 * tolerance:g}%"
    if margin > tolerance:
        why = (f"the tolerance of {100 * tolerance:g}% widened to the measurements' largest spread, "
               f"{100 * margin:.1f}%: a smaller difference is noise")
    def rate(v: float) -> str:
        return f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"

    return (f"Chosen: the best score among the shapes whose decode throughput is at least {rate(floor)} tok/s, "
            f"{100 * margin:.1f}% below the original's {rate(reference)} ({why}); the original, the reference, "
            f"always qualifies.")


def run_hardware_search(base: BlockSpec, shapes: Sequence[BlockShape], original: BlockShape,
                        run: Callable[[BlockSpec, Path], dict], metrics: Sequence[TaskMetric],
                        out_dir: str | Path, recipe: Mapping, tolerance: float = 0.01,
                        state_numbers: int | None = None, context_length: int | None = None,
                        log: Callable[[str], None] = log_progress) -> dict:
    """PostNAS step 4: run the block `base` at every shape (`run` trains briefly, evaluates, and measures decode
    throughput on the current device into `decode_tokens_per_s`), then choose with the paper's rule
    (`jetnas.nas.hardware.choose_shape`): the best-scoring shape whose decode throughput is within `tolerance` of
    the original's. `state_numbers` is the state size searched (default: the original's); a shape of another size
    (the original, when a budget other than its own is given) is only the throughput reference and is chosen only
    when no shape at the budget is fast enough. When every shape was measured several times and the largest spread
    of those measurements exceeds `tolerance`, the spread is the margin instead (`floor_rule`): a shape is not
    ruled out by a difference its own measurements cannot resolve.

    Writes `hardware.md` (Table-2-like), `hardware.json` and `hardware.png` under `out_dir`; returns the chosen
    shape, the options that build it (`block_config`), the table rows and the outputs.
    """
    if original not in shapes:
        raise ValueError(f"the original shape {original} must be among the shapes searched")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in [0, 1), got {tolerance}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_name = {shape_name(s): s for s in shapes}
    candidates = [base.with_options(name, **shape_options(base.block_type, s)) for name, s in by_name.items()]
    named = run_candidates(candidates, run, out, recipe, log)
    records = {by_name[name]: r for name, r in named.items()}
    for shape, r in records.items():
        if not r.get("decode_tokens_per_s"):
            raise ValueError(f"shape {shape_name(shape)}: the record has no decode_tokens_per_s measurement")
    scores_by_name = candidate_scores(named, metrics)
    scores = {by_name[n]: s for n, s in scores_by_name.items()}
    target = state_numbers if state_numbers is not None else original.state_numbers
    at_budget = {s for s in shapes if s.state_numbers == target}
    results = {s: {"accuracy": scores[s] if s in at_budget else -math.inf,
                   "decode_tokens_per_s": records[s]["decode_tokens_per_s"], "params": records[s].get("params", 0)}
               for s in shapes}
    spread = measurement_spread([records[s] for s in shapes])
    # a difference smaller than the measurements' own spread is noise: the floor is never finer than that
    margin = max(tolerance, spread or 0.0)
    chosen = choose_shape(results, original, margin)
    reference = records[original]["decode_tokens_per_s"]
    floor = (1 - margin) * reference
    table = hardware_table(records, metrics, scores, original, chosen, floor, context_length)
    (out / "hardware.md").write_text(
        f"# Hardware-aware search of the {base.name} shape (PostNAS step 4)\n\nRecurrent state fixed at {target} "
        f"numbers per layer and sequence; decode throughput measured on this device"
        f"{measurement_note([records[s] for s in shapes], spread)}. {floor_rule(tolerance, spread, floor, reference)}"
        f"\n\n{table}\n")
    rows = [{"shape": vars(s), "name": shape_name(s), "state_numbers": s.state_numbers, "score": scores[s],
             "chosen": s == chosen, "original": s == original, **records[s]} for s in shapes]
    write_json_atomic(out / "hardware.json", {"block": base.describe(), "state_numbers": target, "tolerance": tolerance,
                                        "measurement_spread": spread, "margin": margin,
                                        "floor_tokens_per_s": floor, "metrics": [vars(m) for m in metrics],
                                        "chosen": vars(chosen), "original": vars(original), "rows": rows,
                                        "recipe": recipe})
    points = [(shape_name(s), scores[s], records[s]["decode_tokens_per_s"]) for s in shapes]
    figure = search_figure(out / "hardware.png", f"{base.name} shapes at {target} state numbers per layer", points,
                           metrics, {shape_name(s): records[s] for s in shapes}, None, "decode tokens/s", vline=floor)
    print(table, file=sys.stderr)
    return {"chosen": vars(chosen), "chosen_name": shape_name(chosen), "original": vars(original),
            "state_numbers": target, "block_type": base.block_type,
            "options": {**base.kwargs, **shape_options(base.block_type, chosen)},
            "outputs": {"table": str(out / "hardware.md"), "json": str(out / "hardware.json"),
                        "figure": str(figure)}}
