"""PostNAS steps 2-4 bookkeeping (paper, sections 2.2-2.5; Tables 1 and 2): which linear block fills the layers the
placement leaves linear, which JetBlock design, and which (key dim, value dim, heads) at a fixed state size.

Pure bookkeeping, like `jetnas.nas.search`: candidates, the placement they fill, running each candidate once (a
finished candidate's record is reused when the same search runs again), ranking, and the reports. Training,
evaluating and measuring a candidate is one callable passed in, `run(candidate, candidate_dir) -> record`, so this
module never imports the trainer and is tested with fakes.

Candidate syntax (`jetnas search blocks --blocks ...`, also accepted per layer by `jetnas train --layer-types`):

| written | meaning |
|---|---|
| `gdn`, `gla`, `mamba2`, `retnet`, `deltanet`, `jet` | a linear block with its default options |
| `jet-static-qk`, `jet-dyn-qk`, ... | a named JetBlock design variant (`JET_VARIANTS`) |
| `TYPE:KEY=VALUE+KEY=VALUE` | a block with options, e.g. `jet:qk_conv=dynamic+v_conv=static`, `gla:num_heads=4` |

In a comma-separated list, options may also be separated by commas: a piece that is `KEY=VALUE` (no `:`) continues
the candidate before it, so `gdn,jet:qk_conv=dynamic,v_conv=static` is two candidates. Options of `jet` are the
released config keys plus the design options (`qk_conv`, `v_conv`: none|static|dynamic; `use_decay`,
`use_output_gate`: true|false); options of the other blocks are their constructor's arguments.

A record (what `run` returns) holds at least `tasks: {task: {metric: value}}`, and usually `train_tokens_per_s`,
`decode_tokens_per_s`, `prefill_tokens_per_s`, `cache_bytes_per_sequence`, `params`, `trainable_params`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jetnas.layers import ATTENTION_TYPES, LINEAR_LAYERS
from jetnas.layers.jet import CONV_KINDS
from jetnas.nas.hardware import BlockShape, choose_shape, shapes_at_state_size

DEFAULT_BLOCKS = "gdn,gla,mamba2,retnet,deltanet,jet"

#: named JetBlock design variants (PostNAS step 3): where the dynamic convolution sits, and the static Q/K convs
JET_VARIANTS: dict[str, dict] = {
    # the design: dynamic conv on V, no conv on Q/K
    "jet": {},
    # the design plus Gated DeltaNet's static short convs on Q and K ("with static Q/K convolutions")
    "jet-static-qk": {"qk_conv": "static"},
    # the dynamic conv moved to Q/K, V keeps a static short conv
    "jet-dyn-qk": {"qk_conv": "dynamic", "v_conv": "static"},
    # dynamic convs everywhere
    "jet-dyn-qkv": {"qk_conv": "dynamic"},
    # no dynamic conv at all: a static conv on V only (Gated DeltaNet without its Q/K convs)
    "jet-static-v": {"v_conv": "static"},
}
#: options a `jet` candidate accepts: the released config keys and the design options
JET_OPTIONS = ("num_heads", "head_dim", "expand_v", "conv_size", "dconv_generator_reduction", "norm_eps", "qk_conv",
               "v_conv", "use_decay", "use_output_gate")
_REPEAT = re.compile(r"^(.+)\*(\d+)$")


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def block_options(block_type: str) -> tuple[str, ...]:
    """The option names a candidate of `block_type` accepts."""
    if block_type == "jet":
        return JET_OPTIONS
    params = inspect.signature(LINEAR_LAYERS[block_type].__init__).parameters
    return tuple(p for p in params if p not in ("self", "hidden_size", "backend"))


@dataclass(frozen=True)
class BlockCandidate:
    """One linear block to try: a display name, the layer type, and its options (the block's entry of the model
    config's `efficient_attention_config`)."""

    name: str
    block_type: str
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.block_type not in LINEAR_LAYERS:
            raise ValueError(f"candidate {self.name!r}: {self.block_type!r} is not a linear block; known: "
                             f"{', '.join(LINEAR_LAYERS)}")
        allowed = block_options(self.block_type)
        for key, value in self.options:
            if key not in allowed:
                raise ValueError(f"candidate {self.name!r}: {self.block_type} has no option {key!r}; its options: "
                                 f"{', '.join(allowed)}")
            if key in ("qk_conv", "v_conv") and value not in CONV_KINDS:
                raise ValueError(f"candidate {self.name!r}: {key}={value!r} must be one of {', '.join(CONV_KINDS)}")
            if key in ("use_decay", "use_output_gate") and not isinstance(value, bool):
                raise ValueError(f"candidate {self.name!r}: {key}={value!r} must be true or false")

    @property
    def kwargs(self) -> dict:
        return dict(self.options)

    def block_config(self) -> dict:
        """`{block_type: options}` for `efficient_attention_config` (empty without options)."""
        return {self.block_type: self.kwargs} if self.options else {}

    def with_options(self, name: str, **options) -> BlockCandidate:
        """The same block with more (or overriding) options, under a new name."""
        return BlockCandidate(name, self.block_type, tuple({**self.kwargs, **options}.items()))

    @property
    def slug(self) -> str:
        """A file-system-safe form of the name (the candidate's directory)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip("-")

    def describe(self) -> dict:
        return {"name": self.name, "block_type": self.block_type, "options": self.kwargs}


def parse_candidate(text: str) -> BlockCandidate:
    """One candidate from its written form (see the module docstring)."""
    text = text.strip()
    head, sep, rest = text.partition(":")
    if head in JET_VARIANTS:
        block_type, options = "jet", dict(JET_VARIANTS[head])
    elif head in LINEAR_LAYERS:
        block_type, options = head, {}
    elif head in ATTENTION_TYPES:
        raise ValueError(f"{head!r} is softmax attention, not a linear block candidate")
    else:
        raise ValueError(f"unknown block candidate {head!r} in {text!r}; use a linear block "
                         f"({', '.join(LINEAR_LAYERS)}), a JetBlock variant ({', '.join(JET_VARIANTS)}) or "
                         f"TYPE:KEY=VALUE+KEY=VALUE")
    if sep:
        for item in (p.strip() for p in rest.replace(",", "+").split("+")):
            key, eq, value = item.partition("=")
            if not eq or not key or not value:
                raise ValueError(f"candidate {text!r}: option {item!r} is not KEY=VALUE")
            options[key.strip()] = _parse_value(value.strip())
    name = head if not sep else f"{head}:" + "+".join(p.strip() for p in rest.replace(",", "+").split("+"))
    return BlockCandidate(name, block_type, tuple(options.items()))


def split_entries(spec: str) -> list[str]:
    """Split a comma-separated list where a `KEY=VALUE` piece (no `:`) continues the entry before it."""
    entries: list[str] = []
    for piece in (p.strip() for p in spec.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece:
            if not entries or ":" not in entries[-1]:
                raise ValueError(f"option {piece!r} in {spec!r} follows no TYPE:OPTIONS entry")
            entries[-1] += "+" + piece
        else:
            entries.append(piece)
    return entries


#: per block type, the options that give it the teacher's attention shape (heads x head_dim for keys and values:
#: the defaults of gdn, deltanet, gla and retnet) where its own default differs: the JetBlock's value dim is
#: 2 x head_dim (expand_v, as released) and Mamba2's width 2 x hidden (expand)
MATCHED_SHAPE: dict[str, dict] = {"jet": {"expand_v": 1.0}, "mamba2": {"expand": 1}}
#: options that set a block's shape (a candidate giving any of them keeps its own)
SHAPE_KEYS = {"num_heads", "head_dim", "head_k_dim", "head_v_dim", "expand_v", "expand", "state_size"}


def matched_shape(candidate: BlockCandidate) -> BlockCandidate:
    """The candidate at the teacher's attention shape, so that block selection compares blocks, not sizes: every
    candidate then holds the same recurrent state per layer and inherits the attention's q/k/v/o (a JetBlock with
    value dim 2 x head_dim cannot inherit v and o; in the 2026-12-02 H200 run it had 2x GDN's state and fresh v/o,
    and trailed GDN). A candidate that sets a shape option itself is left as it is."""
    extra = MATCHED_SHAPE.get(candidate.block_type)
    if not extra or SHAPE_KEYS & set(candidate.kwargs):
        return candidate
    return BlockCandidate(candidate.name, candidate.block_type, tuple({**candidate.kwargs, **extra}.items()))


def parse_candidates(spec: str | Sequence[str]) -> list[BlockCandidate]:
    """Candidates from a comma-separated list (or a list of written forms); names must be distinct."""
    entries = split_entries(spec) if isinstance(spec, str) else [str(s) for s in spec]
    candidates = [parse_candidate(e) for e in entries]
    if not candidates:
        raise ValueError(f"no block candidates in {spec!r}")
    names = [c.name for c in candidates]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"block candidates {duplicates} are listed twice")
    slugs = [c.slug for c in candidates]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"block candidates {names} collide as directory names {slugs}")
    return candidates


def merge_block_configs(*configs: Mapping | None) -> dict:
    """Merge `efficient_attention_config` overrides: later ones win per key within each block type."""
    out: dict[str, dict] = {}
    for config in configs:
        for block, options in (config or {}).items():
            if not isinstance(options, Mapping):
                raise ValueError(f"block config entry {block!r} must be a mapping of options, got {options!r}")
            out[block] = {**out.get(block, {}), **options}
    return out


def resolve_layer_types(spec: str | Sequence[str], num_layers: int) -> tuple[list[str], dict]:
    """Per-layer types and the block options they imply, from `attn,swa,jet-dyn-qk*12,...`: each entry is `attn`,
    `swa` or a block candidate (see the module docstring), `ENTRY*N` repeats; a preset name gives its layout.

    Returns `(layer types, efficient_attention_config overrides)`. All layers of one type share its options, so two
    different variants of one type in one model are an error.
    """
    from jetnas.models.convert import parse_layer_types
    from jetnas.models.presets import PRESETS

    if isinstance(spec, str) and spec in PRESETS:
        return parse_layer_types(spec, num_layers), {}
    entries = split_entries(spec) if isinstance(spec, str) else [str(s) for s in spec]
    types: list[str] = []
    config: dict[str, dict] = {}
    owner: dict[str, str] = {}
    for entry in entries:
        m = _REPEAT.match(entry)
        body, count = (m.group(1), int(m.group(2))) if m else (entry, 1)
        if body in ATTENTION_TYPES:
            types += [body] * count
            continue
        cand = parse_candidate(body)
        if cand.block_type in owner and config.get(cand.block_type, {}) != cand.kwargs:
            raise ValueError(f"layer types {spec!r} mix two variants of {cand.block_type!r} ({owner[cand.block_type]!r}"
                             f" and {cand.name!r}); all {cand.block_type} layers of a model share one configuration")
        owner[cand.block_type] = cand.name
        if cand.options:
            config[cand.block_type] = cand.kwargs
        types += [cand.block_type] * count
    if len(types) != num_layers:
        raise ValueError(f"layer types {spec!r} give {len(types)} layers but the model has {num_layers}")
    return types, config


# ---------------------------------------------------------------------------------------------------------------
# the placement a candidate fills


@dataclass
class Placement:
    """Which layers stay softmax attention: per layer "attn", "swa" or "linear", and where it came from."""

    choices: list[str]
    source: str
    swa_window: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def attn(self) -> list[int]:
        return [i for i, c in enumerate(self.choices) if c == "attn"]

    @property
    def swa(self) -> list[int]:
        return [i for i, c in enumerate(self.choices) if c == "swa"]

    def layer_types(self, block_type: str) -> list[str]:
        """The placement with `block_type` in every linear layer."""
        return [block_type if c == "linear" else c for c in self.choices]

    def describe(self) -> dict:
        return {"source": self.source, "attn": self.attn, "swa": self.swa, "swa_window": self.swa_window,
                **self.info}


def _supernet_window(path: Path) -> int | None:
    """The sliding window of the super-network a placements.json was searched on, when it sits where `jetnas search
    placement` (`<supernet>/search-*/`) or `jetnas run` (`<run>/supernet/`, `<run>/placement/`) put it."""
    for candidate in (path.parent.parent / "supernet.json", path.parent.parent / "supernet" / "supernet.json"):
        if candidate.exists():
            return json.loads(candidate.read_text()).get("spec", {}).get("swa_window")
    return None


def read_placement(placement: str, num_layers: int, swa_window: int | None = None) -> Placement:
    """The placement to fill: a `placements.json` written by `jetnas search placement` (its best-ranked entry), or
    a layer-types string (`attn`/`swa` entries kept, every other entry becomes linear).

    `swa_window` (when the placement has `swa` layers): given, else the placements file's own, else that of the
    super-network the file was searched on (found next to it), else an error.
    """
    path = Path(placement).expanduser()
    if placement.endswith(".json") or path.is_file():
        if not path.exists():
            raise FileNotFoundError(f"placement file {placement!r} does not exist")
        data = json.loads(path.read_text())
        ranked = data.get("ranked") or []
        if ranked:
            best = ranked[0]
            spec = best.get("layer_types")
            info = {"budget": data.get("budget"), "rank": best.get("rank", 1)}
        elif "layer_types" in data:
            spec, info = data["layer_types"], {}
        else:
            raise ValueError(f"placement file {placement!r} has neither 'ranked' placements nor 'layer_types'")
        if isinstance(spec, list):
            spec = ",".join(spec)
        types = [t.strip() for t in spec.split(",")] if spec else []
        choices = [t if t in ATTENTION_TYPES else "linear" for t in types]
        window = swa_window or data.get("swa_window") or _supernet_window(path)
        source = str(path)
    else:
        types, _ = resolve_layer_types(placement, num_layers)
        choices = [t if t in ATTENTION_TYPES else "linear" for t in types]
        window, info, source = swa_window, {}, "layer types"
    if len(choices) != num_layers:
        raise ValueError(f"placement {placement!r} has {len(choices)} layers but the teacher has {num_layers}")
    if "swa" in choices and not window:
        layers = [i for i, c in enumerate(choices) if c == "swa"]
        raise ValueError(f"placement {placement!r} has sliding-window layers {layers} but no window size: pass "
                         f"--swa-window")
    return Placement(choices, source, int(window) if window and "swa" in choices else None, info)


# ---------------------------------------------------------------------------------------------------------------
# running candidates (each once), ranking


@dataclass(frozen=True)
class TaskMetric:
    """The metric of a task that tables show and the search ranks by."""

    task: str
    metric: str
    higher_is_better: bool = True


def fingerprint(recipe: Mapping) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    tmp.replace(path)


def _log(msg: str) -> None:
    print(f"jetnas: {msg}", file=sys.stderr, flush=True)


def _fingerprint_of(path: Path) -> str | None:
    return json.loads(path.read_text()).get("fingerprint")


def run_candidates(candidates: Sequence[BlockCandidate], run: Callable[[BlockCandidate, Path], dict],
                   out_dir: str | Path, recipe: Mapping, log: Callable[[str], None] = _log) -> dict[str, dict]:
    """Run every candidate once: `run(candidate, out_dir/candidates/<slug>)` returns its record, written to
    `result.json` there. A candidate whose `result.json` was written under the same `recipe` (everything that
    decides the result: data, steps, learning rate, seed, tasks...) is reused; one written under another recipe is
    stale, and its directory is cleared and run again. An unfinished candidate's directory is left to `run` (the
    trainer resumes from its checkpoints). Returns `{name: record}` in candidate order."""
    root = Path(out_dir) / "candidates"
    records = {}
    for index, cand in enumerate(candidates):
        cdir = root / cand.slug
        result_path = cdir / "result.json"
        stamp = fingerprint({"recipe": recipe, "candidate": cand.describe()})
        if result_path.exists():
            saved = json.loads(result_path.read_text())
            if saved.get("fingerprint") == stamp:
                log(f"[{index + 1}/{len(candidates)}] {cand.name}: finished earlier, reusing {result_path}")
                records[cand.name] = saved["record"]
                continue
            log(f"[{index + 1}/{len(candidates)}] {cand.name}: {result_path} is from a different recipe; rerunning")
            shutil.rmtree(cdir)
        elif (cdir / "recipe.json").exists() and _fingerprint_of(cdir / "recipe.json") != stamp:
            log(f"[{index + 1}/{len(candidates)}] {cand.name}: unfinished run of a different recipe; starting over")
            shutil.rmtree(cdir)
        cdir.mkdir(parents=True, exist_ok=True)
        _write_json(cdir / "recipe.json", {"fingerprint": stamp, "recipe": recipe, "candidate": cand.describe()})
        log(f"[{index + 1}/{len(candidates)}] {cand.name}: running")
        record = {**run(cand, cdir), **cand.describe()}
        _write_json(result_path, {"fingerprint": stamp, "record": record})
        records[cand.name] = record
    return records


def candidate_scores(records: Mapping[str, dict], metrics: Sequence[TaskMetric]) -> dict[str, float]:
    """Per candidate, the mean over tasks of its min-max normalised metric among the candidates (1 = best, 0 =
    worst on that task, direction-aware). Tasks on which all candidates tie cannot rank and are left out; with
    none left every score is 0."""
    scores = {name: 0.0 for name in records}
    used = 0
    for m in metrics:
        values = {name: r["tasks"][m.task][m.metric] for name, r in records.items()}
        lo, hi = min(values.values()), max(values.values())
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            continue
        used += 1
        for name, v in values.items():
            frac = (v - lo) / (hi - lo)
            scores[name] += frac if m.higher_is_better else 1 - frac
    return {name: s / used if used else 0.0 for name, s in scores.items()}


def rank(records: Mapping[str, dict], scores: Mapping[str, float]) -> list[str]:
    """Names best first: by score, then decode throughput, then training throughput, then name."""
    def key(name):
        r = records[name]
        return (-scores[name], -(r.get("decode_tokens_per_s") or 0.0), -(r.get("train_tokens_per_s") or 0.0), name)

    return sorted(records, key=key)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def _mb(n) -> str:
    return "" if n is None else f"{n / 1e6:.3g}"


def block_table(records: Mapping[str, dict], metrics: Sequence[TaskMetric], scores: Mapping[str, float],
                reference: dict | None = None, context_length: int | None = None) -> str:
    """The Table-1-like markdown: one row per candidate, best first, then the teacher reference."""
    at = f" @ {context_length}" if context_length else ""
    header = (["rank", "block"] + [f"{m.task} {m.metric} {'↑' if m.higher_is_better else '↓'}" for m in metrics]
              + ["score ↑", "train tok/s", f"decode tok/s{at}", "params (M)", "trained (M)", f"cache/seq (MB){at}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label, r, position, score):
        cells = [position, label] + [_fmt(r["tasks"][m.task][m.metric]) for m in metrics]
        cells += [score, _fmt(r.get("train_tokens_per_s"), 5), _fmt(r.get("decode_tokens_per_s"), 5),
                  _mb(r.get("params")), _mb(r.get("trainable_params")), _mb(r.get("cache_bytes_per_sequence"))]
        lines.append("| " + " | ".join(cells) + " |")

    for position, name in enumerate(rank(records, scores), 1):
        row(f"`{name}`", records[name], str(position), f"{scores[name]:.3f}")
    if reference is not None:
        row("teacher (full attention)", reference, "", "")
    return "\n".join(lines)


def _figure(path: Path, title: str, points: list[tuple[str, float, float | None]], metrics: Sequence[TaskMetric],
            records: Mapping[str, dict], reference: dict | None, x_label: str, vline: float | None = None) -> Path:
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
    for ax, m in zip(axes[0][1:], metrics):
        values = [records[n]["tasks"][m.task][m.metric] for n in names]
        ax.bar(range(len(names)), values, color=[colors[n] for n in names])
        if reference is not None:
            ax.axhline(reference["tasks"][m.task][m.metric], color="black", linestyle="--", linewidth=1,
                       label="teacher")
            ax.legend(fontsize=7)
        low, high = min(values), max(values)
        if reference is not None:
            low, high = min(low, reference["tasks"][m.task][m.metric]), max(high, reference["tasks"][m.task][m.metric])
        pad = 0.15 * (high - low) or 0.1 * max(abs(high), 1.0)
        # metrics like NLL differ in the third digit: zoom onto the range the candidates span
        ax.set_ylim(max(0.0, low - pad) if low >= 0 else low - pad, high + pad)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{m.task}: {m.metric} {'↑' if m.higher_is_better else '↓'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_block_search(candidates: Sequence[BlockCandidate], run: Callable[[BlockCandidate, Path], dict],
                     metrics: Sequence[TaskMetric], out_dir: str | Path, recipe: Mapping,
                     reference: Callable[[Path], dict] | None = None, context_length: int | None = None,
                     log: Callable[[str], None] = _log) -> dict:
    """PostNAS step 2 (and 3, with JetBlock variants among the candidates): run every candidate with the same
    recipe, rank them, and write `blocks.md` (Table-1-like), `blocks.json` and `blocks.png` under `out_dir`.

    Args:
        candidates: from `parse_candidates`.
        run: `(candidate, directory) -> record` (trains, evaluates and measures one candidate).
        metrics: the task metrics ranked by (`candidate_scores`).
        recipe: everything that decides a record; a finished candidate is reused only under the same recipe.
        reference: `(directory) -> record` for the teacher (same tasks, same measurement), shown for comparison.
        context_length: the context of the throughput and cache columns (for the headers).
    Returns a summary: `best` (candidate name), its `block_type` and `options`, the ranking and the outputs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = run_candidates(candidates, run, out, recipe, log)
    ref = None
    if reference is not None:
        ref_dir = out / "teacher"
        ref_path = ref_dir / "result.json"
        stamp = fingerprint({"recipe": recipe, "reference": "teacher"})
        if ref_path.exists() and json.loads(ref_path.read_text()).get("fingerprint") == stamp:
            ref = json.loads(ref_path.read_text())["record"]
        else:
            ref_dir.mkdir(parents=True, exist_ok=True)
            log("teacher reference: evaluating")
            ref = reference(ref_dir)
            _write_json(ref_path, {"fingerprint": stamp, "record": ref})
    scores = candidate_scores(records, metrics)
    order = rank(records, scores)
    table = block_table(records, metrics, scores, ref, context_length)
    (out / "blocks.md").write_text(
        f"# Linear block selection (PostNAS step 2)\n\nSame placement, data, tokens, learning rate and seed for every "
        f"candidate. Score: mean over tasks of the min-max normalised metric among the candidates (1 = best).\n\n"
        f"{table}\n")
    _write_json(out / "blocks.json", {
        "metrics": [vars(m) for m in metrics], "ranked": order, "scores": scores, "records": records,
        "teacher": ref, "recipe": recipe})
    points = [(n, scores[n], records[n].get("decode_tokens_per_s") or records[n].get("train_tokens_per_s"))
              for n in order]
    measured = any(records[n].get("decode_tokens_per_s") for n in order)
    figure = _figure(out / "blocks.png", "Linear block candidates: quality vs speed", points, metrics, records, ref,
                     "decode tokens/s" if measured else "training tokens/s")
    print(table, file=sys.stderr)
    best = records[order[0]]
    return {"best": order[0], "block_type": best["block_type"], "options": best["options"], "ranked": order,
            "scores": scores,
            "outputs": {"table": str(out / "blocks.md"), "json": str(out / "blocks.json"), "figure": str(figure)}}


