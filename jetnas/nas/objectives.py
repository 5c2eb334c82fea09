"""Search objectives: built-in evaluation tasks run on super-network candidates, and their combination.

PostNAS scores placements per task (paper, section 2.2): the loss on the correct answer for multiple-choice
knowledge, accuracy for retrieval, and here also the language-model loss on held-out text. To rank by several
tasks at once, each task's metric is turned into the fraction of the gap between the all-linear network and the
teacher that a candidate closes (0 = no better than all-linear, 1 = as good as the teacher), and averaged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from jetnas.evaluation.scoring import LanguageModel
from jetnas.evaluation.tasks import MultipleChoiceTask, PerplexityTask, RetrievalTask, Task, parse_task
from jetnas.nas.search import Candidate


@dataclass
class SearchTask:
    """A task and the metric the search reads from it (`secondary` breaks ties, e.g. retrieval answer NLL)."""

    name: str
    task: Task
    metric: str
    higher_is_better: bool
    secondary: str | None = None
    secondary_higher_is_better: bool = False


def build_search_tasks(specs: list[str], rows: int = 16, lm_data: str | None = None, lm_tokens: int = 8192,
                       retrieval_length: int = 1024) -> list[SearchTask]:
    """Search tasks from names: `lm` (LM loss on `lm_data`), `mc:PATH` (correct-answer loss), `retrieval`
    (needle accuracy at `retrieval_length` tokens) or any built-in task name (`retrieval:kv@2048`, `cloze:PATH`,
    `ppl:PATH`). `rows` rows per multiple-choice / retrieval task."""
    out = []
    for spec in specs:
        if spec == "lm":
            if lm_data is None:
                raise ValueError("task 'lm' needs held-out text (lm_data)")
            out.append(SearchTask("lm", PerplexityTask(lm_data, tokens=lm_tokens, name="lm"), "nll", False))
            continue
        if spec == "retrieval":
            spec = f"retrieval:needle@{retrieval_length}"
        task = parse_task(spec)
        if isinstance(task, MultipleChoiceTask):
            task.limit = task.limit or rows
            out.append(SearchTask(spec, task, "correct_nll", False, "acc", True))
        elif isinstance(task, RetrievalTask):
            task.n = min(task.n, rows) if "n=" in spec else rows
            out.append(SearchTask(spec, task, "acc", True, "target_nll", False))
        elif isinstance(task, PerplexityTask):
            out.append(SearchTask(spec, task, "nll", False))
        else:
            out.append(SearchTask(spec, task, "acc", True, "ppl", False))
    return out


class _MemoTokenizer:
    """A tokenizer whose encodings are kept: every sub-network is scored on the same texts, and building and
    encoding them again for each (the retrieval rows fit their filler by bisection) cost ~0.2 s per candidate on
    CPU, a sizeable share of a GPU evaluation. Anything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._memo: dict[tuple[str, bool], object] = {}
        self.calls = 0  # encodings actually computed

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        if kwargs or not isinstance(text, str):
            return self._tokenizer(text, add_special_tokens=add_special_tokens, **kwargs)
        key = (text, add_special_tokens)
        if key not in self._memo:
            self.calls += 1
            self._memo[key] = self._tokenizer(text, add_special_tokens=add_special_tokens)
        return self._memo[key]

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class CandidateEvaluator:
    """Runs the search tasks on sub-networks of a super-network (cached per candidate).

    Prefix reuse: for every input batch the tasks send, the layer inputs of the last sub-network run on it are kept;
    the next sub-network starts at the first layer where the two differ. The beam search scores candidates that
    differ from their neighbours in one layer, so about half the layers are skipped, with bit-identical results
    (the same kernels on the same inputs). `prefix_bytes` caps the memory those states may take (0: off).
    """

    def __init__(self, supernet, tokenizer, tasks: list[SearchTask], batch_size: int = 8, max_length: int = 4096,
                 prefix_bytes: int | None = None):
        self.supernet, self.tokenizer, self.tasks = supernet.eval(), _MemoTokenizer(tokenizer), tasks
        self.batch_size, self.max_length = batch_size, max_length
        self.device = next(supernet.parameters()).device
        self._cache: dict[Candidate, dict[str, dict]] = {}
        if prefix_bytes is None:
            prefix_bytes = 8 << 30 if self.device.type == "cuda" else 1 << 30
        self.prefix_bytes = prefix_bytes
        self._prefix: dict[bytes, tuple[Candidate, list[torch.Tensor]]] = {}
        self._prefix_used = 0
        self.layers_run = 0  # layer evaluations actually computed (bookkeeping for tests and logs)

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor | None, candidate: Candidate,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        key = hashlib.sha1(ids.cpu().numpy().tobytes() + (b"" if mask is None else mask.cpu().numpy().tobytes())
                           + str(tuple(ids.shape)).encode()).digest()
        start, hidden, earlier = 0, None, []
        if key in self._prefix:
            previous, states = self._prefix[key]
            start = next((i for i, (a, b) in enumerate(zip(previous, candidate)) if a != b), len(candidate))
            hidden = states[start] if start else None
            earlier = states[:start]
        logits, states = self.supernet.run_layers(ids, candidate, mask, start, hidden, positions=positions)
        self.layers_run += len(candidate) - start
        states = earlier + states
        size = sum(t.numel() * t.element_size() for t in states)
        if key in self._prefix or self._prefix_used + size <= self.prefix_bytes:
            if key not in self._prefix:
                self._prefix_used += size
            self._prefix[key] = (tuple(candidate), states)
        return logits

    def language_model(self, candidate: Candidate) -> LanguageModel:
        @torch.no_grad()
        def logits(ids, mask):
            return self._logits(ids, mask, tuple(candidate))

        @torch.no_grad()
        def logits_at(ids, mask, positions):
            return self._logits(ids, mask, tuple(candidate), positions)

        return LanguageModel(logits, self.tokenizer, self.max_length, self.batch_size, device=self.device,
                             name="+".join(f"{k}{v}" for k, v in _short(candidate).items()), logits_at=logits_at)

    def results(self, candidate: Candidate) -> dict[str, dict]:
        """`{task name: metrics}` of one candidate."""
        candidate = tuple(candidate)
        if candidate not in self._cache:
            lm = self.language_model(candidate)
            self._cache[candidate] = {t.name: t.task.evaluate(lm) for t in self.tasks}
        return self._cache[candidate]

    @property
    def evaluations(self) -> int:
        return len(self._cache)


