"""Which of the teacher's attention layers (and heads) carry retrieval? Measured on the evaluation's own rows.

    OMP_NUM_THREADS=1 python benchmarks/retrieval_layers.py --device cpu --rows 10 \\
        --lengths needle=2048,kv=1024,mqar=1024 --out results/cpu_teacher_retrieval_layers

Rows come from `jetnas.evaluation.tasks.RetrievalTask` (what `retrieval:KIND@LENGTH` scores), teacher-forced in one
forward per row. At every position that predicts an answer token (the value's digits), the answer is copied from
one *source* token in the context: the same digit in the fact that states the value ("The special magic number
for X is 1234567."). Three measurements:

1. **Attention scores** per layer and head, averaged over answer tokens: `copy` (Wu et al. 2024's retrieval score:
   how often the head's argmax-attended token is the source token), `mass` (attention probability on the source
   token) and `span_mass` (on all of the value's tokens in the fact).
2. **Per-layer sliding-window ablation** (`--ablate`, default the needle task): one layer at a time, its attention
   limited to the last `--window` tokens (causal band, what a SWA layer sees), every other layer untouched; the
   teacher's answer accuracy and answer NLL on the rows whose source lies more than `--window` tokens before the
   answer (nearer answers cannot be hurt by the window). Layers before the ablated one are not recomputed: their
   output is kept from the unablated pass.
3. **Placement proxies**: every layer limited to the window *except* a set S (S = the current placement,
   the top layers of 1. and of 2.), on every task; and the top heads of 1. zeroed, against as many other heads.

Accuracy is the evaluation's: an answer counts when greedy decoding reproduces all its tokens. The full row is
encoded once; each answer's context must encode to a prefix of it, which is checked (a row where it does not is
an error), and `--check-official N` scores the first N answers of each task through jetnas's own
`score_continuations` and compares. Writes `retrieval_layers.json`, `heads.png` (layer x head `copy` per task) and
`ablation.png` (per-layer ablation effect); prints a short table and, last, one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

PROBE = "jetnas_retrieval_probe"
KINDS = ("needle", "kv", "mqar")


# ---------------------------------------------------------------------------------------------------------------
# rows: where the answers are and where they are copied from


@dataclass
class Row:
    """One task row, tokenised once. Positions index `ids`.

    Attributes:
        ids: token ids of the whole row (context, answers teacher-forced).
        answers: per answer, `(first, last)` token positions (inclusive) of its tokens in `ids`.
        queries: per scored answer token (non-whitespace), the position that predicts it (its position - 1).
        sources: per scored answer token, the position of the same token in the stated fact.
        spans: per scored answer token, the positions of the whole value in the stated fact.
        answer_of: per scored answer token, the index of its answer.
    """

    ids: list[int]
    answers: list[tuple[int, int]]
    queries: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    spans: list[list[int]] = field(default_factory=list)
    answer_of: list[int] = field(default_factory=list)

    def distance(self, answer: int) -> int:
        """Tokens between an answer's first predicting position and its first source token."""
        k = self.answer_of.index(answer)
        return self.queries[k] - self.sources[k]


def source_start(context: str, answer: str) -> int:
    """Character offset in `context` of the value that `answer` repeats.

    The query restates the fact's key: the context ends with "... The special magic number for X is" (needle,
    kv: the text after the question's "? ") or "\\nbig cat is" (mqar: the last line). The source is the first place
    where that key is followed by the answer; that place must come before the query.

    Raises:
        ValueError: the key followed by the answer does not occur before the query.
    """
    line = context[context.rfind("\n") + 1:]
    key = line[line.rfind("? ") + 2:] if "? " in line else line
    at = context.find(key + answer)
    if at < 0 or at >= len(context) - len(line):
        raise ValueError(f"the answer {answer!r} after the key {key!r} is not stated before the query")
    return at + len(key)