# ---------------------------------------------------------------------------------------------------------------
# hardware-aware shape search (step 4)


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


def hardware_table(records: Mapping[BlockShape, dict], metrics: Sequence[TaskMetric],
                   scores: Mapping[BlockShape, float], original: BlockShape, chosen: BlockShape, floor: float,
                   context_length: int | None = None) -> str:
    """The Table-2-like markdown: one row per shape."""
    at = f" @ {context_length}" if context_length else ""
    header = (["d_k", "d_v", "heads", "params (M)", "state/layer", f"cache/seq (MB){at}", f"decode tok/s{at}",
               "vs original"] + [f"{m.task} {m.metric} {'↑' if m.higher_is_better else '↓'}" for m in metrics]
              + ["score ↑", ""])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = records[original]["decode_tokens_per_s"]
    for shape, r in records.items():
        tps = r["decode_tokens_per_s"]
        notes = [n for n, ok in (("**chosen**", shape == chosen), ("original", shape == original),
                                 ("below floor", tps < floor)) if ok]
        cells = [str(shape.head_k_dim), str(shape.head_v_dim), str(shape.num_heads), _mb(r.get("params")),
                 str(shape.state_numbers), _mb(r.get("cache_bytes_per_sequence")), _fmt(tps, 5),
                 f"{100 * (tps / base - 1):+.1f}%" if base else ""]
        cells += [_fmt(r["tasks"][m.task][m.metric]) for m in metrics] + [f"{scores[shape]:.3f}", ", ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_hardware_search(base: BlockCandidate, shapes: Sequence[BlockShape], original: BlockShape,
                        run: Callable[[BlockCandidate, Path], dict], metrics: Sequence[TaskMetric],
                        out_dir: str | Path, recipe: Mapping, tolerance: float = 0.01,
                        state_numbers: int | None = None, context_length: int | None = None,
                        log: Callable[[str], None] = _log) -> dict:
    """PostNAS step 4: run the block `base` at every shape (`run` trains briefly, evaluates, and measures decode
    throughput on the current device into `decode_tokens_per_s`), then choose with the paper's rule
    (`jetnas.nas.hardware.choose_shape`): the best-scoring shape whose decode throughput is within `tolerance` of
    the original's. `state_numbers` is the state size searched (default: the original's); a shape of another size
    (the original, when a budget other than its own is given) is only the throughput reference and is chosen only
    when no shape at the budget is fast enough.

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
    chosen = choose_shape(results, original, tolerance)
    floor = (1 - tolerance) * records[original]["decode_tokens_per_s"]
    table = hardware_table(records, metrics, scores, original, chosen, floor, context_length)
    measured = "measured on this device"
    runs = [(records[s].get("decode") or {}).get("decode_tokens_per_s_runs") or [] for s in shapes]
    if all(len(r) > 1 for r in runs):
        spread = max((max(r) - min(r)) / records[s]["decode_tokens_per_s"] for s, r in zip(shapes, runs))
        measured += f" (median of {min(map(len, runs))} measurements; largest spread {100 * spread:.1f}%)"
    (out / "hardware.md").write_text(
        f"# Hardware-aware search of the {base.name} shape (PostNAS step 4)\n\nRecurrent state fixed at {target} "
        f"numbers per layer and sequence; decode throughput {measured}. Chosen: the best score among "
        f"shapes within {100 * tolerance:g}% of the original's decode throughput (floor {floor:,.1f} tok/s).\n\n"
        f"{table}\n")
    rows = [{"shape": vars(s), "name": shape_name(s), "state_numbers": s.state_numbers, "score": scores[s],
             "chosen": s == chosen, "original": s == original, **records[s]} for s in shapes]
    _write_json(out / "hardware.json", {"block": base.describe(), "state_numbers": target, "tolerance": tolerance,
                                        "floor_tokens_per_s": floor, "metrics": [vars(m) for m in metrics],
                                        "chosen": vars(chosen), "original": vars(original), "rows": rows,
                                        "recipe": recipe})
    points = [(shape_name(s), scores[s], records[s]["decode_tokens_per_s"]) for s in shapes]
    figure = _figure(out / "hardware.png", f"{base.name} shapes at {target} state numbers per layer", points,
                     metrics, {shape_name(s): records[s] for s in shapes}, None, "decode tokens/s", vline=floor)
    print(table, file=sys.stderr)
    return {"chosen": vars(chosen), "chosen_name": shape_name(chosen), "original": vars(original),
            "state_numbers": target, "block_type": base.block_type,
            "options": {**base.kwargs, **shape_options(base.block_type, chosen)},
            "outputs": {"table": str(out / "hardware.md"), "json": str(out / "hardware.json"),
                        "figure": str(figure)}}
