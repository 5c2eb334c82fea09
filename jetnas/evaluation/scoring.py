"""Log-likelihood scoring: the one primitive every built-in task (and the search objectives) is built on.

A scorer needs only a `LanguageModel`: a tokenizer plus a function from token ids (and a padding mask) to logits.
That is a transformers causal LM, but also a PostNAS super-network running one sub-network, which is how the
placement search scores candidates without building models.

Tokenisation follows lm-evaluation-harness (so built-in scores and harness scores agree on the same rows):
trailing spaces of the context move to the continuation, the continuation's tokens are those of
`encode(context + continuation)` past `encode(context)`, no special tokens are added, and a sequence longer than
the model's window keeps its last `max_length` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LanguageModel:
    """What the evaluators need of a model.

    Attributes:
        logits: `(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]`.
        tokenizer: a transformers tokenizer.
        max_length: longest sequence scored in one pass (longer contexts are left-truncated).
        batch_size: sequences per forward pass, at most.
        batch_tokens: padded tokens per forward pass, at most (the logits alone take batch_tokens x vocab floats).
        device: where inputs go.
        name: for reports.
        vocab_size: the number of token ids the model embeds (None: unknown); token files are checked against it.
    """

    logits: LogitsFn
    tokenizer: object
    max_length: int = 2048
    batch_size: int = 16
    batch_tokens: int = 16384
    device: torch.device | str = "cpu"
    name: str = "model"
    vocab_size: int | None = None

    @classmethod
    def from_hf(cls, model, tokenizer, max_length: int | None = None, batch_size: int = 16, name: str | None = None):
        """Wrap a transformers causal LM (eval mode, no cache)."""
        device = next(model.parameters()).device
        window = max_length or getattr(model.config, "max_position_embeddings", 2048)

        @torch.no_grad()
        def logits(ids, mask):
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = embeddings.num_embeddings if isinstance(embeddings, torch.nn.Embedding) else \
            getattr(model.config, "vocab_size", None)
        return cls(logits, tokenizer, window, batch_size, device=device, name=name or type(model).__name__,
                   vocab_size=vocab)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Score:
    """Log-likelihood of a continuation: total log-probability, its token count, whether greedy decoding would
    have produced exactly it, and its length in bytes (for per-byte normalisation)."""

    logprob: float
    num_tokens: int
    is_greedy: bool
    num_bytes: int


def _batches(order: list[int], length, lm: LanguageModel):
    """Consecutive groups of `order` (longest first) within `lm.batch_size` rows and `lm.batch_tokens` padded
    tokens."""
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) == lm.batch_size or (len(batch) + 1) * length(batch[0]) > lm.batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def encode_pair(lm: LanguageModel, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = lm.encode(context + continuation)
    ctx = lm.encode(context)
    return ctx, whole[len(ctx):]


def score_continuations(lm: LanguageModel, requests: Sequence[tuple[str, str]], progress: str | None = None,
                        rows: Sequence[int] | None = None) -> list[Score]:
    """Score `(context, continuation)` pairs; batched (longest first), right-padded, float32 log-softmax.

    Args:
        progress: the progress bar's label (None: no bar).
        rows: the task row each request belongs to (a multiple-choice row has one request per answer); the bar
            counts rows, a row once all its requests are scored. None: one row per request.
    """
    encoded = [encode_pair(lm, c, x) for c, x in requests]
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise ValueError(f"request {i}: the continuation {requests[i][1]!r} encodes to no tokens")
    if rows is not None and len(rows) != len(requests):
        raise ValueError(f"rows gives {len(rows)} row numbers for {len(requests)} requests")
    row_of = list(rows) if rows is not None else list(range(len(requests)))
    pending = {r: row_of.count(r) for r in dict.fromkeys(row_of)} if rows is not None else dict.fromkeys(row_of, 1)
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    results: list[Score | None] = [None] * len(encoded)
    bar = tqdm(total=len(pending), desc=progress, disable=progress is None, leave=False, unit="row")
    for batch in _batches(order, lambda i: min(len(encoded[i][0]) + len(encoded[i][1]), lm.max_length + 1), lm):
        # the scored input is (context + continuation) minus its last token, cut to the window from the left
        seqs = [(encoded[i][0] + encoded[i][1])[-(lm.max_length + 1):] for i in batch]
        width = max(len(s) - 1 for s in seqs)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s) - 1] = torch.tensor(s[:-1])
            mask[row, : len(s) - 1] = 1
        logits = lm.logits(ids.to(lm.device), mask.to(lm.device))
        for row, i in enumerate(batch):
            cont = encoded[i][1]
            n_in = len(seqs[row]) - 1
            positions = torch.arange(n_in - len(cont), n_in, device=logits.device)
            logp = F.log_softmax(logits[row, positions].float(), -1)
            target = torch.tensor(cont, device=logits.device)
            results[i] = Score(
                logprob=logp.gather(-1, target[:, None]).sum().item(),
                num_tokens=len(cont),
                is_greedy=bool((logp.argmax(-1) == target).all()),
                num_bytes=len(requests[i][1].encode("utf-8")),
            )
        done = 0
        for i in batch:
            pending[row_of[i]] -= 1
            done += pending[row_of[i]] == 0
        bar.update(done)
    bar.close()
    return results


def token_nll(lm: LanguageModel, tokens: torch.Tensor, window: int, stride: int | None = None,
              progress: str | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood of a token stream and the number of tokens it covers.

    Windows of `window` tokens advance by `stride` (default: the whole window, i.e. disjoint windows); each token
    is scored once, in the first window that predicts it. The first token of the stream is context only.
    """
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in (0, window={window}], got {stride}")
    tokens = tokens.long().flatten()
    total, counted = 0.0, 0
    starts = list(range(0, max(len(tokens) - 1, 1), stride))
    bar = tqdm(total=len(starts), desc=progress, disable=progress is None, leave=False)
    for chunk in _batches(starts, lambda s: window, lm):
        pieces = [tokens[s : s + window + 1] for s in chunk]
        width = max(len(p) - 1 for p in pieces)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(pieces):
            ids[row, : len(p) - 1] = p[:-1]
            mask[row, : len(p) - 1] = 1
        logits = lm.logits(ids.to(lm.device), mask.to(lm.device)).float()
        for row, (s, p) in enumerate(zip(chunk, pieces)):
            n = len(p) - 1
            # tokens already scored by the previous window are skipped (overlap when stride < window)
            first_new = 0 if s == 0 else min(window - stride, n)
            logp = F.log_softmax(logits[row, first_new:n], -1)
            target = p[1 + first_new : n + 1].to(logp.device)
            total -= logp.gather(-1, target[:, None]).sum().item()
            counted += n - first_new
        bar.update(len(chunk))
    bar.close()
    return total, counted


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / max(count, 1))