def tokenise_row(tokenizer, segments: list[tuple[str, bool]]) -> Row:
    """A `RetrievalTask` row (`(text, is_answer)` segments) as one token sequence with its answer and source
    positions. Each answer's context must encode to a prefix of the whole row (so scoring the row at once equals
    scoring each answer as the evaluation does, one request per answer)."""
    text = "".join(t for t, _ in segments)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]

    def token_at(char: int) -> int:
        for i, (a, b) in enumerate(offsets):
            if a <= char < b:
                return i
        raise ValueError(f"no token covers character {char}")

    row = Row(ids, [])
    context = ""
    for text_, is_answer in segments:
        if is_answer:
            # the evaluation encodes the context (trailing spaces moved into the answer: none here) on its own
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            if ids[: len(ctx)] != ctx:
                raise ValueError(f"answer {len(row.answers)}: its context does not encode to a prefix of the row")
            first = len(ctx)
            last = token_at(len(context) + len(text_) - 1)
            number = len(row.answers)
            row.answers.append((first, last))
            src = source_start(context, text_)
            span = sorted({token_at(src + c) for c in range(len(text_)) if not text_[c].isspace()})
            for pos in range(first, last + 1):
                a, b = offsets[pos]
                if not text[a:b].strip():
                    continue  # the leading space: every value in the row follows one, nothing to retrieve
                row.queries.append(pos - 1)
                row.sources.append(token_at(src + a - len(context)))
                row.spans.append(span)
                row.answer_of.append(number)
        context += text_
    return row


# ---------------------------------------------------------------------------------------------------------------
# scoring attention rows


