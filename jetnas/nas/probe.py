"""A training-free retrieval signal for the placement search: the windowed-teacher probe.

A briefly trained super-network's linear paths cannot retrieve at all, so every sub-network scores the same on a
needle (2026-12-02, H200: the heat-map's retrieval row was flat) and the search has no signal for the ability
full-attention layers are kept for. The probe asks the teacher instead: in a candidate, every layer kept as full
attention runs the teacher's full attention, and every other layer runs the teacher's *own* attention limited to a
sliding window of W tokens plus the first S "sink" tokens (StreamingLLM) instead of the super-network's linear path.
Retrieval that needs a long-range hop through a layer then fails unless that layer is full: the probe scores which
layers the teacher's retrieval circuit runs through (results/cpu_teacher_retrieval_layers: copy heads in layers
17-20; with every other layer windowed to 512 tokens and 4 sinks, full attention at {7, 18, 23} keeps 8/8 needles,
{23, 28} 0/8). The sinks matter: without them the windowed teacher degrades everywhere, not only at retrieval.

What the probe is not: a trained linear layer keeps a compressed long-range state a window lacks, and may fail to
carry what a window keeps locally. It ranks layers by the teacher's needs, not by what a hybrid will learn.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from jetnas.evaluation.scoring import LanguageModel
from jetnas.evaluation.tasks import RetrievalTask
from jetnas.nas.supernet import CHOICES, layer_inputs
from jetnas.ops.attention import causal_attention

#: Seed of the probe's retrieval rows. `RetrievalTask` draws row i from `random.Random(f"{seed}-{i}")`; the
#: evaluation (`jetnas eval`, the runs' reports: `parse_task` without `?seed=`) and the placement search's
#: super-network tasks use seed 0, so the probe's rows ("7919-0", "7919-1", ...) are never the evaluation's.
PROBE_SEED = 7919

#: Tokens of margin when the probe keeps rows whose fact lies beyond the window: encoding the text from the value
#: on counts the tokens up to the query to within a token or two (merges at the cut).
FAR_MARGIN = 8


class WindowedTeacher(nn.Module):
    """The teacher with, per layer, full attention ("attn") or its own attention windowed with sinks (any other
    choice): the probe network. Same calling contract as `SuperNet.run_layers`, so `CandidateEvaluator` scores its
    candidates (with prefix reuse) as it scores the super-network's.

    Args:
        base: the teacher as an all-attention jetnas model (a super-network's `base`); not copied, not trained.
        window: W, the window of every layer outside the candidate's full-attention set (query t sees keys
            t - W + 1 .. t).
        sinks: S, the first tokens every windowed layer also sees (default 4).
        swa_window: the super-network's sliding window: a "swa" layer gets `max(window, swa_window)` (it sees at
            least what the hybrid's sliding-window layer will), with the same sinks. None: W.
    """

    def __init__(self, base: nn.Module, window: int, sinks: int = 4, swa_window: int | None = None):
        super().__init__()
        if any(t != "attn" for t in base.config.block_types):
            raise ValueError(f"the probe's teacher must be all-attention, got {base.config.block_types}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"the probe's window must be an integer >= 1, got {window!r}")
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"the probe's sinks must be an integer >= 0, got {sinks!r}")
        self.base, self.window, self.sinks = base, window, sinks
        self.swa_window = max(window, swa_window or window)

    @property
    def num_layers(self) -> int:
        return len(self.base.model.layers)

    def windows(self, choice: Sequence[str]) -> list[int | None]:
        """Per layer the window it runs with (None: full attention)."""
        choice = tuple(choice)
        if len(choice) != self.num_layers or not set(choice) <= set(CHOICES):
            raise ValueError(f"a sub-network is one of {CHOICES} per layer ({self.num_layers} layers), got {choice}")
        return [None if c == "attn" else self.swa_window if c == "swa" else self.window for c in choice]

    def run_layers(self, input_ids: torch.Tensor, choice: Sequence[str], attention_mask: torch.Tensor | None = None,
                   start: int = 0, hidden: torch.Tensor | None = None, logits: bool = True,
                   positions: torch.Tensor | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Layers `start..` of the probe network on `input_ids [B, T]` (from `hidden`, the input of layer `start`,
        when start > 0), right-padded batches with `attention_mask [B, T]`. Returns `(logits [B, T, V] or None,
        states)`: states[j] is the input of layer start + j, the last one the output of the last layer.
        `positions` (`[N]` int64 into the flattened `[B * T]` positions): the logits of those only, `[N, V]`."""
        windows = self.windows(choice)
        model = self.base.model
        B, T = input_ids.shape
        h, (cos, sin) = layer_inputs(model, input_ids, attention_mask, start, hidden)
        states = [h]
        for i in range(start, self.num_layers):
            layer = model.layers[i]
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            if windows[i] is None:
                # the super-network's own full path: the probe's full layers are the teacher's, bit for bit
                mixed, _ = attn.attend(x, None, None, attention_mask=attention_mask, position_embeddings=(cos, sin))
            else:
                q, k, v = attn.project(x, cos, sin)
                o = causal_attention(q, k, v, window=windows[i], key_padding_mask=attention_mask, sinks=self.sinks)
                mixed = attn.o_proj(o.reshape(B, T, -1))
            h = h + mixed
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            states.append(h)
        if not logits:
            return None, states
        x = model.norm(h)
        return self.base.lm_head(x if positions is None else x.reshape(-1, x.shape[-1])[positions]), states