class ProbedEvaluator:
    """`CandidateEvaluator`'s interface with the retrieval tasks scored by the windowed-teacher probe
    (`jetnas.nas.probe`) and every other task by the super-network, as `CandidateEvaluator` does.

    For a candidate, the probe runs the teacher with full attention in the candidate's "attn" layers and, in every
    other layer, the teacher's attention limited to `window` tokens plus the first `sinks` (a "swa" layer: its
    super-network window if larger). The retrieval tasks are replaced by the probe's own rows (`probe_task`: the
    generator with `PROBE_SEED`, never the evaluation's seed-0 rows, and for needle / kv only rows whose fact lies
    beyond the window) and renamed `<task> (probe w<W>+<S>)`, so tables and the heat-map say what scored them.
    Retrieval keeps `acc` as its metric and the answer NLL (`target_nll`) as the secondary one, which the search
    ranks by where no one-layer network moves the accuracy (`NormalizedObjective.fall_back_where_flat`).

    Args:
        supernet: the trained super-network (its `base` is the probe's teacher; its `spec.swa_window` the window
            of "swa" layers).
        tokenizer, batch_size, max_length, prefix_bytes: as `CandidateEvaluator` (each of the two evaluators may
            keep `prefix_bytes` of layer inputs).
        tasks: all search tasks; `RetrievalTask`s go through the probe (at least one is required).
        window: W, tokens each windowed layer sees (itself and W - 1 before it).
        sinks: S, first tokens every windowed layer also sees (default 4: without them the windowed teacher
            degrades everywhere, not at retrieval only; results/cpu_teacher_retrieval_layers).
    """

    def __init__(self, supernet, tokenizer, tasks: list[SearchTask], window: int, sinks: int = 4,
                 batch_size: int = 8, max_length: int = 4096, prefix_bytes: int | None = None):
        from jetnas.nas.probe import WindowedTeacher, probe_task

        probed = [t for t in tasks if isinstance(t.task, RetrievalTask)]
        if not probed:
            raise ValueError(f"the retrieval probe scores retrieval tasks; none among {[t.name for t in tasks]}")
        self.supernet, self.tasks = supernet, tasks
        self.probe_net = WindowedTeacher(supernet.base, window, sinks, supernet.spec.swa_window)
        for t in probed:
            t.task = probe_task(t.task, window)
            t.name = t.task.name = f"{t.name} (probe w{window}+{sinks})"
        others = [t for t in tasks if t not in probed]
        self.network = CandidateEvaluator(supernet, tokenizer, others, batch_size, max_length, prefix_bytes)
        self.probe = CandidateEvaluator(self.probe_net, tokenizer, probed, batch_size, max_length, prefix_bytes)
        self.device = self.network.device
        self._seen: set[Candidate] = set()

    @property
    def probed(self) -> list[SearchTask]:
        """The tasks the probe scores."""
        return self.probe.tasks

    def describe(self) -> dict:
        """What scored the retrieval tasks, for the search's outputs."""
        from jetnas.nas.probe import PROBE_SEED

        net = self.probe_net
        return {"kind": "windowed", "window": net.window, "sinks": net.sinks, "swa_window": net.swa_window,
                "seed": PROBE_SEED, "tasks": [t.name for t in self.probed],
                "far_tokens": {t.name: t.task.far for t in self.probed if t.task.kind != "mqar"}}

    def results(self, candidate: Candidate) -> dict[str, dict]:
        """`{task name: metrics}` of one candidate, in the order of `tasks`."""
        candidate = tuple(candidate)
        self._seen.add(candidate)
        res = {**(self.network.results(candidate) if self.network.tasks else {}), **self.probe.results(candidate)}
        return {t.name: res[t.name] for t in self.tasks}

    @property
    def evaluations(self) -> int:
        return len(self._seen)

    @property
    def layers_run(self) -> int:
        """Layer passes computed by the super-network and the probe together."""
        return self.network.layers_run + self.probe.layers_run