def score_attention(probs: torch.Tensor, sources: torch.Tensor, spans: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per-head retrieval scores of attention rows at the answer-predicting positions.

    Args:
        probs: `[L, H, P, T]` float attention probabilities of P query positions over T keys, L layers, H heads.
        sources: `[P]` int64 key position each query's answer token is copied from.
        spans: P lists of key positions: each query's whole value in the stated fact.

    Returns:
        `{"copy", "mass", "span_mass"}`, each `[L, H]` float32, averaged over the P queries: the fraction whose
        argmax key is the source (ties go to the first maximum), the probability on the source, the probability
        on the span.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be [L, H, P, T], got shape {tuple(probs.shape)}")
    n_layers, n_heads, p, t = probs.shape
    if sources.shape != (p,) or len(spans) != p:
        raise ValueError(f"sources {tuple(sources.shape)} and spans ({len(spans)}) must have P={p} entries")
    if p and (int(sources.max()) >= t or int(sources.min()) < 0):
        raise ValueError(f"sources must lie in [0, {t}), got {sources.tolist()}")
    probs = probs.float()
    copy = (probs.argmax(-1) == sources).float().mean(-1)
    mass = probs.gather(-1, sources.view(1, 1, p, 1).expand(n_layers, n_heads, p, 1))[..., 0].mean(-1)
    span_mask = torch.zeros(p, t)
    for i, s in enumerate(spans):
        span_mask[i, s] = 1.0
    span_mass = (probs * span_mask).sum(-1).mean(-1)
    return {"copy": copy, "mass": mass, "span_mass": span_mass}


def rank_layers(values: list[float], k: int) -> list[int]:
    """The `k` layers with the largest values, largest first (ties: the lower layer first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


# ---------------------------------------------------------------------------------------------------------------
# the probe: attention with per-layer windows, zeroed heads and recorded rows


@dataclass
class Probe:
    """What the registered attention function does, per call of `forward_row`.

    Attributes:
        windows: layer -> window W (the query attends to keys q - W < k <= q); absent: full causal attention.
        sinks: windowed layers also see the first `sinks` tokens (StreamingLLM's attention sinks; 0: a plain
            window, what jetnas's sliding-window layers compute).
        zero_heads: layer -> heads whose output is zeroed before `o_proj`.
        record: query positions whose attention probabilities are kept (None: none kept).
        records: layer -> `[H, P, T]` probabilities, filled by the forward.
    """

    windows: dict[int, int] = field(default_factory=dict)
    sinks: int = 0
    zero_heads: dict[int, list[int]] = field(default_factory=dict)
    record: torch.Tensor | None = None
    records: dict[int, torch.Tensor] = field(default_factory=dict)


_ACTIVE: list[Probe] = [Probe()]


@contextmanager
def probing(probe: Probe):
    _ACTIVE.append(probe)
    try:
        yield probe
    finally:
        _ACTIVE.pop()


def band_mask(t: int, window: int | None, device=None, sinks: int = 0) -> torch.Tensor:
    """`[T, T]` bool: query i sees key j when j <= i and (window None or i - j < window or j < sinks)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    keep = j <= i
    return keep if window is None else keep & ((i - j < window) | (j < sinks))


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function (`[B, H, T, K]` inputs, `[B, T, H, V]` output) for unpadded causal
    batches: SDPA with the probe's window for this layer, its heads zeroed, its recorded rows kept."""
    probe, layer = _ACTIVE[-1], module.layer_idx
    t = query.shape[2]
    window = probe.windows.get(layer)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    mask = band_mask(t, window, query.device, probe.sinks) if window or probe.record is not None else None
    if window is None or window >= t:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=groups > 1)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
    if probe.record is not None:
        q = query[:, :, probe.record]  # [B, H, P, K]
        k = key.repeat_interleave(groups, dim=1)
        logits = (q.float() @ k.float().transpose(-1, -2)) * scale
        keep = mask[probe.record]
        probe.records[layer] = logits.masked_fill(~keep, float("-inf")).softmax(-1)[0]
    heads = probe.zero_heads.get(layer)
    if heads:
        out = out.clone()
        out[:, heads] = 0.0
    return out.transpose(1, 2).contiguous(), None


def install_probe(model) -> None:
    """Route the model's attention through `probe_attention` (registered once with transformers)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE, probe_attention)
    model.set_attn_implementation(PROBE)


@torch.no_grad()
def forward_row(model, ids: torch.Tensor, positions: torch.Tensor, start: int = 0, hidden: torch.Tensor | None = None,
                keep_inputs: bool = False):
    """Run the decoder layers `start..` of a Llama-style model on `ids [1, T]` (from `hidden`, the input of layer
    `start`, when start > 0) and return `(log-probs [P, V] at positions, inputs)`: `inputs[i]` is the input of
    layer i when `keep_inputs` (else empty)."""
    base = model.model
    position_ids = torch.arange(ids.shape[1], device=ids.device)[None]
    h = base.embed_tokens(ids) if start == 0 else hidden
    rope = base.rotary_emb(h, position_ids=position_ids)
    inputs = []
    for layer in base.layers[start:]:
        if keep_inputs:
            inputs.append(h)
        h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=position_ids)
    h = base.norm(h[0, positions])
    return F.log_softmax(model.lm_head(h).float(), -1), inputs


def answer_metrics(logp: torch.Tensor, row: Row, answers: list[int] | None = None) -> dict[str, float]:
    """Greedy exact match and mean per-token NLL of `row`'s answers (all their tokens), from `logp [P, V]` at
    every answer token's predicting position (in answer order), like `RetrievalTask.evaluate`."""
    correct, nll, n = 0, 0.0, 0
    i = 0
    for a, (first, last) in enumerate(row.answers):
        width = last - first + 1
        targets = torch.tensor(row.ids[first: last + 1])
        lp = logp[i: i + width]
        i += width
        if answers is not None and a not in answers:
            continue
        correct += bool((lp.argmax(-1) == targets).all())
        nll += float(-lp.gather(-1, targets[:, None]).mean())
        n += 1
    return {"correct": correct, "nll_sum": nll, "n": n}


def predict_positions(row: Row) -> torch.Tensor:
    """Positions predicting every answer token (the whitespace ones too), in answer order."""
    return torch.tensor([p - 1 for first, last in row.answers for p in range(first, last + 1)])


def add(total: dict, part: dict) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


def summary(total: dict) -> dict:
    n = max(total.get("n", 0), 1)
    return {"acc": total.get("correct", 0) / n, "nll": total.get("nll_sum", 0.0) / n, "n": total.get("n", 0)}


# ---------------------------------------------------------------------------------------------------------------
# the experiment


def make_rows(kind: str, length: int, count: int, window: int, tokenizer, far_only: bool):
    """`count` rows of `retrieval:KIND@LENGTH` (the evaluation's generator, its seed 0, row i from its rng i),
    tokenised; with `far_only`, the first rows whose answers all lie more than `window` tokens after their source
    (the needle: its depth is random), else the first `count`."""
    from jetnas.evaluation.scoring import LanguageModel
    from jetnas.evaluation.tasks import parse_task

    task = parse_task(f"retrieval:{kind}@{length}")
    lm = LanguageModel(logits=None, tokenizer=tokenizer, max_length=length)
    maker = {"kv": task._kv, "needle": task._needle, "mqar": task._mqar}[kind]
    rows, index = [], []
    for i in range(200):
        if len(rows) == count:
            break
        row = tokenise_row(tokenizer, maker(random.Random(f"{task.seed}-{i}"), lm))
        if far_only and min(row.distance(a) for a in range(len(row.answers))) <= window:
            continue
        rows.append(row)
        index.append(i)
    return rows, index


def far_answers(row: Row, window: int) -> list[int]:
    return [a for a in range(len(row.answers)) if row.distance(a) > window]


def run(args) -> dict:
    from jetnas.models.teachers import load_teacher

    torch.manual_seed(0)
    model, tokenizer, _ = load_teacher(args.teacher, device=args.device)
    install_probe(model)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    lengths = dict(item.split("=") for item in args.lengths.split(","))
    result = {"teacher": args.teacher, "window": args.window, "rows": args.rows, "tasks": {}, "device": args.device,
              "threads": torch.get_num_threads(), "current_placement": args.current}
    started = time.time()
    tasks = {}
    for kind, length in lengths.items():
        if kind not in KINDS:
            raise ValueError(f"--lengths: kind must be one of {KINDS}, got {kind!r}")
        far = kind == "needle"  # one answer per row at a random depth: keep the rows a window cannot reach
        rows, index = make_rows(kind, int(length), args.rows, args.window, tokenizer, far)
        tasks[kind] = rows
        # 1. unablated pass: accuracy, NLL and attention rows at the answer positions
        total, total_far, probs, src, spans, dists, seconds = {}, {}, [], [], [], [], []
        for row in rows:
            ids = torch.tensor([row.ids], device=args.device)
            t0 = time.time()
            with probing(Probe(record=torch.tensor(row.queries))) as probe:
                logp, _ = forward_row(model, ids, predict_positions(row).to(args.device))
            seconds.append(time.time() - t0)
            add(total, answer_metrics(logp, row))
            add(total_far, answer_metrics(logp, row, far_answers(row, args.window)))
            probs.append(torch.stack([probe.records[i] for i in range(n_layers)]).cpu())
            src += row.sources
            spans += row.spans
            dists += [row.distance(a) for a in range(len(row.answers))]
        width = max(p.shape[-1] for p in probs)
        probs = torch.cat([F.pad(p, (0, width - p.shape[-1])) for p in probs], dim=2)
        scores = score_attention(probs, torch.tensor(src), spans)
        result["tasks"][kind] = {
            "task": f"retrieval:{kind}@{length}", "row_index": index, "answers": sum(len(r.answers) for r in rows),
            "tokens_per_row": [len(r.ids) for r in rows], "source_distance": dists,
            "teacher": summary(total), "teacher_far": summary(total_far),
            "seconds_per_forward": sum(seconds) / len(seconds),
            "scores": {k: v.tolist() for k, v in scores.items()},
            "layer_copy_max": scores["copy"].max(-1).values.tolist(),
            "layer_mass_sum": scores["mass"].sum(-1).tolist()}
        print(f"{kind}@{length}: {len(rows)} rows (generator rows {index}), teacher acc "
              f"{summary(total)['acc']:.3f} nll {summary(total)['nll']:.3f}; far answers "
              f"{summary(total_far)['n']} acc {summary(total_far)['acc']:.3f}; "
              f"{sum(seconds) / len(seconds):.1f} s/forward", flush=True)
    if args.check_official:
        result["official_check"] = official_check(model, tokenizer, lengths, args)

    # 2. per-layer sliding-window ablation on the far answers
    for kind in args.ablate.split(",") if args.ablate else []:
        rows = tasks[kind]
        per_layer = [{} for _ in range(n_layers)]
        for r, row in enumerate(rows):
            ids = torch.tensor([row.ids], device=args.device)
            pos = predict_positions(row).to(args.device)
            keep = far_answers(row, args.window)
            with probing(Probe()):
                _, inputs = forward_row(model, ids, pos, keep_inputs=True)
            for layer in range(n_layers):
                with probing(Probe(windows={layer: args.window})):
                    logp, _ = forward_row(model, ids, pos, start=layer, hidden=inputs[layer])
                add(per_layer[layer], answer_metrics(logp, row, keep))
            print(f"  ablation {kind}: row {r + 1}/{len(rows)} ({time.time() - started:.0f} s)", flush=True)
        base = result["tasks"][kind]["teacher_far"]
        result["tasks"][kind]["layer_ablation"] = [
            {"layer": i, **summary(s), "acc_drop": base["acc"] - summary(s)["acc"],
             "nll_rise": summary(s)["nll"] - base["nll"]} for i, s in enumerate(per_layer)]

    # 3. placement proxies: all layers windowed except S (with and without sinks); greedy selection of S
    sets = {"none (all windowed)": [], f"current {args.current}": parse_layers(args.current)}
    ablate = args.ablate.split(",")[0] if args.ablate else None
    for kind, info in result["tasks"].items():
        for k in (2, 3):
            sets[f"top{k} copy ({kind})"] = sorted(rank_layers(info["layer_copy_max"], k))
    effect = None
    if ablate:
        effect = [a["nll_rise"] + 10 * a["acc_drop"] for a in result["tasks"][ablate]["layer_ablation"]]
        for k in (2, 3):
            sets[f"top{k} ablation"] = sorted(rank_layers(effect, k))
    for extra in args.sets.split(";") if args.sets else []:
        sets[f"given {extra}"] = parse_layers(extra)
    sinks = sorted(int(x) for x in args.sinks.split(","))  # the greedy selection reuses the last one's cache
    cache = SetCache(model, tasks, args.window, n_layers, args.device)
    result["sets"] = []

    def run_set(layers, names, sink, kinds=None):
        entry = {"names": names, "full_layers": list(layers), "sinks": sink, "tasks": {}}
        for kind in kinds or tasks:
            entry["tasks"][kind] = cache.evaluate(kind, list(layers), sink)
        result["sets"].append(entry)
        print(f"  full attention only at {list(layers)}, sinks {sink} ({', '.join(names)}): " +
              ", ".join(f"{k} {v['acc']:.2f}/{v['nll']:.2f}" for k, v in entry["tasks"].items()), flush=True)
        return entry

    unique = {}
    for name, layers in sets.items():
        unique.setdefault(tuple(layers), []).append(name)
    for sink in sinks:
        for layers, names in unique.items():
            # without sinks, only the two reference sets (the windowed layers lose their attention sink: the whole
            # model degrades, not retrieval alone; shown once for scale)
            if sink == max(sinks) or layers in ((), tuple(parse_layers(args.current))):
                run_set(layers, names, sink)
    if ablate and args.greedy_steps:
        result["greedy"] = greedy_selection(cache, ablate, effect, result["tasks"][ablate]["layer_copy_max"], args)
        chosen = result["greedy"]["chosen"]
        for k in range(2, len(chosen) + 1):
            run_set(sorted(chosen[:k]), [f"greedy first {k}"], max(sinks))

    result["heads"] = head_ablation(model, tasks, result, args, n_heads)
    result["seconds"] = time.time() - started
    return result


class SetCache:
    """Rows scored with every layer windowed except a set S. Layers below min(S) are windowed in every such
    configuration, so each row's inputs to every layer under the all-windowed model are computed once per sink
    count and each set restarts from its lowest full layer (bit-identical to the full forward: same ops)."""

    def __init__(self, model, tasks, window, n_layers, device):
        self.model, self.tasks, self.window, self.n_layers, self.device = model, tasks, window, n_layers, device
        self.inputs: dict[tuple[str, int, int], list[torch.Tensor]] = {}

    def windows(self, layers) -> dict[int, int]:
        return {i: self.window for i in range(self.n_layers) if i not in layers}

    def evaluate(self, kind: str, layers: list[int], sinks: int, rows: int | None = None) -> dict:
        total = {}
        for r, row in enumerate(self.tasks[kind][:rows]):
            ids = torch.tensor([row.ids], device=self.device)
            pos = predict_positions(row).to(self.device)
            key = (kind, r, sinks)
            if key not in self.inputs and any(k[2] != sinks for k in self.inputs):
                self.inputs.clear()  # one sink count at a time: a 2,048-token row's inputs take 141 MB
            if key not in self.inputs:
                with probing(Probe(windows=self.windows([]), sinks=sinks)):
                    _, self.inputs[key] = forward_row(self.model, ids, pos, keep_inputs=True)
            start = min(layers) if layers else self.n_layers - 1
            with probing(Probe(windows=self.windows(layers), sinks=sinks)):
                logp, _ = forward_row(self.model, ids, pos, start=start, hidden=self.inputs[key][start])
            add(total, answer_metrics(logp, row, far_answers(row, self.window)))
        return summary(total)


def greedy_selection(cache: SetCache, kind: str, effect: list[float], copy: list[float], args) -> dict:
    """Forward selection of full-attention layers, every other layer windowed (with `max(--sinks)` sinks): start
    from none, add the candidate that lowers the far answers' NLL most, `--greedy-steps` times, on the first
    `--greedy-rows` rows. Candidates: the `--greedy-candidates` layers best ranked by the per-layer ablation and
    by the copy score (alternating, so both rankings contribute)."""
    by_effect, by_copy = rank_layers(effect, len(effect)), rank_layers(copy, len(copy))
    candidates = []
    for a, b in zip(by_effect, by_copy):
        for layer in (a, b):
            if layer not in candidates and len(candidates) < args.greedy_candidates:
                candidates.append(layer)
    sink = max(int(x) for x in args.sinks.split(","))
    chosen, steps = [], []
    for step in range(args.greedy_steps):
        trials = {}
        for layer in candidates:
            if layer not in chosen:
                trials[layer] = cache.evaluate(kind, sorted(chosen + [layer]), sink, args.greedy_rows)
        best = min(trials, key=lambda c: (-trials[c]["acc"], trials[c]["nll"]))
        chosen.append(best)
        steps.append({"added": best, "set": sorted(chosen), "trials": {str(k): v for k, v in trials.items()}})
        print(f"  greedy step {step + 1}: add layer {best} -> full at {sorted(chosen)}: acc {trials[best]['acc']:.2f}"
              f" nll {trials[best]['nll']:.2f} (candidates " +
              ", ".join(f"L{k} {v['nll']:.2f}" for k, v in sorted(trials.items())) + ")", flush=True)
    return {"task": kind, "rows": args.greedy_rows, "sinks": sink, "candidates": candidates, "chosen": chosen,
            "steps": steps}


def head_ablation(model, tasks, result, args, n_heads) -> list[dict]:
    """Zero the top `k` heads by `copy` (summed over tasks), and `k` heads drawn at random from the rest."""
    copy = sum(torch.tensor(info["scores"]["copy"]) for info in result["tasks"].values())
    order = sorted(((float(copy[l, h]), l, h) for l in range(copy.shape[0]) for h in range(n_heads)), reverse=True)
    rng = random.Random(0)
    out = []
    for k in args.heads:
        top = [(l, h) for _, l, h in order[:k]]
        rest = [(l, h) for _, l, h in order[k:]]
        for name, chosen in (("top", top), ("random", rng.sample(rest, k))):
            zero: dict[int, list[int]] = {}
            for l, h in chosen:
                zero.setdefault(l, []).append(h)
            entry = {"which": name, "k": k, "heads": chosen, "tasks": {}}
            for kind, rows in tasks.items():
                total = {}
                for row in rows:
                    with probing(Probe(zero_heads=zero)):
                        logp, _ = forward_row(model, torch.tensor([row.ids], device=args.device),
                                              predict_positions(row).to(args.device))
                    add(total, answer_metrics(logp, row))
                entry["tasks"][kind] = summary(total)
            out.append(entry)
            print(f"  {k} {name} heads zeroed: " +
                  ", ".join(f"{k_} {v['acc']:.2f}/{v['nll']:.2f}" for k_, v in entry["tasks"].items()), flush=True)
    return out


def official_check(model, tokenizer, lengths, args) -> dict:
    """The first `--check-official` answers of each task scored by jetnas's `score_continuations` (the evaluation's
    scorer, with the model's own attention) against this script's single-forward scoring."""
    from jetnas.evaluation.scoring import LanguageModel, score_continuations
    from jetnas.evaluation.tasks import parse_task

    out = {}
    for kind, length in lengths.items():
        task = parse_task(f"retrieval:{kind}@{length}?n=1")
        lm = LanguageModel.from_hf(model, tokenizer, max_length=int(length))
        segments = task.make_rows(lm)[0]
        requests, context = [], ""
        for text, is_answer in segments:
            if is_answer:
                requests.append((context, text))
            context += text
        requests = requests[: args.check_official]
        model.set_attn_implementation("sdpa")
        official = score_continuations(lm, requests)
        install_probe(model)
        row = tokenise_row(tokenizer, segments)
        with probing(Probe()):
            logp, _ = forward_row(model, torch.tensor([row.ids], device=args.device),
                                  predict_positions(row).to(args.device))
        mine = []
        for a in range(len(requests)):
            m = answer_metrics(logp, row, [a])
            mine.append({"greedy": bool(m["correct"]), "nll": m["nll_sum"]})
        theirs = [{"greedy": s.is_greedy, "nll": -s.logprob / s.num_tokens} for s in official]
        gap = max(abs(a["nll"] - b["nll"]) for a, b in zip(mine, theirs))
        agree = all(a["greedy"] == b["greedy"] for a, b in zip(mine, theirs))
        out[kind] = {"answers": len(requests), "greedy_agree": agree, "max_nll_gap": gap}
        print(f"  official scorer vs this script, {kind}: {len(requests)} answers, greedy agree {agree}, "
              f"max NLL gap {gap:.2e}", flush=True)
    return out


def parse_layers(text: str) -> list[int]:
    return sorted(int(x) for x in text.split(",") if x.strip())


# ---------------------------------------------------------------------------------------------------------------
# report


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 7), squeeze=False)
    for ax, (kind, info) in zip(axes[0], tasks.items()):
        copy = torch.tensor(info["scores"]["copy"])
        im = ax.imshow(copy.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
        ax.set_title(f"{info['task'].split(':')[1]}\nteacher acc {info['teacher']['acc']:.2f}", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(0, copy.shape[0], 2))
        for layer in parse_layers(result["current_placement"]):
            ax.axhline(layer, color="red", lw=0.6, ls=":")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.6, label="copy score (argmax on the source token)")
    fig.suptitle("teacher attention heads: retrieval (copy) score; red dotted: the current full-attention layers",
                 fontsize=9)
    fig.savefig(out / "heads.png", dpi=120)
    plt.close(fig)

    ablated = [(k, v) for k, v in tasks.items() if "layer_ablation" in v]
    if not ablated:
        return
    fig, axes = plt.subplots(len(ablated), 1, figsize=(10, 3.2 * len(ablated)), squeeze=False)
    for ax, (kind, info) in zip(axes[:, 0], ablated):
        rows = info["layer_ablation"]
        layers = [r["layer"] for r in rows]
        ax.bar([x - 0.2 for x in layers], [r["acc_drop"] for r in rows], 0.4, label="accuracy drop")
        ax2 = ax.twinx()
        ax2.bar([x + 0.2 for x in layers], [r["nll_rise"] for r in rows], 0.4, color="tab:orange",
                label="answer NLL rise (nats/token)")
        ax.set_xticks(layers)
        ax.set_xlabel("layer limited to a sliding window (all others full)")
        ax.set_ylabel("accuracy drop")
        ax2.set_ylabel("NLL rise")
        ax.set_title(f"{info['task']}: one layer at a time limited to {result['window']} tokens; "
                     f"teacher acc {info['teacher_far']['acc']:.2f} on {info['teacher_far']['n']} far answers",
                     fontsize=9)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles, ["accuracy drop", "answer NLL rise"], fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)
    plt.close(fig)


