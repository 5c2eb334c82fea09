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
        logits_at: `(input_ids [B, T], attention_mask [B, T], positions [N]) -> logits [N, V]` at the given
            positions of the flattened `[B * T]` batch, the same values as `logits` gives there (up to the float
            rounding of a product over fewer rows); None: `logits` for all positions. `score_continuations` reads
            only the continuations' positions: with it, the LM head (a fifth of the SmolLM2-135M forward per
            position) runs on those alone.
    """

    logits: LogitsFn
    tokenizer: object
    max_length: int = 2048
    batch_size: int = 16
    batch_tokens: int = 16384
    device: torch.device | str = "cpu"
    name: str = "model"
    vocab_size: int | None = None
    logits_at: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_hf(cls, model, tokenizer, max_length: int | None = None, batch_size: int = 16, name: str | None = None):
        """Wrap a transformers causal LM (eval mode, no cache). When its forward takes `logits_to_keep` (ours and
        transformers' own models: an int, or a 1-D tensor of sequence positions), `logits_at` keeps the sequence
        positions any row asks for."""
        import inspect

        device = next(model.parameters()).device
        window = max_length or getattr(model.config, "max_position_embeddings", 2048)

        @torch.no_grad()
        def logits(ids, mask):
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

        @torch.no_grad()
        def logits_at(ids, mask, positions):
            width = ids.shape[1]
            rows, columns = positions // width, positions % width
            kept = torch.unique(columns)  # sorted
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=kept).logits
            return out[rows, torch.searchsorted(kept, columns)]

        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = embeddings.num_embeddings if isinstance(embeddings, torch.nn.Embedding) else \
            getattr(model.config, "vocab_size", None)
        keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
        return cls(logits, tokenizer, window, batch_size, device=device, name=name or type(model).__name__,
                   vocab_size=vocab, logits_at=logits_at if keeps else None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in one call: a fast (Rust) tokenizer encodes a list on all cores (HellaSwag's
        25,093 distinct texts: 8.5 s one at a time, 3.6 s as one list, on 2 cores). The ids are the same."""
        if not getattr(self.tokenizer, "is_fast", False):  # e.g. a tokenizer that takes one string at a time
            return [self.encode(t) for t in texts]
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


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


def encode_pair(lm: LanguageModel, context: str, continuation: str,
                encode: Callable[[str], list[int]] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-evaluation-harness splits them.

    `encode` replaces `lm.encode` (e.g. a memo shared by the requests of one call); the result is the same.
    """
    encode = encode or lm.encode
    context, continuation = _split_pair(context, continuation)
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


@dataclass
class _Requests:
    """What both scorers of `score_continuations` share: the encoded requests, scoring order, progress rows."""

    encoded: list[tuple[list[int], list[int]]]
    order: list[int]
    row_of: list[int]
    pending: dict[int, int]

    def length(self, i: int, lm: LanguageModel) -> int:
        return min(len(self.encoded[i][0]) + len(self.encoded[i][1]), lm.max_length + 1)

    def finished_rows(self, batch: list[int]) -> int:
        """Count down the requests of `batch`; returns how many task rows are now fully scored."""
        done = 0
        for i in batch:
            self.pending[self.row_of[i]] -= 1
            done += self.pending[self.row_of[i]] == 0
        return done


def _split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-evaluation-harness's split: the context's trailing spaces move to the continuation."""
    spaces = len(context) - len(context.rstrip())
    return (context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation)


def _encode_requests(lm: LanguageModel, requests: Sequence[tuple[str, str]], rows: Sequence[int] | None) -> _Requests:
    # every distinct text (the answers of a multiple-choice row share their context) encoded once, all in one call
    pairs = [_split_pair(c, x) for c, x in requests]
    texts = list(dict.fromkeys(t for c, x in pairs for t in (c, c + x)))
    memo = dict(zip(texts, lm.encode_many(texts)))
    encoded = [encode_pair(lm, c, x, memo.__getitem__) for c, x in pairs]
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise ValueError(f"request {i}: the continuation {requests[i][1]!r} encodes to no tokens")
        if len(cont) > lm.max_length:
            raise ValueError(f"request {i}: the continuation takes {len(cont)} tokens, more than the model's window "
                             f"(max_length={lm.max_length})")
    if rows is not None and len(rows) != len(requests):
        raise ValueError(f"rows gives {len(rows)} row numbers for {len(requests)} requests")
    row_of = list(rows) if rows is not None else list(range(len(requests)))
    pending: dict[int, int] = {}
    for r in row_of:
        pending[r] = pending.get(r, 0) + 1
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    return _Requests(encoded, order, row_of, pending)


def _padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `ids [B, T]` (pad id 0) and `mask [B, T]` (1 on tokens), int64 on the host."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
    return ids, mask


def _to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy to `device`; to a GPU from pinned memory without blocking, so the host does not wait for the work
    already queued there (a plain copy from pageable memory synchronises the stream)."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# float32 log-probabilities materialised at once ([rows, V] per chunk). A GPU wants few large launches; a CPU wants
# a chunk that stays in its cache between the gather, the log-softmax and the argmax (measured on one core at
# V = 49,152: 2 MB chunks ran as fast as one request at a time, 256 MB chunks 2x slower)
_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 2 << 20}


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor, flat: torch.Tensor | None = None,
                     greedy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 log-probabilities of `targets`, at every position or at chosen ones, and whether each is the argmax.

    Args:
        logits: `[B, T, V]`, any float dtype.
        targets: `[N]` int64 token ids; with `flat=None`, one per position (`N = B * T`, row-major).
        flat: `[N]` int64 positions into the flattened `[B * T]` positions; None: all positions, in order.
        greedy: also return `hit [N]` (bool: the target is the position's argmax); None otherwise.

    Returns:
        `(logp [N] float32, hit [N] bool or None)`. The log-softmax runs in float32 over `V` for at most
        `_CHUNK_BYTES[device]` of positions at a time, so no float32 copy spans the whole batch of logits (and with
        `flat=None` and float32 logits, none is made at all).
    """
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    n = targets.numel()
    if flat is None and n != rows.shape[0]:
        raise ValueError(f"targets has {n} ids for {rows.shape[0]} positions of logits {tuple(logits.shape)}")
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    hit = torch.empty(n, dtype=torch.bool, device=logits.device) if greedy else None
    step = max(1, _CHUNK_BYTES.get(logits.device.type, _CHUNK_BYTES["cpu"]) // (4 * vocab))
    for a in range(0, n, step):
        x = rows[a : a + step] if flat is None else rows[flat[a : a + step]]
        lp = F.log_softmax(x.float(), -1)
        target = targets[a : a + step]
        logp[a : a + step] = lp.gather(-1, target[:, None])[:, 0]
        if hit is not None:
            hit[a : a + step] = lp.argmax(-1) == target
    return logp, hit


def _segment_sums(values: torch.Tensor, slots: torch.Tensor, segments: int, width: int) -> torch.Tensor:
    """`[segments]` sums of `values [N]`, value k going to segment `slots[k] // width`; `slots` are distinct.

    The values are laid out in a zero-padded `[segments, width]` matrix and summed along its rows: deterministic on
    a GPU (unlike `index_add_`, whose float atomics add in a varying order)."""
    padded = values.new_zeros(segments * width).index_copy_(0, slots, values)
    return padded.view(segments, width).sum(-1)


def score_continuations(lm: LanguageModel, requests: Sequence[tuple[str, str]], progress: str | None = None,
                        rows: Sequence[int] | None = None) -> list[Score]:
    """Score `(context, continuation)` pairs; batched (longest first), right-padded, float32 log-softmax.

    The input of a request is `(context + continuation)` minus its last token, left-truncated to `lm.max_length`;
    its continuation's tokens are predicted at the last `len(continuation)` positions. Per batch, the positions of
    all continuations are scored at once (one float32 log-softmax over just those positions, per-request sums on
    the device) and the results come to the host in one transfer: `_score_continuations_reference` is the same
    computation one request at a time, and agrees to float32 rounding (the sums add in another order).

    Args:
        progress: the progress bar's label (None: no bar).
        rows: the task row each request belongs to (a multiple-choice row has one request per answer); the bar
            counts rows, a row once all its requests are scored. None: one row per request.

    Raises:
        ValueError: a continuation that encodes to no tokens or to more than `lm.max_length`; `rows` of another
            length than `requests`.
    """
    todo = _encode_requests(lm, requests, rows)
    results: list[Score | None] = [None] * len(requests)
    bar = tqdm(total=len(todo.pending), desc=progress, disable=progress is None, leave=False, unit="row")
    for batch in _batches(todo.order, lambda i: todo.length(i, lm), lm):
        seqs = [(todo.encoded[i][0] + todo.encoded[i][1])[-(lm.max_length + 1):] for i in batch]
        conts = [todo.encoded[i][1] for i in batch]
        ids, mask = _padded([s[:-1] for s in seqs])
        width, longest = ids.shape[1], max(len(c) for c in conts)
        # continuation token j of request `row` is predicted at input position n_in - len(cont) + j; its slot in the
        # zero-padded [rows, longest] matrix of per-token scores is row * longest + j
        flat, targets, slots = [], [], []
        for row, (s, cont) in enumerate(zip(seqs, conts)):
            n_in = len(s) - 1
            flat += range(row * width + n_in - len(cont), row * width + n_in)
            slots += range(row * longest, row * longest + len(cont))
            targets += cont
        ids, mask = _to_device(ids, lm.device), _to_device(mask, lm.device)
        index = _to_device(torch.tensor([flat, targets, slots], dtype=torch.long), lm.device)
        # with `logits_at`, the logits of the continuations' positions only, [N, V] in their order
        logits = lm.logits(ids, mask) if lm.logits_at is None else lm.logits_at(ids, mask, index[0])
        index = index.to(logits.device)
        logp, hit = _target_logprobs(logits, index[1], flat=index[0] if lm.logits_at is None else None)
        sums = _segment_sums(logp, index[2], len(batch), longest)
        misses = _segment_sums((~hit).float(), index[2], len(batch), longest)
        logprob, missed = torch.stack([sums, misses]).tolist()
        for row, i in enumerate(batch):
            results[i] = Score(logprob=logprob[row], num_tokens=len(conts[row]), is_greedy=missed[row] == 0,
                               num_bytes=len(requests[i][1].encode("utf-8")))
        bar.update(todo.finished_rows(batch))
    bar.close()
    return results


def _score_continuations_reference(lm: LanguageModel, requests: Sequence[tuple[str, str]],
                                   progress: str | None = None, rows: Sequence[int] | None = None) -> list[Score]:
    """`score_continuations` one request at a time: the readable definition the fast path is tested against."""
    todo = _encode_requests(lm, requests, rows)
    encoded = todo.encoded
    results: list[Score | None] = [None] * len(encoded)
    bar = tqdm(total=len(todo.pending), desc=progress, disable=progress is None, leave=False, unit="row")
    for batch in _batches(todo.order, lambda i: todo.length(i, lm), lm):
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
        bar.update(todo.finished_rows(batch))
    bar.close()
    return results


def _windows(tokens: torch.Tensor, window: int, stride: int | None) -> tuple[torch.Tensor, int, list[int]]:
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in (0, window={window}], got {stride}")
    tokens = tokens.long().flatten()
    return tokens, stride, list(range(0, max(len(tokens) - 1, 1), stride))


def token_nll(lm: LanguageModel, tokens: torch.Tensor, window: int, stride: int | None = None,
              progress: str | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood of a token stream and the number of tokens it covers.

    Windows of `window` tokens advance by `stride` (default: the whole window, i.e. disjoint windows); each token
    is scored once, in the first window that predicts it. The first token of the stream is context only.
    Per batch of windows, the scored positions go through one float32 log-softmax (chunked) and one transfer to
    the host; `_token_nll_reference` is the same computation one window at a time (float32 rounding apart).

    Args:
        tokens: `[L]` (or any shape, flattened) token ids.
        window: tokens per forward pass and row.
        stride: tokens between window starts, in (0, window]; None: `window`.
    """
    tokens, stride, starts = _windows(tokens, window, stride)
    total, counted = 0.0, 0
    bar = tqdm(total=len(starts), desc=progress, disable=progress is None, leave=False)
    for chunk in _batches(starts, lambda s: window, lm):
        pieces = [tokens[s : s + window + 1] for s in chunk]
        ids, mask = _padded([p[:-1].tolist() for p in pieces])
        # targets are the inputs shifted by one; a position counts from the first token the previous window did
        # not score (overlap when stride < window) to the row's end (padding and overlap: weight 0)
        targets = torch.zeros_like(ids)
        counts = torch.zeros_like(ids, dtype=torch.bool)
        for row, (s, p) in enumerate(zip(chunk, pieces)):
            n = len(p) - 1
            first_new = 0 if s == 0 else min(window - stride, n)
            targets[row, :n] = p[1:]
            counts[row, first_new:n] = True
            counted += n - first_new
        logits = lm.logits(_to_device(ids, lm.device), _to_device(mask, lm.device))
        targets, counts = _to_device(targets, logits.device), _to_device(counts, logits.device)
        # most positions count: score them all, contiguous chunks of the logits as they are, and drop the rest
        logp, _ = _target_logprobs(logits, targets.flatten(), greedy=False)
        for row_sum in torch.where(counts, logp.view(counts.shape), 0.0).sum(-1).tolist():
            total -= row_sum
        bar.update(len(chunk))
    bar.close()
    return total, counted


def _token_nll_reference(lm: LanguageModel, tokens: torch.Tensor, window: int, stride: int | None = None,
                         progress: str | None = None) -> tuple[float, int]:
    """`token_nll` one window at a time: the readable definition the fast path is tested against."""
    tokens, stride, starts = _windows(tokens, window, stride)
    total, counted = 0.0, 0
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