def _short(candidate: Candidate) -> dict[str, list[int]]:
    return {k: [i for i, c in enumerate(candidate) if c == k] for k in ("attn", "swa")}


class NormalizedObjective:
    """Per task, the fraction of the all-linear -> teacher gap a candidate closes; the search ranks by the mean
    over the tasks where the teacher and the all-linear network differ (and breaks ties by the same mean over
    secondary metrics). Higher is better; the teacher scores 1, all-linear 0.

    In the mean, a task counts at most 1 (as good as the teacher): beating the teacher on one task is noise of a
    small task, not quality (2026-12-02, H200: 12 MMLU-dev rows gave the searched placement 2.5 of a gap of only
    0.56 nats, which outweighed the LM and retrieval tasks together). The tables keep the raw fractions."""

    def __init__(self, evaluator: CandidateEvaluator):
        self.evaluator = evaluator
        L = evaluator.supernet.num_layers
        self.low = evaluator.results(("linear",) * L)
        self.high = evaluator.results(("attn",) * L)

    def _fraction(self, task: str, metric: str, value: float) -> float:
        lo, hi = self.low[task][metric], self.high[task][metric]
        # a task on which the teacher is no better than all-linear cannot tell placements apart
        return 0.0 if abs(hi - lo) < 1e-12 else (value - lo) / (hi - lo)

    def informative(self, metric_of=lambda t: t.metric) -> list:
        """Tasks whose metric separates the teacher from the all-linear network (the others cannot rank)."""
        return [t for t in self.evaluator.tasks if metric_of(t) is not None
                and abs(self.high[t.name][metric_of(t)] - self.low[t.name][metric_of(t)]) > 1e-12]

    def fall_back_where_flat(self, candidates: list[Candidate]) -> list[str]:
        """Tasks whose primary metric no candidate moves from the all-linear value (retrieval accuracy 0 for every
        one-layer network after a short super-network training: 2026-12-02, H200, all 318 sub-networks) rank by
        their secondary metric instead (the answer's NLL), which still tells the layers apart. Swaps the metrics
        of those tasks in place, so tables and heat-maps show what is ranked; returns their names."""
        swapped, informative = [], self.informative()
        for t in self.evaluator.tasks:
            if t.secondary is None or t not in informative:
                continue
            lo = self.low[t.name][t.metric]
            if all(abs(self.evaluator.results(c)[t.name][t.metric] - lo) < 1e-12 for c in candidates):
                t.metric, t.secondary = t.secondary, t.metric
                t.higher_is_better, t.secondary_higher_is_better = t.secondary_higher_is_better, t.higher_is_better
                swapped.append(t.name)
        return swapped

    def per_task(self, candidate: Candidate) -> dict[str, float]:
        res = self.evaluator.results(candidate)
        return {t.name: self._fraction(t.name, t.metric, res[t.name][t.metric]) for t in self.evaluator.tasks}

    def __call__(self, candidate: Candidate) -> tuple[float, float]:
        res = self.evaluator.results(candidate)
        tasks = self.informative()
        fractions = self.per_task(candidate)
        primary = sum(min(fractions[t.name], 1.0) for t in tasks) / len(tasks) if tasks else 0.0
        with_secondary = self.informative(lambda t: t.secondary)
        secondary = (sum(min(self._fraction(t.name, t.secondary, res[t.name][t.secondary]), 1.0)
                         for t in with_secondary)
                     / len(with_secondary)) if with_secondary else 0.0
        return (round(primary, 12), round(secondary, 12))