@dataclass
class ProbeRetrievalTask(RetrievalTask):
    """A retrieval task on the probe's own rows: `RetrievalTask`'s generator with `PROBE_SEED` (never the
    evaluation's rows, which come from seed 0), keeping for `needle` and `kv` only rows whose asked fact lies
    more than `far` tokens before the question (a nearer fact is inside every window: no candidate can lose it,
    so such rows only dilute the signal). `mqar` rows keep all their queries (some near, some far). Rows are
    built once per tokenizer.

    Attributes:
        far: minimum tokens from the asked value to the end of the context (None: every row).
        max_draws: rows drawn at most to find `n` far ones (a ValueError names the count found otherwise).
    """

    far: int | None = None
    max_draws: int = 1000
    _made: dict = field(default_factory=dict, repr=False, compare=False)

    def make_rows(self, lm: LanguageModel) -> list[list[tuple[str, bool]]]:
        key = id(lm.tokenizer)
        if key not in self._made:
            maker = {"kv": self._kv, "needle": self._needle, "mqar": self._mqar}[self.kind]
            rows, draw = [], 0
            while len(rows) < self.n:
                if draw >= self.max_draws:
                    raise ValueError(f"{self.name}: {len(rows)} of {self.n} probe rows have their fact more than "
                                     f"{self.far} tokens back in {self.max_draws} draws; lower the window or rows")
                row = maker(random.Random(f"{self.seed}-{draw}"), lm)
                draw += 1
                if self.far is None or self.kind == "mqar" or fact_distance(row, lm) > self.far:
                    rows.append(row)
            self._made[key] = rows
        return self._made[key]


def fact_distance(segments: list[tuple[str, bool]], lm: LanguageModel) -> int:
    """Tokens from the first answer's value, where the context states it, to the end of that answer's context
    (needle and kv: the question restates the fact's key, "... The special code for Oslo is", and the value
    follows the same key earlier on)."""
    context, answer = "", None
    for text, is_answer in segments:
        if is_answer:
            answer = text
            break
        context += text
    if answer is None:
        raise ValueError("a retrieval row without an answer")
    line = context[context.rfind("\n") + 1:]
    key = line[line.rfind("? ") + 2:] if "? " in line else line
    at = context.find(key + answer)
    if at < 0 or at >= len(context) - len(line):
        raise ValueError(f"the answer {answer!r} after the key {key!r} is not stated before the question")
    return len(lm.encode(context[at + len(key):]))


def probe_task(task: RetrievalTask, window: int) -> ProbeRetrievalTask:
    """The probe's version of a search task: same kind, length, row count and options, the probe's seed, and for
    needle / kv only rows whose fact lies beyond the window (plus `FAR_MARGIN`)."""
    return ProbeRetrievalTask(kind=task.kind, length=task.length, n=task.n, seed=PROBE_SEED, queries=task.queries,
                              keys=task.keys, name=task.name, far=window + FAR_MARGIN)
