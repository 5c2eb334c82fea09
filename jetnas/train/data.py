"""Training data as token streams, and the deterministic batcher.

A token stream is a read-only 1-D array of token ids (a memory map: corpora are never loaded whole). Sources:

- a token file `.bin` (flat little-endian uint16 ids, like `shared/data/corpus/train.bin`; a sidecar
  `<file>.json` with `{"dtype": "uint32"}` marks 32-bit ids, which vocabularies over 65,535 need);
- text files `.txt` / `.jsonl` / `.jsonl.gz` (a "text" field), tokenised once and cached as a `.bin`;
- `hf:NAME[:CONFIG][@SPLIT]`, a Hugging Face dataset's "text" field (the optional `data` extra), cached likewise;
- nothing: text the teacher generates itself (continuations of short seed prompts sampled at temperature 1 by
  `jetnas.engine.Engine`), cached by teacher, sampler, seed, batch shape and size.

Cached files live under `$JETNAS_CACHE/data`, built by one process while the others (the ranks of one job, other
jobs) wait for it, and written atomically (`jetnas.files`); each one's sidecar records its token count, so a damaged
(truncated) cache file is detected and built again. Bad inputs (an empty or odd-sized `.bin`, a `.jsonl` row without
a "text" string, a file with no text) fail with `jetnas.validation.InputError` naming the file and line.

The batcher cuts the stream into non-overlapping windows of `seq_len + 1` tokens (inputs and next-token labels) and
visits them in a seeded permutation; the windows of step `s` are a pure function of (seed, s), so resuming needs
only the step, and rank r of W takes the r-th contiguous share of each global batch, so W ranks see exactly the
single-process batch. With `doc_starts` = p > 0, a share p of the samples instead starts at a document's first token
(the token after an end-of-document id, or the stream's first), so that rows begin the way an evaluation's prompts
do: a document's opening read from a fresh state (see `WindowBatcher`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from jetnas.files import build_lock, temp_sibling, write_text_atomic
from jetnas.validation import InputError, open_token_file, read_texts

SEED_PROMPTS = ["", "The", "In", "A", "Once upon a time,", "The history of", "Scientists have", "In the year",
                "How to", "One of the most", "The city of", "Many people believe that"]


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class TokenStream:
    """Token ids `[start, end)` of a 1-D array (usually a memory map)."""

    def __init__(self, array: np.ndarray, name: str = "tokens", start: int = 0, end: int | None = None):
        self.array, self.name = array, name
        self.start, self.end = start, len(array) if end is None else end
        if not 0 <= self.start <= self.end <= len(array):
            raise ValueError(f"token range [{start}, {end}) is outside a stream of {len(array)} tokens")

    @classmethod
    def from_file(cls, path: str | Path) -> "TokenStream":
        """A token file (see the module docstring), checked by `jetnas.validation.open_token_file`: not empty, a
        whole number of ids, as many as its sidecar records."""
        path = Path(path)
        return cls(open_token_file(path), name=path.name)

    def __len__(self) -> int:
        return self.end - self.start

    def digest(self, edge: int = 65536) -> str:
        """A short fingerprint of these tokens: sha256 of the length and the first and last `edge` ids (as int64),
        the same for a moved or re-cached copy of the same tokens (a run's identity uses it)."""
        h = hashlib.sha256(str(len(self)).encode())
        h.update(self.tokens(0, min(edge, len(self))).numpy().tobytes())
        h.update(self.tokens(max(0, len(self) - edge), min(edge, len(self))).numpy().tobytes())
        return h.hexdigest()[:12]

    def split(self, tail: int) -> tuple["TokenStream", "TokenStream"]:
        """(everything but the last `tail` tokens, the last `tail` tokens) — the held-out split."""
        if not 0 <= tail < len(self):
            raise InputError(f"{self.name}: cannot hold out {tail} tokens of its {len(self)} (heldout_tokens too "
                             f"large for this data)")
        cut = self.end - tail
        return TokenStream(self.array, self.name, self.start, cut), TokenStream(self.array, self.name, cut, self.end)

    def tokens(self, start: int, length: int) -> torch.Tensor:
        """`length` ids from offset `start` (int64 tensor)."""
        return torch.from_numpy(np.asarray(self.array[self.start + start : self.start + start + length], dtype=np.int64))

    def window_batch(self, n: int, seq_len: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """The first `n` consecutive windows of `seq_len + 1` tokens: `[n, seq_len + 1]` (fixed evaluation data)."""
        need = n * seq_len + 1
        if need > len(self):
            raise ValueError(f"{n} windows of {seq_len + 1} tokens need {need} tokens; the stream has {len(self)}")
        return torch.stack([self.tokens(i * seq_len, seq_len + 1) for i in range(n)]).to(device)

    def save(self, path: str | Path) -> Path:
        """Write these tokens as a `.bin` (with a dtype sidecar), atomically."""
        path = Path(path)
        data = np.asarray(self.array[self.start : self.end])
        _write_bin(path, data, data.dtype)
        return path


def _write_bin(path: Path, data: np.ndarray, dtype: np.dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data, dtype=dtype)
    if data.size and int(data.max()) > np.iinfo(dtype).max:
        raise InputError(f"{path}: token id {int(data.max())} does not fit {np.dtype(dtype).name}")
    # the sidecar first: a reader that finds the `.bin` finds its dtype and size too
    write_text_atomic(path.with_name(path.name + ".json"), json.dumps({"dtype": np.dtype(dtype).str,
                                                                       "tokens": int(data.size)}))
    tmp = temp_sibling(path)
    data.tofile(tmp)
    os.replace(tmp, path)


def _cached(target: Path) -> TokenStream | None:
    """A cached token file, or None when it is absent or damaged (then removed, to be built again)."""
    if not target.exists():
        return None
    try:
        return TokenStream.from_file(target)
    except InputError as err:
        print(f"jetnas: damaged data cache ({err}): building it again", file=sys.stderr)
        target.unlink(missing_ok=True)
        return None


def _cache_dir() -> Path:
    from jetnas.models.teachers import cache_dir

    return cache_dir() / "data"


def _tokenizer_key(tokenizer) -> str:
    return f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}"


def tokenize_files(paths: list[Path], tokenizer, eos_id: int) -> TokenStream:
    """Text files tokenised once (EOS after every document) and cached."""
    key = hashlib.sha256("|".join([_tokenizer_key(tokenizer), str(eos_id)] + [
        f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"text-{key}.bin"
    with build_lock(target):
        if _cached(target) is None:
            ids: list[int] = []
            for path in paths:
                for text in tqdm(read_texts(path), desc=f"tokenizing {path.name}", leave=False, file=sys.stderr):
                    ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id]
            _write_bin(target, np.array(ids), _dtype_for(len(tokenizer)))
    return TokenStream.from_file(target)


def hf_dataset(spec: str, tokenizer, eos_id: int, max_tokens: int | None = None) -> TokenStream:
    """`hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face dataset's "text" field, tokenised once and cached."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"data {spec!r} needs the datasets package: pip install 'jetnas[data]'") from err
    body, _, split = spec[3:].partition("@")
    name, _, config = body.partition(":")
    key = hashlib.sha256(f"{spec}|{_tokenizer_key(tokenizer)}|{eos_id}|{max_tokens}".encode()).hexdigest()[:16]
    target = _cache_dir() / f"hf-{key}.bin"
    with build_lock(target):
        if _cached(target) is None:
            ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
            ids: list[int] = []
            for i, row in enumerate(tqdm(ds, desc=f"tokenizing {spec}", leave=False, file=sys.stderr)):
                if not isinstance(row.get("text"), str):
                    raise InputError(f"data {spec!r} row {i}: no \"text\" string (its fields: {sorted(row)})")
                ids += tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [eos_id]
                if max_tokens is not None and len(ids) >= max_tokens:
                    break
            if not ids:
                raise InputError(f"data {spec!r}: the dataset has no rows")
            _write_bin(target, np.array(ids), _dtype_for(len(tokenizer)))
    return TokenStream.from_file(target)


#: the sampler of teacher-generated text: part of its cache name (and of the pipeline's data fingerprint), since
#: another sampler's text (transformers' `generate()`, which this replaced) is other text for the same seed
SAMPLER = "engine"


def generation_defaults(device: str | torch.device) -> tuple[int, int]:
    """`(batch_size, length)` of teacher-text sampling on `device`: on CUDA 512 rows of 512 new tokens (the static
    cache of a 135M teacher at 512 x ~520 positions is ~12 GB in float32, and a large batch is what makes the
    captured decode step fast); elsewhere 16 rows of 256, so a CPU batch ends (and the bar moves) within minutes."""
    return (512, 512) if torch.device(device).type == "cuda" else (16, 256)


def special_ids(tokenizer, eos_id: int) -> list[int]:
    """The tokenizer's special and added tokens other than `eos_id`: SmolLM2-Instruct's chat markup
    (`<|im_start|>`, `<|im_end|>`) and code-data markers (`<repo_name>`, `<file_sep>`, ...), ids 1-16."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= set(tokenizer.get_added_vocab().values()) if hasattr(tokenizer, "get_added_vocab") else set()
    return sorted(ids - {eos_id})


def teacher_generated(model, tokenizer, eos_id: int, tokens: int, seed: int = 0, batch_size: int | None = None,
                      length: int | None = None, name: str = "teacher", special: bool = True) -> TokenStream:
    """Text sampled from the teacher itself (`_sample_text`: temperature 1, from short seed prompts, through
    `jetnas.engine.Engine`), EOS after each sample; cached by teacher name, sampler, device type, seed, batch size,
    length and size, so later runs reuse it and text sampled another way is never taken for it.

    Args:
        tokens: how many ids to keep (the samples' concatenation, cut there).
        batch_size, length: rows per batch and new tokens per row (None: `generation_defaults` of the model's
            device; a `length` given without a batch size keeps the default's rows x positions, so the engine's
            cache stays the same size: 4,096 new tokens on CUDA sample 64 rows a batch). Both change what is
            sampled, so both name the cache file.
        special: False never samples the tokenizer's special tokens other than EOS (`special_ids`): the
            instruction-tuned SmolLM2 wrote chat turns (`<|im_start|>user`...) into 18% of its samples (2026-12-07).
            Names the cache file (`-nospecial`).
    """
    device = next(model.parameters()).device
    default_batch, default_length = generation_defaults(device)
    if batch_size is None:
        batch_size = default_batch if length is None else max(1, default_batch * default_length // max(length, 1))
    length = default_length if length is None else length
    if tokens < 1 or batch_size < 1 or length < 1:
        raise ValueError(f"tokens, batch_size and length must be >= 1, got {tokens}, {batch_size}, {length}")
    sampler = SAMPLER if special else f"{SAMPLER}-nospecial"
    target = _cache_dir() / f"generated-{name}-{sampler}-{device.type}-seed{seed}-b{batch_size}-n{length}-{tokens}.bin"
    suppress = None if special else special_ids(tokenizer, eos_id)
    with build_lock(target):
        if _cached(target) is None:
            partial = target.with_name(target.name + ".partial")
            ids = _sample_text(model, tokenizer, eos_id, tokens, seed, batch_size, length, name, partial, suppress)
            _write_bin(target, np.array(ids[:tokens]), _dtype_for(len(tokenizer)))
            partial.unlink(missing_ok=True)
            _progress_path(partial).unlink(missing_ok=True)
    return TokenStream.from_file(target)


def _progress_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _resume_partial(partial: Path | None) -> tuple[list[int], int]:
    """`(ids, batches)` an interrupted sampling kept in `partial` (uint32 ids appended batch by batch; its sidecar
    records how many batches and ids are whole): a long generation cut off (a device call's time limit) goes on from
    its last whole batch. `([], 0)` without one."""
    if partial is None or not partial.exists() or not _progress_path(partial).exists():
        return [], 0
    done = json.loads(_progress_path(partial).read_text())
    ids = np.fromfile(partial, dtype="<u4")
    if len(ids) < done["tokens"]:  # shorter than recorded: not this sampling's file; start over
        return [], 0
    return ids[: done["tokens"]].tolist(), int(done["batches"])


def _append_partial(partial: Path, new: list[int], ids: int, batches: int) -> None:
    """Append one batch's ids to `partial`, then record the whole batches (a cut-off append is ignored on resume:
    the sidecar counts only what was written before it)."""
    if batches == 1:
        partial.unlink(missing_ok=True)  # ids past the sidecar's count, left by a run cut off in its first batch
    with open(partial, "r+b" if partial.exists() else "wb") as f:
        f.seek((ids - len(new)) * 4)
        f.write(np.asarray(new, dtype="<u4").tobytes())
        f.truncate()
    write_text_atomic(_progress_path(partial), json.dumps({"batches": batches, "tokens": ids}))


def _seed_prompts(tokenizer, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`SEED_PROMPTS` tokenised, each after an EOS (a sample starts as a document does after the one before it),
    left-padded with EOS to one width: `([P, W] ids, [P, W] attention mask)`. One width for every batch keeps the
    engine's cache and captured decode step the same from batch to batch."""
    encoded = [[eos_id] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in SEED_PROMPTS]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), eos_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


@torch.no_grad()
def _sample_text(model, tokenizer, eos_id: int, tokens: int, seed: int, batch_size: int, length: int,
                 name: str, partial: Path | None = None, suppress: list[int] | None = None) -> list[int]:
    """At least `tokens` ids of the teacher's samples (see `teacher_generated`), in batches of `batch_size` rows.

    Each row: a seed prompt drawn uniformly, `length` new tokens sampled at temperature 1 (plain multinomial over
    the softmax: no top-k, no top-p) by `jetnas.engine.Engine`, kept as the prompt without its leading EOS and the
    text up to the first EOS after the prompt, then one EOS. Batch b's prompts and sampling seed are drawn from a
    generator seeded by `seed`, so the ids are a pure function of (seed, batch_size, length, model, device type).
    The progress bar advances once per batch by the tokens that batch kept. `partial`: a file the ids are appended
    to batch by batch, and resumed from when it holds an interrupted sampling's whole batches (the same ids as an
    uninterrupted run: batch b's prompts and seed are drawn again for the batches already kept). `suppress`: ids
    never sampled (`Engine.generate`'s `suppress_token_ids`).
    """
    from jetnas.engine import Engine

    prompts, prompt_mask = _seed_prompts(tokenizer, eos_id)
    width = prompts.shape[1]
    gen = torch.Generator().manual_seed(seed)
    ids, batches = _resume_partial(partial)
    for _ in range(batches):  # the draws of the batches already kept
        torch.randint(len(SEED_PROMPTS), (batch_size,), generator=gen)
        torch.randint(2**31 - 1, (1,), generator=gen)
    bar = tqdm(total=tokens, desc=f"generating training text with {name} ({batch_size} x {length} tokens a batch)",
               unit="tok", file=sys.stderr, dynamic_ncols=True)
    if ids:
        bar.update(min(len(ids), tokens))
    bar.refresh()  # shown at once: the first batch (its prefill, a captured step's warm-up) takes a while
    was_training = model.training
    # a Llama / Qwen teacher is converted (a copy of its weights, every layer attention: the same logits); a jetnas
    # model is used as it is, in eval mode
    engine = Engine(model)
    try:
        while len(ids) < tokens:
            picks = torch.randint(len(SEED_PROMPTS), (batch_size,), generator=gen)
            batch_seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
            out = engine.generate(prompts[picks], prompt_mask[picks], max_new_tokens=length, temperature=1.0,
                                  eos_token_id=eos_id, pad_token_id=eos_id, seed=batch_seed,
                                  suppress_token_ids=suppress).sequences.cpu()
            new: list[int] = []
            for row, k in enumerate(picks.tolist()):
                start = width - int(prompt_mask[k].sum()) + 1  # after the padding and the leading EOS
                sample = out[row, start:].tolist()
                prompt_len = width - start
                if eos_id in sample[prompt_len:]:
                    sample = sample[: sample.index(eos_id, prompt_len)]
                new += sample + [eos_id]
            ids += new
            batches += 1
            if partial is not None:
                _append_partial(partial, new, len(ids), batches)
            bar.update(min(len(ids), tokens) - bar.n)
    finally:
        bar.close()
        engine.release()
        model.train(was_training)
    return ids


def resolve_data(spec: str | None, tokenizer, teacher=None, teacher_eos: int | None = None, heldout_tokens: int = 0,
                 generated_tokens: int = 200_000, seed: int = 0, teacher_name: str = "teacher"
                 ) -> tuple[TokenStream, TokenStream | None]:
    """The training stream and a held-out stream of its last `heldout_tokens` tokens (None when 0).

    Args:
        spec: a `.bin`, a text file or a comma-separated list of them, `hf:...`, or None for teacher text.
        tokenizer: the teacher's tokenizer.
        teacher, teacher_eos: the model generating text when `spec` is None, and its end-of-document id (also the
            separator appended to tokenised documents; default: the tokenizer's eos id).
        generated_tokens: how much text to generate when `spec` is None.
    """
    eos = teacher_eos if teacher_eos is not None else tokenizer.eos_token_id
    if spec is None:
        if teacher is None:
            raise ValueError("no training data given and no teacher to generate it")
        stream = teacher_generated(teacher, tokenizer, eos, generated_tokens + heldout_tokens, seed=seed,
                                   name=teacher_name)
    elif spec.startswith("hf:"):
        stream = hf_dataset(spec, tokenizer, eos)
    else:
        paths = [Path(p).expanduser() for p in spec.split(",") if p]
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"training data {str(p)!r} does not exist")
        if len(paths) == 1 and paths[0].suffix == ".bin":
            stream = TokenStream.from_file(paths[0])
        elif any(p.suffix == ".bin" for p in paths):
            raise ValueError(f"give one .bin file, or text files, not a mix: {spec!r}")
        else:
            stream = tokenize_files(paths, tokenizer, eos)
    if not heldout_tokens:
        return stream, None
    return stream.split(heldout_tokens)


class WindowBatcher:
    """Deterministic batches of `[batch_size, seq_len + 1]` windows.

    Window w covers tokens `[w * seq_len, w * seq_len + seq_len + 1)` of the stream. Sample i (counting over
    the whole run) is window `perm_e(i mod n)` with epoch `e = i // n` and `perm_e` an affine permutation of the
    n windows seeded by (seed, e): O(1) memory for any corpus size.

    Document starts (`doc_starts` = p > 0, with `eos_id`): sample i starts at a document's first token instead when
    `frac(phase + i / golden ratio) < p` (a Weyl sequence: every prefix of the run holds within a sample or two of
    the share p), the document drawn uniformly (seeded by (seed, i)) among those whose first `seq_len + 1` tokens
    lie in the stream. Such a row reads a document's opening from a fresh state, as an evaluation's prompt is read;
    cut at the fixed grid, a row starts at a document's first token about once per mean document length (1 row in
    ~4,000 on the Wikipedia corpus), and a document's opening is otherwise read after the previous document's tokens. The other samples keep their
    windows (so a share p of each epoch's windows goes unread). A stream without an eligible document start
    (no `eos_id` in it) refuses p > 0.
    """

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, seed: int = 0, doc_starts: float = 0.0,
                 eos_id: int | None = None):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed
        self.num_windows = (len(stream) - 1) // seq_len
        if self.num_windows < 1:
            raise InputError(f"{stream.name}: its {len(stream)} training tokens hold no window of seq_len + 1 = "
                             f"{seq_len + 1} tokens")
        self.doc_starts = check_doc_starts(doc_starts)
        self.documents = None
        if self.doc_starts:
            self.documents = document_starts(stream, eos_id, seq_len + 1)
            self._doc_phase = np.uint64(int(np.random.default_rng([seed, 0x646F63]).integers(0, 2**32)))
            self._doc_bound = np.uint64(round(self.doc_starts * 2**32))

    def _window(self, sample: int) -> int:
        n = self.num_windows
        epoch, i = divmod(sample, n)
        rng = np.random.default_rng([self.seed, epoch])
        a = int(rng.integers(1, max(n, 2)))
        while math.gcd(a, n) != 1:
            a = a % n + 1
        b = int(rng.integers(0, n))
        return (a * i + b) % n

    def at_document(self, sample: int) -> bool:
        """Whether sample `sample` starts at a document's first token (see the class docstring)."""
        if self.documents is None:
            return False
        return bool((self._doc_phase + np.uint64(sample) * _WEYL_STEP) & _MASK32 < self._doc_bound)

    def start_of(self, sample: int) -> int:
        """Token offset of sample `sample`'s window (see the class docstring)."""
        if self.at_document(sample):
            pick = np.random.default_rng([self.seed, 0x646F63, sample]).integers(len(self.documents))
            return int(self.documents[pick])
        return self._window(sample) * self.seq_len

    def windows(self, step: int) -> list[int]:
        """Window indices of global batch `step` on the fixed grid (without document starts)."""
        return [self._window(step * self.batch_size + j) for j in range(self.batch_size)]

    def starts(self, step: int) -> list[int]:
        """Token offsets of the samples of global batch `step` (`windows` x seq_len without document starts)."""
        return [self.start_of(step * self.batch_size + j) for j in range(self.batch_size)]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank `rank`'s share (a contiguous slice) of global batch `step`: `[batch_size / world, seq_len + 1]`."""
        return torch.stack([self.stream.tokens(s, self.seq_len + 1) for s in self.share(step, rank, world_size)])

    def share(self, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """The token offsets of rank `rank`'s contiguous share of global batch `step`."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by the world size {world_size}")
        share = self.batch_size // world_size
        return self.starts(step)[rank * share : (rank + 1) * share]


# 2^32 / golden ratio, odd: the Weyl step visits every 32-bit phase once per 2^32 samples
_WEYL_STEP = np.uint64(2654435769)
_MASK32 = np.uint64(2**32 - 1)


def check_doc_starts(share) -> float:
    """A share of document-start rows: a number in [0, 1]; ValueError naming the value otherwise."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ValueError(f"doc_starts={share!r} must be a number in [0, 1] (the share of rows that start at a "
                         f"document's first token)")
    return float(share)


def document_starts(stream: TokenStream, eos_id: int | None, length: int) -> np.ndarray:
    """Offsets (into `stream`) of the documents' first tokens, the stream's first and every token after `eos_id`,
    whose next `length` tokens lie in the stream (int64). InputError when there are none: no `eos_id` given or
    found, or no document starts early enough."""
    if eos_id is None:
        raise InputError(f"{stream.name}: rows at document starts need the end-of-document id (eos_id)")
    ids = np.asarray(stream.array[stream.start : stream.end])
    starts = np.flatnonzero(ids[:-1] == eos_id) + 1
    if not len(starts):
        raise InputError(f"{stream.name}: no end-of-document id {eos_id} in its {len(stream)} tokens, so no "
                         f"document starts to begin rows at (doc_starts > 0)")
    first = stream.start == 0 or stream.array[stream.start - 1] == eos_id
    starts = np.concatenate([[0] if first else [], starts]).astype(np.int64)
    starts = starts[starts + length <= len(stream)]
    if not len(starts):
        raise InputError(f"{stream.name}: no document starts {length} tokens before its end")
    return starts