def table(result: dict) -> str:
    lines = []
    for info in result["tasks"].values():
        top = sorted(((v, l, h) for l, row in enumerate(info["scores"]["copy"]) for h, v in enumerate(row)),
                     reverse=True)[:6]
        lines.append(f"{info['task']}: teacher acc {info['teacher']['acc']:.3f} ({info['teacher']['n']} answers); "
                     f"top copy heads " + ", ".join(f"L{l}H{h} {v:.2f}" for v, l, h in top))
        if "layer_ablation" in info:
            worst = sorted(info["layer_ablation"], key=lambda a: -(a["nll_rise"] + 10 * a["acc_drop"]))[:6]
            lines.append("  windowed alone, largest effect: " + ", ".join(
                f"L{a['layer']} acc {a['acc']:.2f} (+{a['nll_rise']:.2f} nats)" for a in worst))
    for entry in result["sets"]:
        lines.append(f"full only at {entry['full_layers']} (sinks {entry['sinks']}): " + ", ".join(
            f"{k} {v['acc']:.2f}" for k, v in entry["tasks"].items()) + f"   [{'; '.join(entry['names'])}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=10, help="rows per task (default 10)")
    parser.add_argument("--lengths", default="needle=2048,kv=1024,mqar=1024",
                        help="KIND=LENGTH,... of the retrieval tasks (default needle=2048,kv=1024,mqar=1024)")
    parser.add_argument("--window", type=int, default=512, help="sliding window of the ablations (default 512)")
    parser.add_argument("--ablate", default="needle", help="tasks of the per-layer ablation ('' for none)")
    parser.add_argument("--current", default="23,28", help="the current placement's full-attention layers")
    parser.add_argument("--sets", default="", help="more full-attention sets to test, e.g. '3,15;3,15,23'")
    parser.add_argument("--heads", type=lambda s: [int(x) for x in s.split(",") if x], default=[3],
                        help="numbers of top heads to zero, each against as many random heads (default 3)")
    parser.add_argument("--sinks", default="0,4",
                        help="first tokens every windowed layer also sees, per run of the sets (default 0,4)")
    parser.add_argument("--greedy-steps", type=int, default=3, help="full-attention layers to select (default 3)")
    parser.add_argument("--greedy-rows", type=int, default=4, help="rows of the greedy selection (default 4)")
    parser.add_argument("--greedy-candidates", type=int, default=10,
                        help="candidate layers of the greedy selection (default 10)")
    parser.add_argument("--check-official", type=int, default=2,
                        help="answers per task also scored by jetnas's scorer, to compare (default 2; 0: none)")
    parser.add_argument("--out", default="results/cpu_teacher_retrieval_layers")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    result["command"] = " ".join(["python", "benchmarks/retrieval_layers.py", *(argv or sys.argv[1:])])
    (out / "retrieval_layers.json").write_text(json.dumps(result, indent=1))
    plot(result, out)
    print(table(result))
    print(json.dumps({"out": str(out), "seconds": round(result["seconds"], 1),
                      **{k: v["teacher"]["acc"] for k, v in result["tasks"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
